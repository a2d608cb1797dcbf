"""Late labels: remembered predictions, feedback, live coverage and the online (ACI) levels.

Every prediction is stored in the state store under its id for `ttl` seconds
(`PredictionRecord`: model, version, backend, calibration, position, score, level, the
calibrated probabilities, the set as served with the U a randomised score drew, the top label
and confidence, the session, and the online level it was served at, if any).
`POST /v1/feedback` quotes the id with the true label; `FeedbackLog.submit` then

- refuses an unknown or expired id (404), another key's id (404), a label outside the model's
  labels (422) and a second label for the same id (409; an atomic counter per id decides, so
  two replicas cannot both accept one),
- counts whether the served set covered the label and whether the top label was right
  (counters per (model, version, backend, calibration), moved together in one atomic store
  operation, and the Prometheus series),
- for a prediction served online, records the served set's error in the level it was served
  at (`service.dataplane.online_levels`): the level of its key, position bucket, score and alpha, or
  its session's own level. Only the sets actually served move a level, so Gibbs and Candès'
  bound holds for the sequence of sets the clients received.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from service.dataplane.calibration_store import CalibrationStore
from service.dataplane.online_levels import LevelKey, OnlineLevels
from service.errors import BadInputError, ConflictError, NotFoundError
from service.metrics import record_feedback, set_aci_alpha
from service.state.store import StateStore

PREDICTIONS_NAMESPACE = "prediction"
CLAIMS_NAMESPACE = "feedback-claim"
LIVE_NAMESPACE = "calibration-live"
_PREDICTION_ID = re.compile(r"[0-9a-f]{32}")  # 128 bits in hex, as the dataplane makes them
_MICRO = 1_000_000  # target coverage is summed in millionths: counters are integers
LIVE_COUNTERS = ("feedback", "covered", "correct", "target_micro")


@dataclass  # not frozen: built per prediction, where a frozen __init__ costs ~3x
class PredictionRecord:
    """What the server remembers of one prediction until its label arrives."""

    id: str
    model: str
    version: str
    backend: str
    top_index: int
    confidence: float
    probabilities: list[float]  # calibrated; raw softmax when not calibrated
    set_indices: list[int] | None  # the set as served; None when not calibrated (no set)
    score: str | None
    alpha: float | None  # the level the set was built at (its online level when online)
    target_alpha: float | None  # the miscoverage the request asked for
    online: bool
    session_id: str | None
    created: float = field(default_factory=time.time)  # unix seconds
    owner: str | None = None  # the API key's principal that made it (None in open mode)
    position: int | None = None  # steps read / context length when it was made
    uniform: float | None = None  # the U of a randomised score's set
    calibration_id: str | None = None
    level: dict[str, Any] | None = None  # the online level it was served at (`LevelKey`)

    def to_json(self) -> dict[str, Any]:
        # Every field is a JSON scalar or a flat list/dict of them: a shallow copy does, and
        # costs a fraction of `asdict`'s deep copy on the hot path.
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Any) -> PredictionRecord:
        fields = set(cls.__dataclass_fields__)
        optional = {"owner", "position", "uniform", "calibration_id", "level"}
        # Records written by earlier versions lack the optional fields.
        if not isinstance(data, dict) or not fields - optional <= set(data) <= fields:
            raise ValueError(f"stored prediction record is malformed: {str(data)[:200]}")
        return cls(**data)


@dataclass(frozen=True)
class FeedbackResult:
    prediction_id: str
    model: str
    version: str
    backend: str
    label: str
    correct: bool  # the top label was the true one
    covered: bool | None  # the served set held the label (None: no set was served)
    aci_alpha: float | None  # the online level after this label (online predictions only)
    coverage: float | None  # running coverage of the served sets, this label included
    feedback_count: int


@dataclass(frozen=True)
class LiveCalibration:
    """Feedback so far for one (model, version, backend, calibration)."""

    feedback: int
    covered: int
    correct: int
    target_coverage: float | None  # mean 1 - alpha the labelled predictions asked for

    def to_dict(self) -> dict[str, Any]:
        def ratio(count: int) -> float | None:
            return count / self.feedback if self.feedback else None

        return {
            "feedback": self.feedback,
            "covered": self.covered,
            "coverage": ratio(self.covered),
            "target_coverage": self.target_coverage,
            "correct": self.correct,
            "accuracy": ratio(self.correct),
        }


def label_index(label: object, labels: list[str]) -> int:
    """A label by name ("7"), or by its index (7) in the model's labels; BadInputError otherwise."""
    if isinstance(label, str):
        for index, name in enumerate(labels):
            if name == label:
                return index
    elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(labels):
        return label
    shown = ", ".join(repr(name) for name in labels[:20])
    more = f" and {len(labels) - 20} more" if len(labels) > 20 else ""
    raise BadInputError(
        f"label {label!r} is not one of the model's {len(labels)} labels ({shown}{more}); "
        f"send a label name or its index 0..{len(labels) - 1}"
    )


