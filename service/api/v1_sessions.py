"""Native REST routes for stateful sessions (`/v1/sessions...`): a thin adapter over the
session plane (`SessionManager`: state, ordering, batching, answers, publishing)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request, Response

from service.api.auth import Principal, PrincipalDependency, get_principal
from service.api.metrics_route import label_request
from service.api.route_helpers import ACCESS_ERRORS, TOO_LARGE, error_doc
from service.api.schemas.parameters import SessionId
from service.api.schemas.sessions import (
    SESSION_CREATE_EXAMPLES,
    SESSION_STEP_EXAMPLES,
    SessionCreateRequest,
    SessionResponse,
    SessionStepRequest,
    SessionStepResponse,
)
from service.sessions.plane import SessionManager
from service.sessions.types import SessionInfo

router = APIRouter(prefix="/v1", tags=["sessions"], responses=ACCESS_ERRORS)


async def get_sessions(request: Request) -> SessionManager:
    """FastAPI dependency: the session manager the app's lifespan created."""
    return request.app.state.sessions


SessionsDependency = Annotated[SessionManager, Depends(get_sessions)]


_UNKNOWN = error_doc(404, "Unknown, deleted or expired session.")
_CONFLICT = error_doc(
    409,
    "The session's stored state does not fit the model now served (redeployed with another "
    "state shape, or no longer serves its model), or it kept changing under concurrent writers.",
)
_UNAVAILABLE = error_doc(503, "The state store (or the backend) cannot serve right now.")
_BAD_INPUT = {**TOO_LARGE, **error_doc(422, "Malformed input; the message says where.")}


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
        early_decision=info.early_decision,
        online=info.online,
        never_empty=info.never_empty,
    )


async def _reserve_session(request: Request, principal: Principal) -> str | None:
    """A place for one more session of the key, or 429 at its limit of live sessions
    (counted across replicas with Redis: `service.api.limits`; keys only: open mode has the
    server-wide NEUROSERVE_MAX_SESSIONS). None in open mode."""
    if principal.owner is None:
        return None
    limit = request.app.state.settings.max_sessions_per_key
    return await request.app.state.sessions_per_key.reserve(
        principal.owner, limit, "live sessions", "NEUROSERVE_MAX_SESSIONS_PER_KEY"
    )


async def _note_session(request: Request, principal: Principal, info: SessionInfo) -> None:
    if principal.owner is not None:
        await request.app.state.sessions_per_key.seen(
            principal.owner, info.session_id, info.expires_at
        )


@router.post(
    "/sessions",
    status_code=201,
    response_model=SessionResponse,
    responses={
        **error_doc(404, "Unknown model or version."),
        **error_doc(409, "Early decisions asked of a model or backend without a calibrated rule."),
        **_BAD_INPUT,
        **error_doc(
            429,
            "The API key holds its limit of sessions (NEUROSERVE_MAX_SESSIONS_PER_KEY), or is "
            "over its request rate (NEUROSERVE_RATE_LIMIT_PER_SECOND).",
        ),
        **_UNAVAILABLE,
    },
    summary="Start a session",
)
async def create_session(
    body: Annotated[SessionCreateRequest, Body(openapi_examples=SESSION_CREATE_EXAMPLES)],
    request: Request,
    sessions: SessionsDependency,
    principal: PrincipalDependency,
) -> SessionResponse:
    """Open a stateful session on a model: its recurrent state is kept between steps, in the
    server's state store, until deleted or idle for its TTL."""
    label_request(request, model=body.model, backend=body.backend)
    reservation = await _reserve_session(request, principal)
    try:
        info = await sessions.create(
            owner=principal.owner,
            model=body.model,
            version=body.version,
            backend=body.backend,
            alpha=body.alpha,
            score=body.score,
            ttl_seconds=body.ttl_seconds,
            options=body.options,
            early_decision=(
                None if body.early_decision is None else body.early_decision.model_dump()
            ),
            online=body.online,
            never_empty=body.never_empty,
        )
        await _note_session(request, principal, info)
    finally:
        if reservation is not None:
            await request.app.state.sessions_per_key.gone(principal.owner, reservation)
    return _session_out(info)


@router.get(
    "/sessions/{session_id}",
    response_model=SessionResponse,
    responses={**_UNKNOWN, **_UNAVAILABLE},
    summary="Describe a session (counts as use: its TTL restarts)",
)
async def get_session(
    session_id: SessionId,
    request: Request,
    sessions: SessionsDependency,
    principal: PrincipalDependency,
) -> SessionResponse:
    """The session's model, settings, steps consumed so far and expiry."""
    info = await sessions.get(session_id, owner=principal.owner)
    await _note_session(request, principal, info)
    label_request(request, model=info.model, backend=info.backend)
    return _session_out(info)


@router.delete(
    "/sessions/{session_id}",
    status_code=204,
    response_class=Response,
    responses={**_UNKNOWN, **_UNAVAILABLE},
    summary="End a session",
)
async def delete_session(
    session_id: SessionId,
    request: Request,
    sessions: SessionsDependency,
    principal: PrincipalDependency,
) -> Response:
    """Forget the session and its state now."""
    await sessions.delete(session_id, owner=principal.owner)
    if principal.owner is not None:
        await request.app.state.sessions_per_key.gone(principal.owner, session_id)
    return Response(status_code=204)


@router.post(
    "/sessions/{session_id}/step",
    response_model=SessionStepResponse,
    responses={**_UNKNOWN, **_CONFLICT, **_BAD_INPUT, **_UNAVAILABLE},
    summary="Feed the next chunk of the session's sequence",
)
async def step_session(
    session_id: SessionId,
    body: Annotated[SessionStepRequest, Body(openapi_examples=SESSION_STEP_EXAMPLES)],
    request: Request,
) -> Response:
    """Advance the session's state through the chunk and answer the prediction after its last
    step (with an early decision where the session asked for one)."""
    # A hot route (service.api.fast_paths calls it directly): no dependencies, and the app's
    # objects straight from the request.
    sessions: SessionManager = request.app.state.sessions
    principal = get_principal(request)
    outcome = await sessions.step(
        session_id, body.inputs, per_step=body.return_steps, owner=principal.owner
    )
    await _note_session(request, principal, outcome.info)
    label_request(request, model=outcome.info.model, backend=outcome.info.backend)
    return Response(SessionStepResponse.json_of(outcome), media_type="application/json")
