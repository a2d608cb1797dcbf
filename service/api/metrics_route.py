"""`GET /metrics` and the middleware that times every HTTP request.

The app factory wires both:

    app.include_router(metrics.router)
    app.add_middleware(metrics.RequestMetricsMiddleware)

Requests are labelled by route *template* ("/v1/sessions/{session_id}/step"), never the raw
path, so ids in URLs cannot blow up the number of series. A handler that knows the model and
backend it served names them with `label_request(request, model=..., backend=...)`; otherwise
the model comes from the `{name}` path parameter of a successful request, and the backend is "".
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import record_request, render_metrics

UNMATCHED_ROUTE = "unmatched"  # the route label of requests no route matched (404s)
_LABELS_KEY = "neuroserve.metric_labels"  # where label_request leaves labels in the ASGI scope

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus exposition (text format, or OpenMetrics when the scraper asks for it)."""
    body, content_type = render_metrics(request.headers.get("accept"))
    return Response(content=body, media_type=content_type)


def label_request(
    request: Request, *, model: str | None = None, backend: str | None = None
) -> None:
    """Name the model and backend this request served, for the request metrics."""
    labels = request.scope.setdefault(_LABELS_KEY, {})
    if model is not None:
        labels["model"] = str(model)
    if backend is not None:
        labels["backend"] = str(backend)


def route_template(scope: Scope) -> str:
    """The path template of the route that handled `scope`, or UNMATCHED_ROUTE."""
    route = scope.get("route")
    template = getattr(route, "path", None) if isinstance(route, BaseRoute) else None
    if not isinstance(template, str) or not template:
        return UNMATCHED_ROUTE
    # A route reached through a mount or an include prefix may know only its own part of the
    # path; the segments in front of it are literal, so take them from the request path.
    path_segments = scope.get("path", "").rstrip("/").split("/")
    template_segments = template.rstrip("/").split("/")
    extra = len(path_segments) - len(template_segments)
    if extra > 0 and ":path}" not in template:  # {x:path} spans segments: no prefix to add
        return "/".join(path_segments[: extra + 1]) + template
    return template


class RequestMetricsMiddleware:
    """Pure ASGI middleware: counts and times HTTP requests (websockets pass through)."""

    def __init__(self, app: ASGIApp, excluded_routes: frozenset[str] = frozenset({"/metrics"})):
        self.app = app
        self.excluded_routes = excluded_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before it answers
        start = time.perf_counter()

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            seconds = time.perf_counter() - start
            route = route_template(scope)
            if route not in self.excluded_routes:
                model, backend = _model_and_backend(scope, status)
                record_request(route, model, backend, status, seconds)


def _model_and_backend(scope: Scope, status: int) -> tuple[str, str]:
    labels = scope.get(_LABELS_KEY, {})
    model = labels.get("model")
    if model is None:
        # Only a request that succeeded proves `{name}` is a served model; a client probing
        # random names would otherwise create one series per name.
        name = scope.get("path_params", {}).get("name")
        model = name if status < 400 and isinstance(name, str) else ""
    return model, labels.get("backend", "")