class FeedbackLog:
    """Prediction records, feedback counters and online levels in one state store."""

    def __init__(
        self,
        store: StateStore,
        calibrations: CalibrationStore,
        *,
        ttl_seconds: float,
        aci_gamma: float,
    ) -> None:
        if not (math.isfinite(ttl_seconds) and ttl_seconds > 0):
            raise ValueError(f"feedback ttl must be positive seconds, got {ttl_seconds!r}")
        self.store = store
        self.calibrations = calibrations
        self.ttl_seconds = float(ttl_seconds)
        self.levels = OnlineLevels(store, gamma=aci_gamma, session_ttl_seconds=ttl_seconds)

    # ---- remembering ------------------------------------------------------------------------

    async def remember(self, records: list[PredictionRecord]) -> None:
        """Keep the records for their feedback window, all in one store round trip."""
        await self.store.put_json_many(
            PREDICTIONS_NAMESPACE, [(r.id, r.to_json()) for r in records], self.ttl_seconds
        )

    async def recall(self, prediction_id: str) -> PredictionRecord:
        """The stored record, or NotFoundError (unknown, malformed or expired id)."""
        if not isinstance(prediction_id, str) or not _PREDICTION_ID.fullmatch(prediction_id):
            raise NotFoundError(
                f"no prediction with id {prediction_id!r}: ids are the 32 hex digits a "
                "prediction returned"
            )
        raw = await self.store.get_json(PREDICTIONS_NAMESPACE, prediction_id)
        if raw is None:
            raise NotFoundError(
                f"no prediction with id {prediction_id!r}: unknown, older than the feedback "
                f"window of {self.ttl_seconds:g} s, or (without Redis) not among the "
                "NEUROSERVE_IN_PROCESS_MAX_PREDICTIONS most recent"
            )
        return PredictionRecord.from_json(raw)

    # ---- counters ---------------------------------------------------------------------------

    @staticmethod
    def _live_key(model: str, version: str, backend: str, calibration_id: str | None) -> str:
        return f"{model}/{version}/{backend}/{calibration_id or '-'}"

    async def live(
        self,
        model: str,
        version: str,
        backend: str,
        calibration_id: str,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """Feedback so far on this calibration, and `owner`'s online levels."""
        counts = await self.store.get_fields(
            LIVE_NAMESPACE, self._live_key(model, version, backend, calibration_id)
        )
        feedback = counts.get("feedback", 0)
        live = LiveCalibration(
            feedback=feedback,
            covered=counts.get("covered", 0),
            correct=counts.get("correct", 0),
            target_coverage=(
                counts.get("target_micro", 0) / _MICRO / feedback if feedback else None
            ),
        )
        levels = await self.levels.levels_of(model, version, backend, calibration_id, owner)
        return {**live.to_dict(), "online_levels": levels}

    # ---- feedback ---------------------------------------------------------------------------

    async def submit(
        self, prediction_id: str, label: object, owner: str | None = None
    ) -> FeedbackResult:
        record = await self.recall(prediction_id)
        if record.owner != owner:  # another key's prediction: as if it did not exist
            raise NotFoundError(f"no prediction with id {prediction_id!r}")
        card = await run_in_threadpool(
            self.calibrations.repository.card, record.model, record.version
        )
        labels = card.config.get("labels") or card.config.get("vocabulary") or []
        index = label_index(label, labels)
        claims = await self.store.incr(CLAIMS_NAMESPACE, prediction_id, 1, ttl=self.ttl_seconds)
        if claims > 1:
            raise ConflictError(f"prediction {prediction_id!r} already received its label")
        correct = index == record.top_index
        result = {
            "prediction_id": prediction_id,
            "model": record.model,
            "version": record.version,
            "backend": record.backend,
            "label": labels[index],
            "correct": correct,
        }
        if record.set_indices is None or record.score is None:
            return FeedbackResult(
                **result, covered=None, aci_alpha=None, coverage=None, feedback_count=0
            )
        covered = index in record.set_indices
        aci_alpha = None
        if record.level is not None:
            level = await self.levels.record(LevelKey.from_dict(record.level), covered)
            aci_alpha = level.alpha_t
            set_aci_alpha(record.model, record.backend, min(max(aci_alpha, 0.0), 1.0))
        target = record.target_alpha if record.target_alpha is not None else record.alpha or 0.0
        counts = await self.store.incr_fields(
            LIVE_NAMESPACE,
            self._live_key(record.model, record.version, record.backend, record.calibration_id),
            {
                "feedback": 1,
                "covered": int(covered),
                "correct": int(correct),
                "target_micro": round(_MICRO * (1.0 - target)),
            },
        )
        record_feedback(
            record.model, record.backend, record.score, covered, record.confidence, correct
        )
        return FeedbackResult(
            **result,
            covered=covered,
            aci_alpha=aci_alpha,
            coverage=counts["covered"] / counts["feedback"],
            feedback_count=counts["feedback"],
        )
