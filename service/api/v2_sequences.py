"""Triton's sequence parameters on the session plane, whatever the protocol: each inference
request of a sequence (`parameters.sequence_id`) is one step of a session, created by
`sequence_start` (which restarts a sequence that is still open, as Triton does) and deleted
after `sequence_end`. Messages name the sequence as the client knows it, never the session
key behind it."""

from __future__ import annotations

import json
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool

from models.repository import ModelCard
from service.api.v2_codec import DecodedTensor, V2BadRequestError
from service.api.v2_inputs import feature_batch, prompt_batch
from service.api.v2_parameters import InferParameters
from service.dataplane.inputs import encode_prompts
from service.dataplane.plane import TORCH_BACKEND, DataPlane
from service.dataplane.predictions import ClassPrediction, ConformalOptions
from service.errors import ConflictError, NeuroserveError, NotFoundError, ServiceUnavailableError

SEQUENCE_SESSION_PREFIX = "v2-sequence-"


def sequence_session_id(sequence_id: int | str) -> str:
    """The session behind a V2 sequence id (the session manager namespaces it further)."""
    return f"{SEQUENCE_SESSION_PREFIX}{sequence_id}"


@dataclass(frozen=True)
class SequenceStep:
    # The prediction after this request's chunk, or one per step of it (return_steps).
    predictions: list[ClassPrediction]
    backend: str
    parameters: dict[str, Any]  # the response's: sequence_id, sequence_step, decision_*
    warnings: list[str] = field(default_factory=list)


async def run_sequence_step(
    dataplane: DataPlane,
    sessions: Any,
    card: ModelCard,
    tensor: DecodedTensor,
    params: InferParameters,
    *,
    url_version: str | None,
    owner: str | None,
) -> SequenceStep:
    """One request of a Triton-style sequence, as one step of a session.

    `sequence_start` creates the session (deleting the sequence's open one first); a request
    without it continues one (404 if there is none); `sequence_end` deletes it after the
    answer is built. A sequence belongs to the model (and version) it started on and to the
    key that started it, and every input is checked before a session is created.
    """
    if sessions is None:
        raise ServiceUnavailableError("sequences need the session manager, which is not running")
    sequence_id = params.sequence_id
    assert sequence_id is not None  # the caller routes only sequence requests here
    session_id = sequence_session_id(sequence_id)
    try:
        return await _step(
            dataplane, sessions, card, tensor, params, sequence_id, session_id, url_version, owner
        )
    except NeuroserveError as error:
        if session_id not in error.message:
            raise
        # Say "sequence 43" where the session plane said "session 'v2-sequence-43'".
        message = error.message.replace(f"session {session_id!r}", f"sequence {sequence_id!r}")
        error.message = message.replace(session_id, str(sequence_id))
        error.args = (error.message,)
        raise


async def _step(
    dataplane: DataPlane,
    sessions: Any,
    card: ModelCard,
    tensor: DecodedTensor,
    params: InferParameters,
    sequence_id: int | str,
    session_id: str,
    url_version: str | None,
    owner: str | None,
) -> SequenceStep:
    inputs = _chunk(dataplane, card, tensor, sequence_id)
    if params.sequence_start:
        backend = params.backend or TORCH_BACKEND
        info = await _start(dataplane, sessions, card, params, backend, session_id, owner)
    else:
        try:
            info = await sessions.get(session_id, owner=owner)
        except NotFoundError:
            raise NotFoundError(
                f"no open sequence {sequence_id!r} (expired, ended or never started); start "
                "one with parameters.sequence_start = true"
            ) from None
        if info.model != card.name or (url_version is not None and info.version != url_version):
            raise V2BadRequestError(
                f"sequence {sequence_id!r} belongs to model {info.model!r} version "
                f"{info.version}, not {card.name!r}"
                + (f" version {url_version}" if url_version is not None else "")
            )
        if params.backend is not None and params.backend != info.backend:
            raise V2BadRequestError(
                f"sequence {sequence_id!r} runs on backend {info.backend!r}; a sequence "
                f"cannot switch to {params.backend!r}"
            )
    conformal = _step_conformal(params, info.conformal)
    try:
        outcome = await sessions.step(
            session_id, inputs, per_step=params.return_steps, owner=owner, conformal=conformal
        )
    except Exception:
        if params.sequence_start:  # a sequence that never took a step does not stay open
            await sessions.delete(session_id, owner=owner)
        raise
    last, steps = outcome.answer
    if params.sequence_end:
        await sessions.delete(session_id, owner=owner)
    parameters: dict[str, Any] = {"sequence_id": sequence_id, "sequence_step": outcome.info.step}
    if outcome.decision is not None:
        parameters.update(decision_parameters(outcome.decision))
    return SequenceStep(
        predictions=list(steps.predictions) if steps is not None else [last.predictions[0]],
        backend=info.backend,
        parameters=parameters,
        warnings=list(last.warnings),
    )


