"""Publishing an answered batch: its Prometheus series, and the records that late labels
(`POST /v1/feedback`) are matched against. `DataPlane.publish` does both; the session plane
publishes the answers of the steps it committed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from service.dataplane.feedback import PredictionRecord
from service.dataplane.predictions import PredictionBatch
from service.metrics import COUNTED_USAGE, record_predictions, record_usage


class Publication(NamedTuple):
    """An answered batch to publish, with the session and key it was answered for."""

    batch: PredictionBatch
    session_id: str | None = None
    owner: str | None = None


_NUMBERS = (int, float)


def record_metrics(batches: Sequence[PredictionBatch]) -> None:
    """Count the batches' usage (summed per model and backend first: one increment per
    counter, not per request) and their predictions (sets, confidences, abstentions)."""
    usage: dict[tuple[str, str], dict[str, float]] = {}
    for batch in batches:
        total = usage.setdefault((batch.model, batch.backend), {})
        reported = batch.usage
        for key in COUNTED_USAGE:  # a usage dict has many more keys than the counters
            value = reported.get(key)
            kind = type(value)
            if kind is float or kind is int or (isinstance(value, _NUMBERS) and kind is not bool):
                total[key] = total.get(key, 0) + value
    for (model, backend), total in usage.items():
        record_usage(model, backend, total)
    # Calibrated predictions by (model, backend, score, alpha): one metrics update per group.
    answered: dict[tuple[str, str, str, float | None], tuple[list, list, list]] = {}
    for batch in batches:
        conformal = batch.conformal
        if conformal is None:
            continue
        key = (batch.model, batch.backend, conformal.score, batch.alpha)
        set_sizes, confidences, abstained = answered.setdefault(key, ([], [], []))
        for p in batch.predictions:
            if p.set_size is not None:
                set_sizes.append(p.set_size)
                confidences.append(min(max(p.confidence, 0.0), 1.0))
                abstained.append(bool(p.abstain))
    for (model, backend, score, alpha), (set_sizes, confidences, abstained) in answered.items():
        if set_sizes:
            record_predictions(
                model, backend, score, set_sizes, confidences, abstained, alpha=alpha
            )


def feedback_records(
    batch: PredictionBatch, session_id: str | None, owner: str | None
) -> list[PredictionRecord]:
    """What feedback needs to score a late label against each prediction of the batch."""
    conformal = batch.conformal
    return [
        PredictionRecord(
            id=p.id,
            model=batch.model,
            version=batch.version,
            backend=batch.backend,
            top_index=p.index,
            confidence=p.confidence,
            probabilities=p.probabilities,
            set_indices=p.set_indices,
            score=None if conformal is None else conformal.score,
            alpha=p.aci_alpha if p.aci_alpha is not None else batch.alpha,
            target_alpha=batch.alpha,
            online=row in batch.level_keys,
            session_id=session_id,
            owner=owner,
            position=p.position,
            uniform=p.uniform,
            calibration_id=batch.calibration_id,
            level=(batch.level_keys[row].to_dict() if row in batch.level_keys else None),
        )
        for row, p in enumerate(batch.predictions)
    ]
