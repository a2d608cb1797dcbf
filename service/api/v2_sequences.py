"""Triton's sequence parameters on the session plane: each inference request of a sequence
(`parameters.sequence_id`) is one step of a session, created by `sequence_start` and deleted
after `sequence_end`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from models.repository import ModelCard
from service.api.v2_codec import DecodedTensor, V2BadRequestError
from service.api.v2_infer import InferParameters, conformal_options, feature_batch, prompt_batch
from service.dataplane.inputs import encode_prompts
from service.dataplane.plane import TORCH_BACKEND, DataPlane
from service.dataplane.predictions import ClassPrediction
from service.errors import NotFoundError, ServiceUnavailableError
from service.sessions.plane import SessionManager

SEQUENCE_SESSION_PREFIX = "v2-sequence-"


def sequence_session_id(sequence_id: int | str) -> str:
    """The session behind a V2 sequence id (the session manager namespaces it further)."""
    return f"{SEQUENCE_SESSION_PREFIX}{sequence_id}"


def sequence_sessions(request: Request) -> Any:
    """The app's session manager, which sequences run on (503 when it is not running)."""
    sessions = getattr(request.app.state, "sessions", None)
    if sessions is None:
        raise ServiceUnavailableError("sequences need the session manager, which is not running")
    return sessions


async def run_sequence_step(
    sessions: SessionManager,
    owner: str | None,
    dataplane: DataPlane,
    card: ModelCard,
    tensor: DecodedTensor,
    params: InferParameters,
    sequence_id: int | str,
    url_version: str | None,
) -> tuple[list[ClassPrediction], dict[str, Any], str]:
    """One request of a Triton-style sequence, as one step of a session, for the caller
    `owner` (a sequence belongs to the key that started it); every protocol calls this.
    Returns the prediction, the response parameters and the backend the sequence runs on.

    `sequence_start` creates the session (409 if that sequence is still open); a request
    without it continues one (404 if there is none); `sequence_end` deletes it after the
    answer is built. A sequence belongs to the model (and version) it started on, and every
    input is checked before a session is created.
    """
    session_id = sequence_session_id(sequence_id)
    if card.config["input"]["kind"] == "tokens":
        prompts = prompt_batch(tensor)
        _check_single_sequence(len(prompts), sequence_id)
        (inputs,) = encode_prompts(prompts, card.config["vocabulary"], dataplane.limits)  # [T]
    else:
        batch = feature_batch(tensor, int(card.config["input"]["features"]))  # [N, T, F]
        _check_single_sequence(batch.shape[0], sequence_id)
        inputs = torch.from_numpy(batch[0].astype(np.float32))  # [T, F]
    if params.sequence_start:
        backend = params.backend or TORCH_BACKEND
        conformal_options(params, None, None)  # refuse a bad alpha/score before creating anything
        await run_in_threadpool(dataplane.calibration, card, backend)
        chosen = {"alpha": params.alpha, "score": params.score}
        info = await sessions.create(
            model=card.name,
            version=card.version,
            backend=backend,
            session_id=session_id,
            owner=owner,
            **{key: value for key, value in chosen.items() if value is not None},
        )
    else:
        try:
            info = await sessions.get(session_id, owner=owner)
        except NotFoundError:
            raise NotFoundError(
                f"no open sequence {sequence_id!r} (expired or never started); start "
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
    conformal = conformal_options(params, info.alpha, info.score)
    try:
        outcome = await sessions.step(session_id, inputs, owner=owner, conformal=conformal)
    except Exception:
        if params.sequence_start:  # a sequence that never took a step does not stay open
            await sessions.delete(session_id, owner=owner)
        raise
    last, _ = outcome.answer
    prediction = last.predictions[0]
    if params.sequence_end:
        await sessions.delete(session_id, owner=owner)
    sequence = {"sequence_id": sequence_id, "sequence_step": outcome.info.step}
    return [prediction], sequence, info.backend


def _check_single_sequence(n: int, sequence_id: int | str) -> None:
    if n != 1:
        raise V2BadRequestError(
            f"a request of sequence {sequence_id!r} carries one sequence (first dimension 1), "
            f"got {n}"
        )