def decision_parameters(decision: dict[str, Any]) -> dict[str, Any]:
    """An early decision as response parameters (scalars, as gRPC's InferParameter holds):
    `decision_stop`, `decision_checkpoint`, `decision_coverage` and `decision_set` (the set at
    alpha / K as JSON text)."""
    return {
        "decision_stop": bool(decision["stop"]),
        "decision_checkpoint": int(decision["checkpoint"]),
        "decision_coverage": float(decision["guaranteed_coverage"]),
        "decision_set": json.dumps(list(decision["prediction_set"])),
    }


async def _start(
    dataplane: DataPlane,
    sessions: Any,
    card: ModelCard,
    params: InferParameters,
    backend: str,
    session_id: str,
    owner: str | None,
) -> Any:
    """Create the sequence's session; an open one of the same id is ended first (Triton
    starts the sequence anew)."""
    chosen = {
        "alpha": params.alpha,
        "score": params.score,
        "online": params.online,
        "never_empty": params.never_empty,
        "options": params.backend_options,
        "ttl_seconds": params.ttl_seconds,
        "early_decision": (
            None
            if params.early_decision_max_set_size is None
            else {"max_set_size": params.early_decision_max_set_size}
        ),
    }
    # Refuse bad options and combinations before anything is created or ended.
    _step_conformal(params, ConformalOptions(online=bool(params.online)))
    await run_in_threadpool(dataplane.calibration, card, backend)
    create = {
        "model": card.name,
        "version": card.version,
        "backend": backend,
        "session_id": session_id,
        "owner": owner,
        **{key: value for key, value in chosen.items() if value is not None},
    }
    try:
        return await sessions.create(**create)
    except ConflictError:
        with suppress(NotFoundError):  # it may have expired meanwhile
            await sessions.delete(session_id, owner=owner)
        return await sessions.create(**create)


def _step_conformal(params: InferParameters, session: ConformalOptions) -> ConformalOptions:
    """A sequence request's options over its session's own (alpha, score, never_empty and
    online as the sequence started)."""
    chosen = {
        "alpha": params.alpha,
        "score": params.score,
        "class_conditional": params.class_conditional,
        "never_empty": params.never_empty,
        "max_set_size": params.max_set_size,
    }
    return replace(session, **{key: value for key, value in chosen.items() if value is not None})


def _chunk(
    dataplane: DataPlane, card: ModelCard, tensor: DecodedTensor, sequence_id: int | str
) -> torch.Tensor:
    """The request's one sequence as a session chunk: float [T, F] features or long [T]
    token ids (400 unless the request carries exactly one sequence)."""
    if card.config["input"]["kind"] == "tokens":
        prompts = prompt_batch(tensor)
        _check_single_sequence(len(prompts), sequence_id)
        (ids,) = encode_prompts(prompts, card.config["vocabulary"], dataplane.limits)  # [T]
        return ids
    batch = feature_batch(tensor, int(card.config["input"]["features"]))  # [N, T, F]
    _check_single_sequence(batch.shape[0], sequence_id)
    return torch.from_numpy(batch[0].astype(np.float32))  # [T, F]


def _check_single_sequence(n: int, sequence_id: int | str) -> None:
    if n != 1:
        raise V2BadRequestError(
            f"a request of sequence {sequence_id!r} carries one sequence (first dimension 1), "
            f"got {n}"
        )
