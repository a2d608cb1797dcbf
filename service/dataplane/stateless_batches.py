"""Stateless predictions batched dynamically: concurrent requests over feature sequences for
one runner and sequence length share one forward pass.

`DataPlane.predict` validates a request into a `FeatureJob` and submits it here. Requests that
arrive while a batch runs form the next one (continuous batching, as session steps): one
forward pass over every job's sequences, then each job answered with its own calibration
options, all published in one store round trip. Token prompts do not come here.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hardware_backends.base import Runner, runner_notes
from hardware_backends.registry import freeze_options
from models.repository import ModelCard
from service import metrics
from service.batching import MicroBatcher, run_compute, usage_share
from service.dataplane.inputs import out_of_range_warnings
from service.dataplane.online_levels import OnlineLevel
from service.dataplane.predictions import (
    ConformalOptions,
    PredictionBatch,
    run_last_step,
    split_batch,
)
from service.dataplane.publication import Publication

# What answers and publishes a batch: `DataPlane.build_predictions` and `.publish_many`.
BuildPredictions = Callable[..., PredictionBatch]
PublishMany = Callable[[Sequence[Publication]], Awaitable[None]]


@dataclass
class FeatureJob:
    """One stateless request over feature sequences, waiting for its batch."""

    card: ModelCard
    backend: str
    backend_options: dict[str, Any]
    runner: Runner
    x: Tensor  # [n, T, F]
    conformal: ConformalOptions
    owner: str | None
    warnings: list[str]
    levels: Mapping[int, OnlineLevel] | None = None  # read before batching, when online

    @property
    def batch_key(self) -> Hashable:
        """Requests that can share one forward pass: same runner, same sequence length."""
        options = freeze_options(self.backend_options)
        return (self.card.name, self.card.version, self.backend, options, int(self.x.shape[1]))


class FeatureBatches:
    """Feature-sequence requests gathered per batch key, each answered from a shared run."""

    def __init__(
        self, build_predictions: BuildPredictions, publish_many: PublishMany, *, max_batch: int
    ) -> None:
        self._build_predictions = build_predictions
        self._publish_many = publish_many
        self._batcher: MicroBatcher[FeatureJob, PredictionBatch | BaseException] = MicroBatcher(
            self._answer_batch, window_seconds=0.0, max_batch=max_batch
        )

    async def submit(self, job: FeatureJob) -> PredictionBatch:
        """The job's answer once its batch has run (published with its batch)."""
        return await self._batcher.submit(job.batch_key, job)

    async def close(self) -> None:
        await self._batcher.close()

    async def _answer_batch(
        self, key: Hashable, jobs: list[FeatureJob]
    ) -> list[PredictionBatch | BaseException]:
        """One forward pass over every job's sequences, each job answered with its own
        calibration options, all published in one store round trip."""
        sequences = sum(int(job.x.shape[0]) for job in jobs)
        metrics.record_batch(jobs[0].card.name, jobs[0].backend, sequences)
        steps = sequences * int(jobs[0].x.shape[1])
        answers = await run_compute(self._run, jobs, steps=steps, cost_key=key)
        await self._publish_many(
            [
                Publication(answer, None, job.owner)
                for job, answer in zip(jobs, answers, strict=True)
                if isinstance(answer, PredictionBatch)
            ]
        )
        return answers

    def _run(self, jobs: list[FeatureJob]) -> list[PredictionBatch | BaseException]:
        started = time.perf_counter()
        x = torch.cat([job.x for job in jobs])  # [N, T, F]
        logits, usage = run_last_step(jobs[0].runner, x)  # [N, C] or [S, N, C]
        seconds = time.perf_counter() - started
        total, length = int(x.shape[0]), int(x.shape[1])
        rows = [int(job.x.shape[0]) for job in jobs]
        starts = [sum(rows[:i]) for i in range(len(jobs))]
        notes = runner_notes(jobs[0].runner)
        shares: dict[int, dict[str, Any]] = {}  # by sequences per job: usually all 1
        for n in rows:
            if n not in shares:
                shares[n] = {
                    "sequences": n,
                    "steps": n * length,
                    "compute_seconds": seconds,
                    **usage_share(usage, n, total, total),
                    **notes,
                }
        usages = [dict(shares[n]) for n in rows]  # each job's own
        value_range = jobs[0].card.config["input"].get("value_range")
        far = out_of_range_warnings(x, value_range, rows)  # far outside the training range
        warnings = [
            [*job.warnings, *([note] if note else [])] for job, note in zip(jobs, far, strict=True)
        ]
        answers: list[PredictionBatch | BaseException | None] = [None] * len(jobs)
        # Jobs that ask the same of calibration are answered in one pass over their rows (a
        # prediction's randomness is its own, drawn from its id, so grouping changes nothing).
        groups = answer_groups(jobs)
        for group in groups:
            if len(groups) == 1:  # every job asks the same: all rows, in order
                group_logits = logits  # [N, C] or [S, N, C]
            else:
                picked = torch.cat([torch.arange(starts[i], starts[i] + rows[i]) for i in group])
                group_logits = logits.index_select(-2, picked)  # [n, C] or [S, n, C]
            first = jobs[group[0]]
            try:
                answer = self._build_predictions(
                    first.card,
                    first.backend,
                    group_logits,
                    positions=length,
                    conformal=first.conformal,
                    backend_options=first.backend_options,
                    levels=first.levels,
                )
            except Exception as error:  # e.g. an unreadable calibration: these requests fail
                for i in group:
                    answers[i] = error
                continue
            parts = split_batch(
                answer,
                [rows[i] for i in group],
                [usages[i] for i in group],
                [warnings[i] for i in group],
            )
            for i, part in zip(group, parts, strict=True):
                answers[i] = part
        return answers  # type: ignore[return-value]


def answer_groups(jobs: Sequence[FeatureJob]) -> list[list[int]]:
    """Indices of `jobs` grouped by what they ask of calibration; an online job (levels of its
    own) alone."""
    groups: dict[Hashable, list[int]] = {}
    for i, job in enumerate(jobs):
        key = ("own", i) if job.levels is not None else job.conformal
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def rough_steps(inputs: object) -> int:
    """Time steps in a JSON batch of sequences, counted without validating it (a large
    request is then parsed in a worker thread)."""
    if isinstance(inputs, np.ndarray):  # [N, T, F] decoded by a protocol
        return int(inputs.shape[0] * inputs.shape[1]) if inputs.ndim >= 2 else 1
    if not isinstance(inputs, list):
        return 0
    return sum(len(sequence) if isinstance(sequence, list) else 1 for sequence in inputs)
