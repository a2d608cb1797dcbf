"""What a session is and what one of its steps produced: the values the session plane
(`service.sessions.plane`) hands to every protocol (v1 REST, V2 sequences, websocket generation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from models.repository import ModelCard
from service.dataplane.online_levels import OnlineLevel
from service.dataplane.predictions import ConformalOptions, PredictionBatch

# A step's answer: the prediction after its chunk, and (when asked) one per row of the chunk.
StepAnswer = tuple[PredictionBatch, PredictionBatch | None]


@dataclass  # not frozen: built per step, where a frozen __init__ costs ~3x
class SessionInfo:
    session_id: str
    model: str
    version: str
    backend: str
    alpha: float
    score: str
    step: int  # total time steps consumed so far
    created_at: float  # unix time
    expires_at: float  # unix time; every use pushes it back by the session's TTL
    options: dict  # backend options (e.g. t_inference)
    early_decision: dict | None = None  # {"max_set_size": k} when the session asked for it
    online: bool = False  # sets at the session's own online (ACI) level
    never_empty: bool | None = None  # None: the server's default (never empty unless online)

    @property
    def conformal(self) -> ConformalOptions:
        """What the session's answers ask of calibration."""
        return ConformalOptions(
            alpha=self.alpha, score=self.score, online=self.online, never_empty=self.never_empty
        )


@dataclass
class StepOutcome:
    """A step's result. The batch fills in `answer` (and `decision`) in its worker thread,
    before anyone else sees the outcome: set in place, not copied (a copy per row costs)."""

    info: SessionInfo  # after the step (step count updated)
    logits: Tensor  # [C] after the last step of the chunk, or [S, C] for sampling backends
    step_logits: Tensor | None  # [T, C] (or [S, T, C]) per step when per_step=True
    usage: dict  # Usage.to_dict() of this chunk, plus steps, batch_size, compute_seconds
    card: ModelCard  # the model version that ran (labels, calibration lookups)
    conformal: ConformalOptions  # what this step's answer asks of calibration
    online_level: OnlineLevel | None = None  # the session's level, read before the step
    warnings: tuple[str, ...] = ()  # e.g. inputs far outside the training range
    answer: StepAnswer | None = None  # built in the batch, before the state was written
    decision: dict[str, Any] | None = None  # the early decision, when the session asked

    @property
    def positions(self) -> list[int]:
        """Steps read after each row of `step_logits` (or after the last step alone)."""
        last = self.info.step
        count = 1 if self.step_logits is None else self.step_logits.shape[-2]
        return list(range(last - count + 1, last + 1))
