"""Late labels: remembered predictions, feedback, live coverage and the online (ACI) level.

Every prediction is stored in the state store under its id for `ttl` seconds
(`PredictionRecord`: model, version, backend, score, level, the calibrated probabilities, the
set, the top label and confidence, the session). `POST /v1/feedback` quotes the id with the
true label; `FeedbackLog.submit` then

- refuses an unknown or expired id (404), a label outside the model's labels (422) and a
  second label for the same id (409; an atomic counter per id decides, so two replicas
  cannot both accept one),
- counts whether the returned set covered the label and whether the top label was right
  (running counters per (model, version, backend), and the Prometheus series),
- moves the ACI level of (model, version, backend), and of the session when there is one.

ACI state as two counters. Gibbs & Candès' update alpha_{t+1} = alpha_t + gamma (alpha -
err_t) telescopes to

    alpha_T = alpha_1 + gamma (T alpha - sum_t err_t),

so with alpha_1 = alpha the level is a function of two integers: labelled predictions T and
misses sum err_t. Both live in the store as atomic counters (`incr`), so feedback arriving at
several replicas at once never loses an update, which a read-modify-write of the level
would. `AdaptiveConformal.update`, applied one label at a time, is the reference this must
agree with (tests/service/test_feedback.py).

What ACI checks. Labels are the time steps of the online sequence: err_t is whether the
label falls outside the set built from the remembered calibrated probabilities at the
level alpha_t current when the label arrives (raw set, never_empty off, marginal). The
long-run bound holds for exactly those sets, whatever the request asked for; an `online`
request is answered at the same current level, so with prompt feedback the two coincide.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool

from calibration import AdaptiveConformal, CalibrationArtifact
from service.calibration_store import CalibrationStore
from service.errors import BadInputError, ConflictError, NotFoundError
from service.metrics import record_feedback, set_aci_alpha
from service.state_store import StateStore

PREDICTIONS_NAMESPACE = "prediction"
CLAIMS_NAMESPACE = "feedback-claim"
LIVE_NAMESPACE = "calibration-live"
SESSION_ACI_NAMESPACE = "aci-session"
_PREDICTION_ID = re.compile(r"[0-9a-f]{32}")  # uuid4 hex, as the dataplane makes them
_MICRO = 1_000_000  # target coverage is summed in millionths: counters are integers
LIVE_COUNTERS = ("feedback", "covered", "correct", "target_micro", "aci_steps", "aci_missed")


@dataclass(frozen=True)
class PredictionRecord:
    """What the server remembers of one prediction until its label arrives."""

    id: str
    model: str
    version: str
    backend: str
    top_index: int
    confidence: float
    probabilities: list[float]  # calibrated; raw softmax when not calibrated
    set_indices: list[int] | None  # None when not calibrated (no set was made)
    score: str | None
    alpha: float | None  # the level the set was built at (ACI's alpha_t when online)
    target_alpha: float | None  # the miscoverage the request asked for
    online: bool
    session_id: str | None
    created: float = field(default_factory=time.time)  # unix seconds
    owner: str | None = None  # the API key's principal that made it (None in open mode)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> PredictionRecord:
        fields = set(cls.__dataclass_fields__)
        # Records written before owners were kept lack "owner": they belong to nobody.
        if not isinstance(data, dict) or not fields - {"owner"} <= set(data) <= fields:
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
    covered: bool | None  # the returned set held the label (None: no set was returned)
    aci_covered: bool | None  # the set at the ACI level held it (None: not calibrated)
    aci_alpha: float | None  # the ACI level after this label
    session_aci_alpha: float | None
    coverage: float | None  # running coverage of the returned sets, this label included
    feedback_count: int


@dataclass(frozen=True)
class LiveCalibration:
    """Feedback so far for one (model, version, backend)."""

    feedback: int
    covered: int
    correct: int
    target_coverage: float | None  # mean 1 - alpha the labelled predictions asked for
    aci: AdaptiveConformal

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
            "aci": {
                "alpha": self.aci.alpha_t,
                "target_alpha": self.aci.target_alpha,
                "gamma": self.aci.gamma,
                "steps": self.aci.steps,
                "miscovered": self.aci.miscovered,
                "miscoverage_rate": None if self.aci.steps == 0 else self.aci.miscoverage_rate,
                "miscoverage_bound": (
                    None if self.aci.steps == 0 else self.aci.miscoverage_bound()
                ),
            },
        }


def aci_from_counts(
    target_alpha: float, gamma: float, steps: int, missed: int
) -> AdaptiveConformal:
    """The ACI monitor after `steps` labels of which `missed` fell outside their sets."""
    return AdaptiveConformal(
        target_alpha=target_alpha,
        gamma=gamma,
        alpha_t=target_alpha + gamma * (steps * target_alpha - missed),
        initial_alpha=target_alpha,
        steps=steps,
        miscovered=missed,
    )


def covered_at_level(
    artifact: CalibrationArtifact,
    score_name: str,
    probabilities: list[float],
    label_index: int,
    aci: AdaptiveConformal,
    seed: int,
) -> bool:
    """Whether the raw set at the ACI level, from calibrated probabilities [C], holds the label.

    A randomised score draws its U from `seed` (one per prediction).
    """
    score = artifact.make_score(score_name)
    probs = torch.tensor([probabilities], dtype=torch.float64)  # [1, C]
    qhat = aci.quantile(artifact.scores[score_name])
    generator = torch.Generator().manual_seed(seed) if score.randomized else None
    return bool(score.prediction_sets(probs, qhat, generator)[0, label_index])


def seed_of(prediction_id: str) -> int:
    return int(prediction_id[:15], 16)  # 60 bits of the random id


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
    """Prediction records, feedback and ACI counters in one state store."""

    def __init__(
        self,
        store: StateStore,
        calibrations: CalibrationStore,
        *,
        ttl_seconds: float,
        aci_target_alpha: float,
        aci_gamma: float,
    ) -> None:
        if not (math.isfinite(ttl_seconds) and ttl_seconds > 0):
            raise ValueError(f"feedback ttl must be positive seconds, got {ttl_seconds!r}")
        aci_from_counts(aci_target_alpha, aci_gamma, 0, 0)  # validates alpha and gamma
        self.store = store
        self.calibrations = calibrations
        self.ttl_seconds = float(ttl_seconds)
        self.aci_target_alpha = float(aci_target_alpha)
        self.aci_gamma = float(aci_gamma)

    # ---- remembering ------------------------------------------------------------------------

    async def remember(self, records: list[PredictionRecord]) -> None:
        await asyncio.gather(
            *(
                self.store.put_json(PREDICTIONS_NAMESPACE, r.id, r.to_json(), self.ttl_seconds)
                for r in records
            )
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
                f"no prediction with id {prediction_id!r}: unknown, or older than the "
                f"feedback window of {self.ttl_seconds:g} s"
            )
        return PredictionRecord.from_json(raw)

    # ---- counters ---------------------------------------------------------------------------

    @staticmethod
    def _live_key(model: str, version: str, backend: str, counter: str) -> str:
        return f"{model}/{version}/{backend}:{counter}"

    async def _counter(self, namespace: str, key: str) -> int:
        raw = await self.store.get_record(namespace, key)
        return 0 if raw is None else int(raw)

    async def live(self, model: str, version: str, backend: str) -> LiveCalibration:
        values = await asyncio.gather(
            *(
                self._counter(LIVE_NAMESPACE, self._live_key(model, version, backend, name))
                for name in LIVE_COUNTERS
            )
        )
        counts = dict(zip(LIVE_COUNTERS, values, strict=True))
        feedback = counts["feedback"]
        return LiveCalibration(
            feedback=feedback,
            covered=counts["covered"],
            correct=counts["correct"],
            target_coverage=counts["target_micro"] / _MICRO / feedback if feedback else None,
            aci=self._aci(counts["aci_steps"], counts["aci_missed"]),
        )

    def _aci(self, steps: int, missed: int) -> AdaptiveConformal:
        # Counters are bumped steps first, so a reader never sees more misses than steps.
        return aci_from_counts(self.aci_target_alpha, self.aci_gamma, steps, min(missed, steps))

    async def aci(
        self, model: str, version: str, backend: str, session_id: str | None = None
    ) -> AdaptiveConformal:
        """The current ACI monitor of (model, version, backend), or of one session."""
        if session_id is None:
            keys = [
                (LIVE_NAMESPACE, self._live_key(model, version, backend, name))
                for name in ("aci_steps", "aci_missed")
            ]
        else:
            base = f"{session_id}/{model}/{version}/{backend}"
            keys = [(SESSION_ACI_NAMESPACE, f"{base}:{name}") for name in ("steps", "missed")]
        steps, missed = await asyncio.gather(*(self._counter(ns, key) for ns, key in keys))
        return self._aci(steps, missed)

    async def _advance_aci(
        self,
        namespace: str,
        steps_key: str,
        missed_key: str,
        covered: bool,
        ttl: float | None,
    ) -> AdaptiveConformal:
        steps = await self.store.incr(namespace, steps_key, 1, ttl=ttl)
        missed = await self.store.incr(namespace, missed_key, 0 if covered else 1, ttl=ttl)
        return self._aci(steps, missed)

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
        stored = await run_in_threadpool(
            self.calibrations.get, record.model, record.version, record.backend
        )
        if record.set_indices is None or record.score is None or stored is None:
            return FeedbackResult(
                **result,
                covered=None,
                aci_covered=None,
                aci_alpha=None,
                session_aci_alpha=None,
                coverage=None,
                feedback_count=0,
            )
        covered = index in record.set_indices
        seed = seed_of(prediction_id)
        key = self._live_key
        model, version, backend = record.model, record.version, record.backend

        current = await self.aci(model, version, backend)
        aci_covered = covered_at_level(
            stored.artifact, record.score, record.probabilities, index, current, seed
        )
        aci = await self._advance_aci(
            LIVE_NAMESPACE,
            key(model, version, backend, "aci_steps"),
            key(model, version, backend, "aci_missed"),
            aci_covered,
            ttl=None,
        )
        session_alpha = None
        if record.session_id is not None:
            session_current = await self.aci(model, version, backend, record.session_id)
            session_covered = covered_at_level(
                stored.artifact, record.score, record.probabilities, index, session_current, seed
            )
            base = f"{record.session_id}/{model}/{version}/{backend}"
            session_alpha = (
                await self._advance_aci(
                    SESSION_ACI_NAMESPACE,
                    f"{base}:steps",
                    f"{base}:missed",
                    session_covered,
                    ttl=self.ttl_seconds,
                )
            ).alpha_t

        target = record.target_alpha if record.target_alpha is not None else record.alpha or 0.0
        count = await self.store.incr(LIVE_NAMESPACE, key(model, version, backend, "feedback"))
        covered_count = await self.store.incr(
            LIVE_NAMESPACE, key(model, version, backend, "covered"), int(covered)
        )
        await self.store.incr(LIVE_NAMESPACE, key(model, version, backend, "correct"), int(correct))
        await self.store.incr(
            LIVE_NAMESPACE,
            key(model, version, backend, "target_micro"),
            round(_MICRO * (1.0 - target)),
        )
        record_feedback(model, backend, record.score, covered, record.confidence, correct)
        set_aci_alpha(model, backend, min(max(aci.alpha_t, 0.0), 1.0))  # the gauge is a ratio
        return FeedbackResult(
            **result,
            covered=covered,
            aci_covered=aci_covered,
            aci_alpha=aci.alpha_t,
            session_aci_alpha=session_alpha,
            coverage=min(covered_count, count) / count,
            feedback_count=count,
        )
