"""`POST /v1/sessions/{session_id}/step` answered without FastAPI's per-request machinery.

A session step is the server's hot path: one time step of a small model costs well under a
millisecond, and FastAPI's own work per request (its exception and exit-stack layers, route
matching through every router, body parsing, dependency solving) costs about twice what a
plain ASGI app spends answering the same request (bench/session_throughput.py: the `hello`
row is a FastAPI route). This middleware sits inside the app's gates (request metrics, API
keys, rate limit, body size: they run as for every request), recognises a well-formed step
and answers it with the same code the route runs (`step_and_note`, `SessionStepResponse.of`,
the app's exception handlers).

Whatever it does not recognise goes on to the app unchanged: other routes and methods, and
step bodies that are not JSON the request schema accepts — so every answer about a
malformed request comes from the FastAPI route itself. The route stays the reference: it
documents the step in OpenAPI and answers everything when NEUROSERVE_FAST_STEP_PATH is
false, and tests/service/test_fast_step.py checks that both give the same answers.
"""

from __future__ import annotations

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import v1_sessions
from service.api.asgi_body import read_body, replaying
from service.api.route_helpers import serialized
from service.api.schemas.sessions import SessionStepRequest, SessionStepResponse
from service.api.v1_sessions import STEP_ROUTE_NAME, step_and_note

_PREFIX, _SUFFIX = "/v1/sessions/", "/step"
_STEP_ROUTE: BaseRoute = next(
    route for route in v1_sessions.router.routes if getattr(route, "name", None) == STEP_ROUTE_NAME
)


def step_session_id(scope: Scope) -> str | None:
    """The session id of a `POST /v1/sessions/{session_id}/step` request, else None. The id
    is one path segment, as the route's `{session_id}` matches it."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path: str = scope["path"]
    root_path = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]  # the app mounted under a prefix routes the rest
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    session_id = path[len(_PREFIX) : -len(_SUFFIX)]
    return session_id if session_id and "/" not in session_id else None


def is_json(scope: Scope) -> bool:
    """Whether the request says its body is JSON, as FastAPI decides it: `application/json`
    or `application/*+json`, parameters (charset) aside."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            media_type = value.split(b";", 1)[0].strip().lower()
            return media_type == b"application/json" or (
                media_type.startswith(b"application/") and media_type.endswith(b"+json")
            )
    return False


def parse_step_body(body: bytes) -> SessionStepRequest | None:
    """The step request in `body`, or None when it is no JSON the schema accepts (the route
    then answers it, with its own message)."""
    try:
        return SessionStepRequest.model_validate(orjson.loads(body))
    except (orjson.JSONDecodeError, ValidationError):
        return None


class FastStepPath:
    """Middleware: answer well-formed session steps; pass everything else to `app`."""

    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session_id = step_session_id(scope) if self.enabled else None
        if session_id is None or not is_json(scope):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return
        request_body = parse_step_body(body)
        if request_body is None:
            await self.app(scope, replaying(body, receive), send)
            return
        # What the router would have set: the request metrics label by the route's template.
        scope["route"] = _STEP_ROUTE
        scope["path_params"] = {"session_id": session_id}
        request = Request(scope, receive)
        try:
            outcome = await step_and_note(request, session_id, request_body)
        except Exception as error:
            handler = _error_handler(scope, error)
            if handler is None:
                raise  # unexpected: the server error layer logs it and answers 500
            response = await handler(request, error)
        else:
            response = serialized(SessionStepResponse.of(outcome))
        await response(scope, receive, send)


def _error_handler(scope: Scope, error: Exception):
    """The app's handler for `error` (by its class, most specific first), unless that is the
    catch-all for unexpected errors."""
    handlers = scope["app"].exception_handlers
    for cls in type(error).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None
