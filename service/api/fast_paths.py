"""The hot routes answered without FastAPI's per-request machinery.

A session step or a small prediction costs well under a millisecond of model time, and
FastAPI's own work per request (its exception and exit-stack layers, route matching through
every router, body parsing, dependency solving) costs about as much again: a plain ASGI app
answers the same request about three times as fast as a FastAPI route (bench: the `hello`
row of bench/session_throughput.py is a FastAPI route).

`FastPaths` sits inside the app's gates (request metrics, API keys, rate limit, body size:
they run as for every request) and, for the routes it is given, parses a well-formed request
itself and calls the route's own endpoint function, with the path parameters, the parsed
body and the request, the way FastAPI would. So a hot endpoint takes only those arguments
(no dependencies) and returns a `Response`; `FastPaths` checks both when it is built.

Whatever it does not recognise goes on to the app unchanged: other routes and methods, and
bodies that are not JSON the request schema accepts, so every answer about a malformed
request comes from FastAPI itself. So do all requests when OpenTelemetry is on: FastAPI's
routing is what names their spans. The routes stay the reference: they document themselves in
OpenAPI and answer everything when NEUROSERVE_FAST_PATHS is false, and
tests/service/test_fast_paths.py checks that both ways give the same answers.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.asgi_body import read_body, replaying


@dataclass(frozen=True)
class HotRoute:
    """One route `FastPaths` answers: its method, path pattern, body schema and endpoint."""

    route: APIRoute
    method: str
    pattern: re.Pattern[str]
    body_model: type[BaseModel]
    endpoint: Callable[..., Awaitable[Response]]

    @classmethod
    def of(cls, route: APIRoute) -> HotRoute:
        """`route` as a hot route; ValueError when its endpoint cannot be called directly."""
        (method,) = route.methods
        parameters = set(inspect.signature(route.endpoint).parameters)
        expected = {*route.param_convertors, "body", "request"}
        if parameters != expected:
            raise ValueError(
                f"{route.path}: a hot endpoint takes exactly {sorted(expected)}, not "
                f"{sorted(parameters)}"
            )
        body_model = typing.get_type_hints(route.endpoint)["body"]
        if not (isinstance(body_model, type) and issubclass(body_model, BaseModel)):
            raise ValueError(f"{route.path}: the body of a hot endpoint is a pydantic model")
        return cls(route, method, route.path_regex, body_model, route.endpoint)

    def path_params(self, scope: Scope) -> dict[str, str] | None:
        """The path parameters of a request for this route, else None."""
        if scope["method"] != self.method:
            return None
        path: str = scope["path"]
        root_path = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]  # the app mounted under a prefix routes the rest
        match = self.pattern.match(path)
        return None if match is None else match.groupdict()

    def parse(self, body: bytes) -> BaseModel | None:
        """The request body, or None when it is no JSON the schema accepts (the route then
        answers it, with FastAPI's message)."""
        try:
            return self.body_model.model_validate(orjson.loads(body))
        except (orjson.JSONDecodeError, ValidationError):
            return None


# Where FastAPI's native OpenTelemetry keeps a traced request's state (NEUROSERVE_OPENTELEMETRY).
_TRACED = "fastapi.telemetry"

# Bodies that are more than JSON (compressed; JSON followed by V2 binary tensors): the route
# reads them.
_FRAMED_BODY_HEADERS = (b"content-encoding", b"inference-header-content-length")


def is_json(scope: Scope) -> bool:
    """Whether the request says its body is JSON, as FastAPI decides it: `application/json`
    or `application/*+json`, parameters (charset) aside, and nothing but JSON (no
    Content-Encoding, no V2 binary tensors after it)."""
    media_type = None
    for name, value in scope["headers"]:
        if name in _FRAMED_BODY_HEADERS:
            return False
        if name == b"content-type":
            media_type = value.split(b";", 1)[0].strip().lower()
    return media_type is not None and (
        media_type == b"application/json"
        or (media_type.startswith(b"application/") and media_type.endswith(b"+json"))
    )


class FastPaths:
    """Middleware: answer well-formed requests of the hot routes; pass the rest to `app`."""

    def __init__(self, app: ASGIApp, routes: Sequence[APIRoute], enabled: bool = True) -> None:
        self.app = app
        self.routes = [HotRoute.of(route) for route in routes] if enabled else []

    def _find(self, scope: Scope) -> tuple[HotRoute, dict[str, str]] | None:
        if scope["type"] != "http" or not is_json(scope):
            return None
        if scope.get(_TRACED) is not None:
            return None  # OpenTelemetry is on: FastAPI's routing names the request's spans
        for hot in self.routes:
            params = hot.path_params(scope)
            if params is not None:
                return hot, params
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._find(scope) if self.routes else None
        if found is None:
            await self.app(scope, receive, send)
            return
        hot, params = found
        body = await read_body(receive)
        if body is None:
            return  # the client left
        parsed = hot.parse(body)
        if parsed is None:
            await self.app(scope, replaying(body, receive), send)
            return
        # What the router would have set: the request metrics label by the route's template.
        scope["route"], scope["path_params"] = hot.route, params
        request = Request(scope, receive)
        try:
            response = await hot.endpoint(**params, body=parsed, request=request)
        except Exception as error:
            handler = _error_handler(scope, error)
            if handler is None:
                raise  # unexpected: the server error layer logs it and answers 500
            response = await handler(request, error)
        await response(scope, receive, send)


def _error_handler(scope: Scope, error: Exception) -> Callable[..., Any] | None:
    """The app's handler for `error` (by its class, most specific first), unless that is the
    catch-all for unexpected errors."""
    handlers = scope["app"].exception_handlers
    for cls in type(error).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None
