"""Errors the server raises on purpose, each with the HTTP status it is answered with.

One root, `NeuroserveError`, carries its HTTP status and a short machine-readable `code`;
everything under `service/` raises a subclass with a message written for the client.
`service.api.error_handlers` turns these (and the state store's, the models layer's and
request validation errors) into responses in each protocol's wire format.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


class NeuroserveError(Exception):
    """Root of every error the server answers on purpose; subclasses fix the status."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(NeuroserveError):
    status_code = 404
    code = "not_found"


class BadInputError(NeuroserveError):
    status_code = 422
    code = "bad_input"


class NotCalibratedError(NeuroserveError):
    status_code = 409
    code = "not_calibrated"


class ConflictError(NeuroserveError):
    status_code = 409
    code = "conflict"


class PayloadTooLargeError(NeuroserveError):
    status_code = 413
    code = "payload_too_large"


class RateLimitedError(NeuroserveError):
    status_code = 429
    code = "rate_limited"
    retry_after_seconds: float | None = None  # when the same request would be accepted


class ServiceUnavailableError(NeuroserveError):
    """The server cannot do this now: a backend that cannot run here (the backend's own
    `hardware_backends.base.BackendUnavailableError`, answered), a part not running."""

    status_code = 503
    code = "backend_unavailable"


@contextmanager
def value_errors_as(
    error_type: type[NeuroserveError] = BadInputError, prefix: str = ""
) -> Iterator[None]:
    """Answer a ValueError raised inside (a check of the calibration or models layer, e.g.
    `calibration.checks.check_alpha`) as `error_type` with the same message after `prefix`."""
    try:
        yield
    except ValueError as error:
        raise error_type(f"{prefix}{error}") from None


def describe_validation_errors(errors: Sequence[Any], limit: int = 5) -> str:
    """One readable line per pydantic error: `inputs[0][2][1]: Input should be a finite number`."""
    lines = []
    for error in errors[:limit]:
        if error.get("type") == "json_invalid":
            reason = error.get("ctx", {}).get("error", "malformed")
            position = error.get("loc", ("body", "?"))[-1]
            lines.append(f"request body is not valid JSON: {reason} at character {position}")
            continue
        location = format_location(error.get("loc", ()))
        message = str(error.get("msg", "invalid value"))
        lines.append(f"{location}: {message}" if location else message)
    if len(errors) > limit:
        lines.append(f"... and {len(errors) - limit} more problems")
    return "; ".join(lines)


def format_location(location: Sequence[int | str]) -> str:
    """`("body", "inputs", 0, 2)` -> `inputs[0][2]`; the transport prefix is dropped."""
    parts = list(location)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text
