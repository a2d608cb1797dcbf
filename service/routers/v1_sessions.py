"""Native REST routes for stateful sessions (`/v1/sessions...`): a thin adapter over the
`SessionManager` (state, ordering, batching) and the dataplane's prediction builder
(calibration, conformal sets, feedback records)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from service.dataplane import ClassPrediction, ConformalOptions, DataPlane
from service.routers import get_dataplane
from service.routers.metrics import label_request
from service.schemas import (
    ErrorResponse,
    Prediction,
    SessionCreateRequest,
    SessionResponse,
    SessionStepRequest,
    SessionStepResponse,
    Usage,
)
from service.sessions import SessionInfo, SessionManager, StepOutcome

router = APIRouter(prefix="/v1", tags=["sessions"])


def get_sessions(request: Request) -> SessionManager:
    """FastAPI dependency: the session manager the app's lifespan created."""
    return request.app.state.sessions


SessionsDependency = Annotated[SessionManager, Depends(get_sessions)]
DataPlaneDependency = Annotated[DataPlane, Depends(get_dataplane)]


def _error(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": description}}


_UNKNOWN = _error(404, "Unknown, deleted or expired session.")
_CONFLICT = _error(
    409,
    "The session's stored state does not fit the model now served (redeployed with another "
    "state shape), or it kept changing under concurrent writers.",
)
_UNAVAILABLE = _error(503, "The state store (or the backend) cannot serve right now.")
_BAD_INPUT = _error(422, "Malformed input; the message says where.")


def _session_out(info: SessionInfo) -> SessionResponse:
    return SessionResponse(
        session_id=info.session_id,
        model=info.model,
        version=info.version,
        backend=info.backend,
        alpha=info.alpha,
        score=info.score,
        step=info.step,
        created_at=info.created_at,
        expires_at=info.expires_at,
        options=info.options,
    )


def _prediction_out(prediction: ClassPrediction) -> Prediction:
    # Every field the wire schema knows, so fields the builder adds later come along.
    fields = {name: getattr(prediction, name) for name in Prediction.model_fields}
    return Prediction(**fields)


@router.post(
    "/sessions",
    status_code=201,
    response_model=SessionResponse,
    responses={**_error(404, "Unknown model or version."), **_BAD_INPUT, **_UNAVAILABLE},
    summary="Start a session",
)
async def create_session(
    body: SessionCreateRequest, request: Request, sessions: SessionsDependency
) -> SessionResponse:
    label_request(request, model=body.model, backend=body.backend)
    info = await sessions.create(
        model=body.model,
        version=body.version,
        backend=body.backend,
        alpha=body.alpha,
        score=body.score,
        ttl_seconds=body.ttl_seconds,
        options=body.options,
    )
    return _session_out(info)


@router.get(
    "/sessions/{session_id}",
    response_model=SessionResponse,
    responses={**_UNKNOWN, **_UNAVAILABLE},
    summary="Describe a session (counts as use: its TTL restarts)",
)
async def get_session(
    session_id: str, request: Request, sessions: SessionsDependency
) -> SessionResponse:
    info = await sessions.get(session_id)
    label_request(request, model=info.model, backend=info.backend)
    return _session_out(info)


@router.delete(
    "/sessions/{session_id}",
    status_code=204,
    response_class=Response,
    responses={**_UNKNOWN, **_UNAVAILABLE},
    summary="End a session",
)
async def delete_session(session_id: str, sessions: SessionsDependency) -> Response:
    await sessions.delete(session_id)
    return Response(status_code=204)


@router.post(
    "/sessions/{session_id}/step",
    response_model=SessionStepResponse,
    responses={**_UNKNOWN, **_CONFLICT, **_BAD_INPUT, **_UNAVAILABLE},
    summary="Feed the next chunk of the session's sequence",
)
async def step_session(
    session_id: str,
    body: SessionStepRequest,
    request: Request,
    sessions: SessionsDependency,
    dataplane: DataPlaneDependency,
) -> SessionStepResponse:
    inputs = await sessions.inputs_from_json(session_id, body.inputs)
    outcome = await sessions.step(session_id, inputs, per_step=body.return_steps)
    info = outcome.info
    label_request(request, model=info.model, backend=info.backend)
    batch, steps = await run_in_threadpool(_build, dataplane, outcome)
    await dataplane.publish(batch, session_id=info.session_id)
    if steps is not None:
        await dataplane.publish(steps, session_id=info.session_id)
    usage = {**outcome.usage, "sequences": 1}
    return SessionStepResponse(
        session_id=info.session_id,
        model=info.model,
        version=info.version,
        backend=info.backend,
        step=info.step,
        expires_at=info.expires_at,
        calibrated=batch.calibrated,
        prediction=_prediction_out(batch.predictions[0]),
        step_predictions=(
            None if steps is None else [_prediction_out(p) for p in steps.predictions]
        ),
        usage=Usage(**usage),
    )


def _build(dataplane: DataPlane, outcome: StepOutcome) -> tuple[Any, Any]:
    """The prediction after the chunk and, when asked, one per step (as prediction batches)."""
    info = outcome.info
    conformal = ConformalOptions(alpha=info.alpha, score=info.score)

    def build(logits: Any, usage: dict[str, Any] | None) -> Any:
        return dataplane.build_predictions(
            outcome.card,
            info.backend,
            logits,
            usage,
            conformal=conformal,
            backend_options=info.options,
        )

    last = build(outcome.logits.unsqueeze(-2), outcome.usage)  # [1, C] or [S, 1, C]
    # The chunk's usage is counted once, with the last prediction.
    steps = None if outcome.step_logits is None else build(outcome.step_logits, None)  # T rows
    return last, steps
