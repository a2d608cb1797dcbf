"""Predictions for session steps, built for a whole micro-batch at once.

`StepPredictions` is how the session plane answers its steps: in the batch's worker thread
and before its states are written, it builds the predictions of the batch's steps with the
data plane's builder, one call per (model version, backend, options, conformal options) and,
for sessions with their own online level, one per session. Every row is answered with the
calibration of its own position (the session's step count after that row), so a refusal
(e.g. a calibration file that became unreadable) leaves those sessions where they were.

Per step: (the prediction after the chunk, the per-step predictions or None), as prediction
batches of their own.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from hardware_backends.registry import freeze_options
from service.dataplane.plane import DataPlane
from service.dataplane.predictions import PredictionBatch
from service.sessions.types import StepAnswer, StepOutcome


class StepPredictions:
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    def __call__(self, outcomes: Sequence[StepOutcome]) -> list[StepAnswer | Exception]:
        groups: dict[Hashable, list[int]] = {}
        for i, outcome in enumerate(outcomes):
            groups.setdefault(_conformal_group(i, outcome), []).append(i)
        answers: list[StepAnswer | Exception] = [RuntimeError("not built")] * len(outcomes)
        for positions in groups.values():
            members = [outcomes[i] for i in positions]
            try:
                built: list[StepAnswer | Exception] = list(self._build_group(members))
            except Exception as error:  # every step of the group fails alike, unwritten
                built = [error] * len(members)
            for i, answer in zip(positions, built, strict=True):
                answers[i] = answer
        return answers

    def _build_group(self, outcomes: list[StepOutcome]) -> list[StepAnswer]:
        first, conformal = outcomes[0].info, outcomes[0].conformal
        rows = []  # per outcome: its last step, then (when asked) every step
        positions: list[int] = []
        levels = {}
        for outcome in outcomes:
            rows.append(outcome.logits.unsqueeze(-2))  # [1, C] or [S, 1, C]
            own = [outcome.info.step]
            if outcome.step_logits is not None:
                rows.append(outcome.step_logits)  # [T, C] or [S, T, C]
                own += outcome.positions
            if outcome.online_level is not None:
                levels.update({len(positions) + j: outcome.online_level for j in range(len(own))})
            positions += own
        batch = self.dataplane.build_predictions(
            outcomes[0].card,
            first.backend,
            torch.cat(rows, dim=-2),  # [R, C] or [S, R, C]
            None,
            positions=positions,
            conformal=conformal,
            backend_options=first.options,
            levels=levels if conformal.online else None,
        )
        predictions = iter(enumerate(batch.predictions))
        answers = []
        for outcome in outcomes:
            row, last_prediction = next(predictions)
            warnings = outcome.warnings
            last = _part(batch, [(row, last_prediction)], dict(outcome.usage), warnings)
            steps = None
            if outcome.step_logits is not None:
                count = outcome.step_logits.shape[-2]
                # The chunk's usage is counted once, with the last prediction.
                taken = [next(predictions) for _ in range(count)]
                steps = _part(batch, taken, {}, warnings)
            answers.append((last, steps))
        return answers


def _part(
    batch: PredictionBatch, rows: list, usage: dict, warnings: Sequence[str]
) -> PredictionBatch:
    """Some rows of a batch as a batch of their own (level keys renumbered)."""
    predictions = [prediction for _, prediction in rows]
    keys = {
        new: batch.level_keys[old] for new, (old, _) in enumerate(rows) if old in batch.level_keys
    }
    return batch.part(predictions, usage, warnings, level_keys=keys)


def _conformal_group(position: int, outcome: StepOutcome) -> Hashable:
    """Steps that can share one builder call; a session with its own level never shares."""
    info = outcome.info
    alone = position if outcome.conformal.online else None
    options = freeze_options(info.options)
    return (info.model, info.version, info.backend, options, outcome.conformal, alone)
