"""The application factory: `create_app(settings)` builds a fresh FastAPI app.

Nothing lives at module level: every app owns its settings, repository and data plane (on
`app.state`), so tests can run several side by side. The lifespan opens the model
repository, logs where models come from and which state store is configured, preloads
the models in a worker thread (`/v2/health/ready` turns 200 once that has finished), and
serves gRPC beside HTTP in the same event loop (`service.api.v2_grpc`; its bound port on
`app.state.grpc_port`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from models.repository import ModelRepository
from service.api import (
    metrics_route,
    v1_feedback,
    v1_finetune,
    v1_generate,
    v1_models,
    v1_sessions,
    v1_versions,
    v2,
)
from service.api.api_docs import install_api_docs
from service.api.asgi_body import BodyTooLarge, read_body, replaying
from service.api.auth import ApiKeyAuth, KeyRing, warn_if_open
from service.api.error_handlers import error_response, install_error_handlers
from service.api.fast_paths import FastPaths
from service.api.limits import KeyRates, RequestRateLimit, key_quota
from service.api.v2_grpc.server import start_grpc
from service.dataplane.calibration_store import CalibrationStore
from service.dataplane.conformal_draws import ConformalDraws
from service.dataplane.feedback import PREDICTIONS_NAMESPACE, FeedbackLog
from service.dataplane.inputs import InputLimits
from service.dataplane.plane import CalibrationPolicy, DataPlane
from service.errors import PayloadTooLargeError
from service.sessions.plane import SessionManager, SessionSettings
from service.settings import Settings
from service.state.factory import open_state_store
from service.state.store import StateStore, StateStoreUnavailableError

logger = logging.getLogger("neuroserve.app")


class RequestSizeLimit:
    """Refuse request bodies over `max_bytes` with 413 before the app sees them.

    The body is buffered here (the app would buffer it anyway to parse JSON) and replayed, so
    a client that lies in Content-Length, or streams without one, is caught too.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        try:
            body = await read_body(receive, self.max_bytes)
        except BodyTooLarge:
            await self._refuse(scope, receive, send)
            return
        if body is not None:
            await self.app(scope, replaying(body, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLargeError(
            f"request body exceeds the limit of {self.max_bytes} bytes "
            "(NEUROSERVE_MAX_REQUEST_BYTES); split the batch into smaller requests"
        )
        response = error_response(Request(scope), error.status_code, error.code, error.message)
        response.headers["connection"] = "close"  # the unread rest of the body is discarded
        await response(scope, receive, send)


def _describe_store(settings: Settings) -> str:
    if settings.redis_url is None:
        return "embedded in-process store (no NEUROSERVE_REDIS_URL set)"
    return f"redis at {settings.redis_url_for_logs()}"


async def watch_store(
    store: StateStore, dataplane: DataPlane, preload: asyncio.Future | None, interval: float
) -> None:
    """Keep readiness false while the state store does not answer: a replica that cannot
    read or write session state should get no traffic."""
    healthy = True
    while True:
        try:
            await store.ping()
            answered = True
        except StateStoreUnavailableError as error:
            answered = False
            if healthy:
                logger.warning("state store unavailable, reporting not ready: %s", error)
        if answered and not healthy:
            logger.info("state store answers again")
        healthy = answered
        dataplane.ready = answered and (preload is None or preload.done())
        await asyncio.sleep(interval)


# A request allocates thousands of short-lived objects: at CPython's default generation-0
# threshold (700) the collector runs every few requests, and its full collections walk every
# module, model and tensor the process holds. Measured with wrk at 64 sessions stepping one
# time step each: p99 190-220 ms and 940-1,040 steps/s at the defaults, 65-80 ms and
# 1,130-1,360 steps/s with these thresholds (cycles are still collected, just in larger
# batches).
GC_THRESHOLDS = (50_000, 20, 100)


def _freeze_startup_objects(*_: object) -> None:
    """Move what start-up built (modules, models, schemas: ~200k objects once the built-ins are
    loaded) out of the collector's reach: a full collection then walks only what serving
    created, instead of pausing the server for up to ~120 ms (measured while serving)."""
    gc.collect()
    gc.freeze()


def hot_routes() -> list[APIRoute]:
    """The routes `FastPaths` answers: a session step, a stateless prediction, V2 inference
    (JSON bodies; binary and compressed ones go through the route)."""
    hot = (v1_sessions.step_session, v1_models.predict, v2.infer, v2.infer_version)
    routes = [*v1_sessions.router.routes, *v1_models.router.routes, *v2.router.routes]
    return [route for route in routes if getattr(route, "endpoint", None) in hot]


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app serving the repository named in `settings` (read from the environment when
    omitted)."""
    settings = settings if settings is not None else Settings()
    logging.getLogger("neuroserve").setLevel(settings.log_level.upper())
    keys = KeyRing(settings.api_keys, settings.admin_api_keys)
    rates = KeyRates(settings.rate_limit_per_second, settings.rate_limit_burst)  # every protocol

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        repository = ModelRepository(settings.model_repository)
        # One store for everything the replicas share: sessions, predictions awaiting
        # feedback, online (ACI) levels and counters.
        state_store = open_state_store(
            settings.redis_url,
            prefix=settings.state_store_prefix,
            in_process_caps={PREDICTIONS_NAMESPACE: settings.in_process_max_predictions},
            **({"pool_timeout": settings.redis_pool_timeout_seconds} if settings.redis_url else {}),
        )
        calibrations = CalibrationStore(repository)
        dataplane = DataPlane(
            repository,
            InputLimits(settings.max_batch_size, settings.max_sequence_length),
            policy=CalibrationPolicy(
                allow_uncalibrated=settings.allow_uncalibrated,
                abstain_set_size=settings.abstain_set_size,
            ),
            calibrations=calibrations,
            feedback=FeedbackLog(
                state_store,
                calibrations,
                ttl_seconds=settings.feedback_ttl_seconds,
                aci_gamma=settings.aci_gamma,
            ),
            draws=ConformalDraws(
                None
                if settings.conformal_key is None
                else settings.conformal_key.get_secret_value()
            ),
        )
        sessions = SessionManager(state_store, dataplane, SessionSettings.from_settings(settings))
        app.state.settings = settings
        app.state.state_store = state_store
        app.state.dataplane = dataplane
        app.state.sessions = sessions
        # Per-key session and job counts: in Redis (all replicas) when the store is Redis.
        app.state.sessions_per_key = key_quota(state_store, "quota-sessions")
        app.state.jobs_per_key = key_quota(state_store, "quota-jobs")
        rates.share_through(state_store)  # one bucket per key for every replica with Redis
        warn_if_open(keys, settings.host)
        gc.set_threshold(*GC_THRESHOLDS)
        root = settings.model_repository.resolve()
        if not root.is_dir():
            logger.warning("model repository %s does not exist: no models to serve", root)
        names = await run_in_threadpool(repository.list_models)
        logger.info("serving models from %s: %s", root, ", ".join(names) or "none")
        logger.info("session state: %s", _describe_store(settings))
        if settings.preload_models:
            preload = asyncio.ensure_future(run_in_threadpool(dataplane.preload))
            preload.add_done_callback(_freeze_startup_objects)
        else:
            dataplane.ready = True
            preload = None
            _freeze_startup_objects()
        watcher = asyncio.ensure_future(
            watch_store(state_store, dataplane, preload, settings.store_check_seconds)
        )
        grpc_endpoint = None
        try:  # a gRPC port that cannot be had stops the start, after the cleanup below
            if settings.grpc_enabled:
                grpc_endpoint = await start_grpc(
                    settings, dataplane=dataplane, sessions=sessions, keys=keys, rates=rates
                )
            app.state.grpc_port = None if grpc_endpoint is None else grpc_endpoint.port
            yield
        finally:
            if grpc_endpoint is not None:
                await grpc_endpoint.stop()
            watcher.cancel()
            if preload is not None:
                await preload  # a load in a worker thread cannot be cancelled; let it finish
            await sessions.close()
            await dataplane.close()
            await state_store.close()
            gc.unfreeze()  # what start-up built can be collected again (an app started anew)

    app = FastAPI(
        title="neuroserve",
        version=v2.server_version(),
        summary="Uncertainty-aware inference for stateful neuromorphic models.",
        lifespan=lifespan,
        docs_url=None,  # served by install_api_docs, from local assets
        redoc_url=None,
        # FastAPI's native OpenTelemetry, when asked for: otherwise it still looks up the
        # global providers on every request.
        telemetry=dict.fromkeys(("tracing", "metrics", "logs"), settings.opentelemetry),
    )
    # The last added runs first: metrics, then the key check, the key's rate, the body size,
    # and innermost the hot routes' fast path.
    app.add_middleware(FastPaths, routes=hot_routes(), enabled=settings.fast_paths)
    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestRateLimit, rates=rates)
    app.add_middleware(ApiKeyAuth, keys=keys)
    app.add_middleware(metrics_route.RequestMetricsMiddleware)  # outermost: times 401/413/429 too
    install_error_handlers(app)
    # Routes match in order: the hot paths (session steps, predictions) first.
    app.include_router(v1_sessions.router)
    app.include_router(v1_models.router)
    app.include_router(v1_versions.router)
    app.include_router(v1_feedback.router)
    app.include_router(v1_generate.router)
    app.include_router(v1_finetune.router)
    app.include_router(v2.router)
    app.include_router(metrics_route.router)
    install_api_docs(app)
    return app
