"""The `parameters` of an Open Inference Protocol inference request, whatever the protocol
(V2 over HTTP or gRPC): every option of the native API, Triton's sequence parameters and the
binary-output switch, each type-checked; anything else is refused by name.

Values are plain Python values: JSON's over HTTP, an `InferParameter`'s over gRPC (whose
values are bool, int, float or str, so `backend_options` may also come as JSON text).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from calibration import SCORE_NAMES
from calibration.checks import check_alpha
from service.api.v2_codec import V2BadRequestError
from service.errors import value_errors_as

# name -> what it does; the order is the documentation's (README, error messages).
KNOWN_PARAMETERS: dict[str, str] = {
    "alpha": "miscoverage level of the conformal set, in (0, 1); default 0.1",
    "score": f"conformity score, one of {', '.join(SCORE_NAMES)}; the model's default if unset",
    "backend": "hardware backend (torch, onnxruntime, analog_imc, stochastic, a plugin)",
    "backend_options": "the backend's options: an object, or its JSON text",
    "class_conditional": "true: per-class (Mondrian) quantiles",
    "never_empty": "add the top label to an empty set; default true unless online",
    "online": "build the set at the caller's online (ACI) level",
    "max_set_size": "abstain when the set holds more labels; the server's setting if unset",
    "seed": "accepted and ignored: the draw of randomised scores is the server's",
    "ttl_seconds": "sequence_start only: idle seconds before the sequence expires",
    "early_decision_max_set_size": (
        "sequence_start only: answer every step with an early decision (stop once the set at "
        "alpha / K holds at most this many labels)"
    ),
    "return_steps": "sequences: one output row per step of the request's chunk",
    "sequence_id": "Triton's sequence id (integer or text; 0 / '' mean none)",
    "sequence_start": "true: start the sequence (restarting it if it is open)",
    "sequence_end": "true: end the sequence after this request",
    "binary_data_output": "HTTP: true returns every output as binary data",
}
# Options of a sequence chosen once, when it starts (the session keeps them).
START_ONLY = ("backend_options", "online", "ttl_seconds", "early_decision_max_set_size")
SEQUENCE_ONLY = ("ttl_seconds", "early_decision_max_set_size", "return_steps")
_SEQUENCE_ID_TEXT = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_UNSUPPORTED = {
    "priority": "this server has no request priorities",
    "timeout": "this server does not time requests out in its queue",
}


@dataclass(frozen=True)
class InferParameters:
    alpha: float | None = None
    score: str | None = None
    backend: str | None = None
    backend_options: dict[str, Any] | None = None
    class_conditional: bool | None = None
    never_empty: bool | None = None  # None: the server's default (never empty unless online)
    online: bool | None = None
    max_set_size: int | None = None
    seed: int | str | None = None
    ttl_seconds: float | None = None
    early_decision_max_set_size: int | None = None
    return_steps: bool = False
    sequence_id: int | str | None = None  # None: a stateless request
    sequence_start: bool = False
    sequence_end: bool = False
    binary_data_output: bool = False


def known_parameters_text() -> str:
    return ", ".join(KNOWN_PARAMETERS)


def parse_parameters(parameters: Mapping[str, Any] | None) -> InferParameters:
    """The request's parameters, checked; an unknown one is a V2BadRequestError naming it
    (with the closest known name, if any) and listing the known ones."""
    if not parameters:
        return _NO_PARAMETERS  # the usual request; frozen, so one instance serves them all
    parameters = dict(parameters)
    for name in parameters:
        if name in _UNSUPPORTED:
            raise V2BadRequestError(f"parameters.{name} is not supported: {_UNSUPPORTED[name]}")
        if name not in KNOWN_PARAMETERS:
            close = difflib.get_close_matches(name, KNOWN_PARAMETERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise V2BadRequestError(
                f"unknown parameter {name!r}{hint}; known parameters: {known_parameters_text()}"
            )
    values: dict[str, Any] = {
        name: value for name, value in parameters.items() if value is not None
    }
    if "alpha" in values:
        with value_errors_as(V2BadRequestError, prefix="parameters."):
            check_alpha(values["alpha"])
        values["alpha"] = float(values["alpha"])
    for name in ("score", "backend"):
        if name in values and (not isinstance(values[name], str) or not values[name]):
            raise V2BadRequestError(
                f"parameters.{name} must be a non-empty string, got {values[name]!r}"
            )
    for name in ("class_conditional", "never_empty", "online", "sequence_start", "sequence_end",
                 "binary_data_output", "return_steps"):  # fmt: skip
        if name in values and not isinstance(values[name], bool):
            raise V2BadRequestError(
                f"parameters.{name} must be true or false, got {values[name]!r}"
            )
    if "backend_options" in values:
        values["backend_options"] = _backend_options(values["backend_options"])
    for name, least in (("max_set_size", 0), ("early_decision_max_set_size", 1)):
        size = values.get(name)
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, int) or size < least
        ):
            raise V2BadRequestError(
                f"parameters.{name} must be an integer >= {least}, got {size!r}"
            )
    if "seed" in values and (
        isinstance(values["seed"], bool) or not isinstance(values["seed"], int | str)
    ):
        raise V2BadRequestError(
            f"parameters.seed must be an integer or a string, got {values['seed']!r}"
        )
    if "ttl_seconds" in values:
        ttl = values["ttl_seconds"]
        if (
            isinstance(ttl, bool)
            or not isinstance(ttl, int | float)
            or not math.isfinite(ttl)
            or ttl <= 0
        ):
            raise V2BadRequestError(
                f"parameters.ttl_seconds must be a positive number, got {ttl!r}"
            )
        values["ttl_seconds"] = float(ttl)
    values["sequence_id"] = _sequence_id(values.get("sequence_id"))
    if values["sequence_id"] is None:
        if values.get("sequence_start") or values.get("sequence_end"):
            raise V2BadRequestError(
                "parameters.sequence_start/sequence_end need a non-zero parameters.sequence_id"
            )
        values.pop("sequence_start", None), values.pop("sequence_end", None)
    stateless_misuse = [name for name in SEQUENCE_ONLY if name in values]
    if values["sequence_id"] is None and stateless_misuse:
        raise V2BadRequestError(
            f"parameters {stateless_misuse} apply to sequences only (send a sequence_id)"
        )
    if values["sequence_id"] is not None and not values.get("sequence_start"):
        chosen = [name for name in START_ONLY if name in values]
        if chosen:
            raise V2BadRequestError(
                f"parameters {chosen} are chosen when a sequence starts: send them with "
                "sequence_start = true"
            )
    return InferParameters(**values)


def _backend_options(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise V2BadRequestError(
                f"parameters.backend_options is not a JSON object: {error}"
            ) from None
    if not isinstance(value, dict):
        raise V2BadRequestError(
            f"parameters.backend_options must be an object (or its JSON text), got {value!r}"
        )
    return value


def _sequence_id(sequence_id: Any) -> int | str | None:
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str | None):
        raise V2BadRequestError(
            f"parameters.sequence_id must be an integer or a string, got {sequence_id!r}"
        )
    if isinstance(sequence_id, int) and sequence_id < 0:
        raise V2BadRequestError(f"parameters.sequence_id must be >= 0, got {sequence_id}")
    if (
        isinstance(sequence_id, str)
        and sequence_id
        and not _SEQUENCE_ID_TEXT.fullmatch(sequence_id)
    ):
        raise V2BadRequestError(
            f"parameters.sequence_id {sequence_id!r} must be 1-128 letters, digits, '.', '_', "
            "':' or '-'"
        )
    return None if sequence_id in (0, "") else sequence_id


_NO_PARAMETERS = InferParameters()
