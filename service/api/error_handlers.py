"""How every error becomes an HTTP response, in the wire format of the request's protocol.

`answer_for` gives the status, code and message of an error for every protocol (the gRPC
endpoint answers with the same messages); `install_error_handlers` maps the server's own
errors (`service.errors.NeuroserveError`), the models layer's repository errors, request
validation errors and anything unexpected onto the two wire formats:

- native REST (`/v1/...`): `{"error": {"code": "...", "message": "..."}}`
- Open Inference Protocol (`/v2/...`): `{"error": "..."}`

State store errors map onto the same statuses: a missing session is 404; a lost
compare-and-set, a taken id or a stored state that does not fit is 409; an unreachable store
is 503. An unexpected exception is logged with its traceback and answered with a generic 500:
the client never sees internals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.repository import ArtifactError, ModelNotFoundError
from service.errors import (
    BadInputError,
    ConflictError,
    NeuroserveError,
    NotFoundError,
    describe_validation_errors,
)
from service.state.codec import CorruptStateError, IncompatibleStateError
from service.state.store import (
    StaleVersionError,
    StateExistsError,
    StateNotFoundError,
    StateStoreUnavailableError,
)

logger = logging.getLogger("neuroserve.errors")

V2_PREFIX = "/v2"

# Starlette raises HTTPException for routing failures (unknown path, wrong method).
_HTTP_STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def error_response(request: Request, status_code: int, code: str, message: str) -> JSONResponse:
    """The error body in the format of the protocol the request came in on."""
    if request.url.path == V2_PREFIX or request.url.path.startswith(V2_PREFIX + "/"):
        body: dict[str, Any] = {"error": message}
    else:
        body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status_code)


@dataclass(frozen=True)
class ErrorAnswer:
    """What a client is told about an error, whatever the protocol: the HTTP status (gRPC
    maps it onto its own codes), a machine-readable code and the message."""

    status_code: int
    code: str
    message: str


def answer_for(error: Exception, where: str) -> ErrorAnswer:
    """The answer to `error` raised while serving `where` (a path or a gRPC method); the
    server's own failures are logged here, and only a generic message leaves for them."""
    if isinstance(error, NeuroserveError):
        return ErrorAnswer(error.status_code, error.code, error.message)
    if isinstance(error, ModelNotFoundError):
        message = str(error.args[0]) if error.args else str(error)
        return ErrorAnswer(404, NotFoundError.code, message)
    if isinstance(error, ArtifactError):
        # A broken or unreadable artifact is the server's problem, not the client's.
        logger.error("model artifact error on %s: %s", where, error)
        return ErrorAnswer(503, "artifact_error", f"model artifact could not be loaded: {error}")
    if isinstance(error, StateNotFoundError):
        return ErrorAnswer(404, NotFoundError.code, str(error))
    if isinstance(error, _STATE_CONFLICTS):
        # A lost compare-and-set (after retries), an id already taken, or a stored state that
        # does not fit the model now served: the client can retry or start a new session.
        message = str(error)
        if isinstance(error, CorruptStateError):
            message = f"stored session state is damaged: {error}"
        return ErrorAnswer(409, ConflictError.code, message)
    if isinstance(error, StateStoreUnavailableError):
        logger.warning("state store unavailable on %s: %s", where, error)
        message = (
            "state store unavailable: session state cannot be read or written now; retry later"
        )
        return ErrorAnswer(503, "state_store_unavailable", message)
    logger.exception("unexpected error on %s", where)
    return ErrorAnswer(500, "internal_error", "internal server error")


_STATE_CONFLICTS = (StaleVersionError, StateExistsError, IncompatibleStateError, CorruptStateError)
# The errors `answer_for` knows; anything else is answered as a 500.
ANSWERED_ERRORS = (
    NeuroserveError,
    ModelNotFoundError,
    ArtifactError,
    StateNotFoundError,
    *_STATE_CONFLICTS,
    StateStoreUnavailableError,
    Exception,
)


async def _handle_error(request: Request, error: Exception) -> JSONResponse:
    answer = answer_for(error, f"{request.method} {request.url.path}")
    return error_response(request, answer.status_code, answer.code, answer.message)


async def _handle_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    message = "invalid request: " + describe_validation_errors(error.errors())
    return error_response(request, 422, BadInputError.code, message)


# What FastAPI raises (as a 400) for a body that is not even text, e.g. invalid UTF-8.
_UNPARSABLE_BODY = "There was an error parsing the body"


async def _handle_http_exception(request: Request, error: StarletteHTTPException) -> JSONResponse:
    if error.status_code == 400 and error.detail == _UNPARSABLE_BODY:
        # Answered like any other malformed JSON: 422 on /v1, 400 on /v2 (its own convention).
        is_v2 = request.url.path == V2_PREFIX or request.url.path.startswith(V2_PREFIX + "/")
        message = "invalid request: request body is not valid JSON (not UTF-8 text)"
        return error_response(request, 400 if is_v2 else 422, BadInputError.code, message)
    code = _HTTP_STATUS_CODES.get(error.status_code, "http_error")
    response = error_response(request, error.status_code, code, str(error.detail))
    if error.headers:
        response.headers.update(error.headers)
    return response


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler above on `app`."""
    for error_type in ANSWERED_ERRORS:
        app.add_exception_handler(error_type, _handle_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
