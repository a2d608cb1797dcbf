"""Open Inference Protocol (KServe V2) server routes: metadata, liveness and readiness.

Live means the process answers; ready means start-up (model preload) has finished. Stock
clients (`tritonclient.http`) only look at the status code: 200 for true, 503 for not ready.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.schemas import Liveness, Readiness, ServerMetadata

router = APIRouter(prefix="/v2", tags=["v2"])

SERVER_NAME = "neuroserve"
# Optional protocol extensions we implement (none yet: sequences come with sessions).
EXTENSIONS: list[str] = []


def server_version() -> str:
    try:
        return version(SERVER_NAME)
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


@router.get("", response_model=ServerMetadata, summary="Server metadata")
def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)


@router.get("/health/live", response_model=Liveness, summary="Liveness")
def live() -> Liveness:
    return Liveness(live=True)


@router.get(
    "/health/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Still starting up."}},
    summary="Readiness",
)
def ready(request: Request) -> Readiness | JSONResponse:
    dataplane = getattr(request.app.state, "dataplane", None)
    is_ready = dataplane is not None and dataplane.ready
    if not is_ready:
        return JSONResponse(Readiness(ready=False).model_dump(), status_code=503)
    return Readiness(ready=True)
