"""What one session step carries through its batch, and the batch's work in the worker thread:
advancing every session's state by its chunk and attaching each step's answer.

The session plane (`service.sessions.plane`) gathers the steps, loads and stores the states;
the functions here run between the load and the store.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from service.batching import run_chunks
from service.dataplane.inputs import out_of_range_warning
from service.dataplane.online_levels import OnlineLevel
from service.dataplane.predictions import ConformalOptions, PredictionBatch
from service.sessions.runners import SessionRunner
from service.sessions.types import SessionInfo, StepAnswer, StepOutcome
from service.state.codec import StateRecord
from service.state.store import VersionedState

# How a batch's steps are answered: called in the batch's worker thread with the (not yet
# written) outcomes of the steps that passed it, once per batch; one answer, or an exception
# that fails that step without writing it, per outcome (`service.sessions.answers`).
Answerer = Callable[[Sequence[StepOutcome]], Sequence[StepAnswer | Exception]]


# ---- what a step carries ----------------------------------------------------------------------


@dataclass(frozen=True)
class SessionMeta:
    """What never changes during a session's life, read from its stored header."""

    model: str
    version: str
    backend: str
    created_at: float
    metadata: Mapping[str, Any]  # alpha, score, options, owner, ttl_seconds

    @classmethod
    def of(cls, record: StateRecord) -> SessionMeta:
        return cls(record.model, record.version, record.backend, record.created_at, record.metadata)

    def matches(self, record: StateRecord) -> bool:
        """False when the stored session was deleted and re-created since this was read."""
        return record.created_at == self.created_at and record.metadata == self.metadata

    @property
    def ttl(self) -> float:
        return float(self.metadata["ttl_seconds"])

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.metadata["options"])

    @functools.cached_property
    def conformal(self) -> ConformalOptions:
        """The conformal options the session was created with."""
        return ConformalOptions(
            alpha=float(self.metadata["alpha"]),
            score=str(self.metadata["score"]),
            online=bool(self.metadata.get("online", False)),
            never_empty=self.metadata.get("never_empty"),
        )


@dataclass
class StepJob:
    """One step of one session, waiting for its batch."""

    key: str
    session_id: str
    meta: SessionMeta
    group: SessionRunner  # the runner its session shares with others: the batching key
    inputs: Tensor  # [T, F] or [T]
    per_step: bool
    conformal: ConformalOptions
    preloaded: VersionedState | None = None
    online_level: OnlineLevel | None = None

    @property
    def owner(self) -> str | None:
        return self.meta.metadata.get("owner")


# ---- the batch's work in the worker thread -----------------------------------------------------


def advance(
    group: SessionRunner, jobs: list[StepJob], states: list[VersionedState]
) -> list[tuple[StateRecord, StepOutcome | BaseException]]:
    """Run the chunks as one batched step and make each session's next record and outcome.
    Runs in a worker thread."""
    started = time.perf_counter()
    results = run_chunks(group.runner, [s.record.tensors for s in states], [j.inputs for j in jobs])
    compute_seconds = time.perf_counter() - started
    now = time.time()
    advanced: list[tuple[StateRecord, StepOutcome | BaseException]] = []
    value_range = group.card.config["input"].get("value_range")
    for job, state, result in zip(jobs, states, results, strict=True):
        steps = int(job.inputs.shape[0])
        record = state.record.advance(result.state, steps, now=now)
        usage = {**result.usage, "steps": steps, "compute_seconds": compute_seconds}
        note = (
            None
            if not job.inputs.is_floating_point()
            else (out_of_range_warning(job.inputs, value_range))
        )
        outcome = StepOutcome(
            info=session_info(job.session_id, record, now + job.meta.ttl),
            logits=result.logits[..., -1, :],  # [C] or [S, C]
            step_logits=result.logits if job.per_step else None,
            usage=usage,
            card=group.card,
            conformal=job.conformal,
            online_level=job.online_level,
            warnings=(note,) if note else (),
        )
        advanced.append((record, outcome))
    return advanced


def answer_batches(outcome: StepOutcome) -> list[PredictionBatch]:
    """The prediction batches of a step's answer: the last row's, then every row's if asked."""
    if outcome.answer is None:
        return []
    last, steps = outcome.answer
    return [last] if steps is None else [last, steps]


def attach_answers(
    answers: Answerer, advanced: list[tuple[StateRecord, StepOutcome | BaseException]]
) -> None:
    """Answer the batch's steps with one call, in place; a refused answer fails its step."""
    positions = [i for i, (_, outcome) in enumerate(advanced) if isinstance(outcome, StepOutcome)]
    outcomes = [advanced[i][1] for i in positions]
    try:
        built = list(answers(outcomes))  # type: ignore[arg-type]
        if len(built) != len(positions):
            raise RuntimeError(f"{len(built)} answers for {len(positions)} steps")
    except Exception as error:  # e.g. NotCalibratedError: those steps fail, unwritten
        built = [error] * len(positions)
    for i, answer in zip(positions, built, strict=True):
        record, outcome = advanced[i]
        if isinstance(answer, BaseException):
            advanced[i] = (record, answer)
        else:
            outcome.answer = answer  # type: ignore[union-attr]


# ---- small helpers ----------------------------------------------------------------------------


def session_info(session_id: str, record: StateRecord, expires_at: float) -> SessionInfo:
    metadata = record.metadata
    return SessionInfo(
        session_id=session_id,
        model=record.model,
        version=record.version,
        backend=record.backend,
        alpha=float(metadata["alpha"]),
        score=str(metadata["score"]),
        step=record.step,
        created_at=record.created_at,
        expires_at=expires_at,
        options=dict(metadata["options"]),
        early_decision=metadata.get("early_decision"),
        online=bool(metadata.get("online", False)),
        never_empty=metadata.get("never_empty"),
    )
