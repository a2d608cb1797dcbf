"""Delay-adaptive early decisions with a coverage guarantee at the stopping time, in the
spirit of SpikeCP (Chen, Park & Simeone 2023, "Knowing When to Stop: Delay-Adaptive Spiking
Neural Network Classifiers with Reliability Guarantees").

A sequence model is read at K checkpoints. At each one we build a conformal set at level
alpha / K and stop as soon as the set holds at most `max_set_size` labels (or at the last
checkpoint). Whatever rule picks the stopping time, the label is missed there only if it is
missed at some checkpoint, so by the union (Bonferroni) bound

    P(y not in C_stop) <= sum_k P(y not in C_k) <= K * alpha / K = alpha.

Each checkpoint's quantile is the split-conformal quantile of that checkpoint's calibration
scores, which are exchangeable with the test stream's scores at the same checkpoint. A
calibration per position (`calibration.positional`) already holds exactly those scores, each
with its own calibration map and score parameters: `EarlyDecisionRule.from_calibration`
builds the rule from it, and the probabilities a checkpoint decides on must then come from
that checkpoint's map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from calibration.checks import ArrayLike, as_labels, as_probs, check_alpha, check_not_empty
from calibration.positional import PositionalCalibration
from calibration.quantile import conformal_quantile
from calibration.scores.base import ConformityScore
from calibration.scores.lac import LAC


def _as_streams(probs: ArrayLike) -> Tensor:
    probs = as_probs(probs)
    if probs.ndim != 3:
        raise ValueError(f"probs must have shape [N, K, C], got {tuple(probs.shape)}")
    return probs


@dataclass(frozen=True)
class EarlyDecisionReport:
    coverage: float  # fraction of streams whose label is in the set at the stopping time
    mean_set_size: float  # at the stopping time
    mean_stop_step: float  # mean time step at which the decision was taken
    mean_steps_saved: float  # total steps minus mean_stop_step
    fraction_steps_saved: float  # mean_steps_saved / total steps
    stopped_early: float  # fraction of streams that stopped before the last checkpoint


@dataclass(frozen=True)
class EarlyDecisionRule:
    score: ConformityScore | tuple[ConformityScore, ...]  # one for all, or one per checkpoint
    thresholds: Tensor  # [K] per-checkpoint quantiles at level alpha / K
    alpha: float
    max_set_size: int
    checkpoint_steps: tuple[int, ...]  # the time step (1-based) each checkpoint reads

    @property
    def num_checkpoints(self) -> int:
        return len(self.checkpoint_steps)

    def checkpoint_score(self, checkpoint: int) -> ConformityScore:
        return self.score[checkpoint] if isinstance(self.score, tuple) else self.score

    @classmethod
    def from_calibration(
        cls,
        calibration: PositionalCalibration,
        alpha: float,
        score: str,
        max_set_size: int = 1,
    ) -> EarlyDecisionRule:
        """A checkpoint at every position of a calibration with one bucket per step, each
        with that position's score and quantile at level alpha / K."""
        alpha = check_alpha(alpha)
        buckets = calibration.buckets
        if any(low != high for low, high in map(buckets.bounds, range(len(buckets)))):
            raise ValueError("early decisions need a calibration with one bucket per step")
        if isinstance(max_set_size, bool) or not 1 <= int(max_set_size) <= calibration.num_classes:
            raise ValueError(
                f"max_set_size must be in 1..{calibration.num_classes}, got {max_set_size!r}"
            )
        artifacts = calibration.artifacts
        scores = tuple(artifact.make_score(score) for artifact in artifacts)
        if any(s.randomized for s in scores):
            raise ValueError(f"early decisions need a deterministic score, got {score!r}")
        level = alpha / len(artifacts)
        thresholds = torch.stack([conformal_quantile(a.scores[score], level) for a in artifacts])
        steps = tuple(buckets.edges[:-1])
        return cls(scores, thresholds, alpha, int(max_set_size), steps)

    @classmethod
    def calibrate(
        cls,
        probs: ArrayLike,
        labels: ArrayLike,
        alpha: float,
        max_set_size: int = 1,
        score: ConformityScore | None = None,
        checkpoint_steps: tuple[int, ...] | None = None,
        rng: torch.Generator | None = None,
    ) -> EarlyDecisionRule:
        """probs [N, K, C] at K checkpoints of N calibration streams, labels [N].

        `checkpoint_steps` defaults to 1..K (a checkpoint after every step).
        """
        alpha = check_alpha(alpha)
        probs = _as_streams(probs)
        n, num_checkpoints, num_classes = probs.shape
        check_not_empty(n, "the calibration set")
        labels = as_labels(labels, n, num_classes)
        if isinstance(max_set_size, bool) or not 1 <= int(max_set_size) <= num_classes:
            raise ValueError(f"max_set_size must be in 1..{num_classes}, got {max_set_size!r}")
        steps = (
            tuple(range(1, num_checkpoints + 1)) if checkpoint_steps is None else checkpoint_steps
        )
        steps = tuple(int(step) for step in steps)
        if len(steps) != num_checkpoints or any(
            b <= a for a, b in zip(steps[:-1], steps[1:], strict=True)
        ):
            raise ValueError(
                f"checkpoint_steps must be {num_checkpoints} increasing steps, got {steps}"
            )
        if steps[0] < 1:
            raise ValueError(f"checkpoint_steps are 1-based, got {steps}")
        score = LAC() if score is None else score
        per_checkpoint = [score.score(probs[:, k], labels, rng) for k in range(num_checkpoints)]
        scores = torch.stack(per_checkpoint, dim=1)  # [N, K]
        thresholds = conformal_quantile(scores.T, alpha / num_checkpoints)  # [K]
        return cls(score, thresholds, alpha, int(max_set_size), steps)

    def decide(
        self, probs: ArrayLike, checkpoint: int, rng: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """At checkpoint k (0-based) with probs [B, C]: (stop [B] bool, sets [B, C] bool)."""
        if not 0 <= checkpoint < self.num_checkpoints:
            raise ValueError(
                f"checkpoint must be in 0..{self.num_checkpoints - 1}, got {checkpoint}"
            )
        score = self.checkpoint_score(checkpoint)
        sets = score.prediction_sets(probs, self.thresholds[checkpoint], rng)  # [B, C]
        small_enough = sets.sum(dim=-1) <= self.max_set_size  # [B]
        last = checkpoint == self.num_checkpoints - 1
        return (torch.ones_like(small_enough) if last else small_enough), sets

    def run(self, probs: ArrayLike, rng: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Whole streams probs [N, K, C] -> (stopping checkpoint [N], set there [N, C])."""
        probs = _as_streams(probs)
        self._check_streams(probs)
        table = torch.stack(  # [N, K, C]
            [
                self.checkpoint_score(k).label_scores(probs[:, k], rng)
                for k in range(probs.shape[1])
            ],
            dim=1,
        )
        sets = table <= self.thresholds[None, :, None]  # [N, K, C]
        stop = sets.sum(dim=2) <= self.max_set_size  # [N, K]
        stop[:, -1] = True
        stop_at = stop.to(torch.int8).argmax(dim=1)  # [N] first checkpoint that stops
        return stop_at, sets[torch.arange(probs.shape[0]), stop_at]

    def run_reference(
        self, probs: ArrayLike, rng: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Slow path: one stream at a time, one `decide` call per checkpoint."""
        probs = _as_streams(probs)
        self._check_streams(probs)
        stop_at, final_sets = [], []
        for stream in probs:
            for checkpoint in range(self.num_checkpoints):
                stop, sets = self.decide(stream[checkpoint][None], checkpoint, rng)
                if stop[0]:
                    stop_at.append(checkpoint)
                    final_sets.append(sets[0])
                    break
        return torch.tensor(stop_at, dtype=torch.long), torch.stack(final_sets)

    def _check_streams(self, probs: Tensor) -> None:
        if probs.shape[1] != self.num_checkpoints:
            raise ValueError(
                f"calibrated for {self.num_checkpoints} checkpoints, got {probs.shape[1]}"
            )

    def evaluate(
        self,
        probs: ArrayLike,
        labels: ArrayLike,
        total_steps: int | None = None,
        rng: torch.Generator | None = None,
    ) -> EarlyDecisionReport:
        """Coverage at the stopping time and steps saved on test streams probs [N, K, C]."""
        probs = _as_streams(probs)
        check_not_empty(probs.shape[0], "the test set")
        labels = as_labels(labels, probs.shape[0], probs.shape[2])
        total = self.checkpoint_steps[-1] if total_steps is None else int(total_steps)
        if total < self.checkpoint_steps[-1]:
            raise ValueError(f"total_steps {total} is before the last checkpoint")
        stop_at, sets = self.run(probs, rng)
        covered = sets[torch.arange(probs.shape[0]), labels].to(torch.float64)  # [N]
        stop_step = torch.tensor(self.checkpoint_steps, dtype=torch.float64)[stop_at]  # [N]
        mean_stop = float(stop_step.mean())
        return EarlyDecisionReport(
            coverage=float(covered.mean()),
            mean_set_size=float(sets.sum(dim=1).to(torch.float64).mean()),
            mean_stop_step=mean_stop,
            mean_steps_saved=total - mean_stop,
            fraction_steps_saved=(total - mean_stop) / total,
            stopped_early=float((stop_at < self.num_checkpoints - 1).to(torch.float64).mean()),
        )
