"""Coverage, set size and accuracy of a calibration per position, on labelled test data.

What `neuroserve calibrate` prints and stores, what the benchmarks tabulate and what the
coverage tests assert: for every position bucket, the accuracy and mean confidence of the
calibrated probabilities and, per score and alpha, the coverage and mean size of the plain
split-conformal sets and of the never-empty ones (top label added to empty sets).

`coverage_interval` is the acceptance band for one such measurement. With n calibration
scores (no ties) the coverage of a fixed calibration is Beta(k, n + 1 - k) with
k = ceil((n + 1)(1 - alpha)), mean in [1 - alpha, 1 - alpha + 1 / (n + 1)] and variance at most
about alpha (1 - alpha) / (n + 2); m test points add binomial variance alpha (1 - alpha) / m.
So the measured coverage lies in

    [1 - alpha - z SE, 1 - alpha + 1 / (n + 1) + z SE],
    SE = sqrt(alpha (1 - alpha) (1 / (n + 2) + 1 / m))

with probability about that of |N(0, 1)| <= z.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from calibration.checks import ArrayLike, as_labels, as_logits
from calibration.conformal import include_top_label_if_empty
from calibration.positional import PositionalCalibration

REPORT_ALPHAS = (0.05, 0.1, 0.2)
REPORT_SCORES = ("lac", "raps", "aps_randomized")


def coverage_interval(
    alpha: float, n_calibration: int, n_test: int, z: float = 3.0
) -> tuple[float, float]:
    """The band a measured split-conformal coverage should fall in (see the module doc)."""
    if n_calibration < 1 or n_test < 1:
        raise ValueError("coverage needs at least one calibration and one test point")
    se = math.sqrt(alpha * (1.0 - alpha) * (1.0 / (n_calibration + 2) + 1.0 / n_test))
    return 1.0 - alpha - z * se, 1.0 - alpha + 1.0 / (n_calibration + 1) + z * se


@dataclass(frozen=True)
class CoverageRow:
    position: str  # the bucket, e.g. "3" or "4-7"
    score: str
    alpha: float
    n_calibration: int
    n_test: int
    accuracy: float
    mean_confidence: float
    coverage: float  # plain sets
    mean_set_size: float
    empty_fraction: float
    never_empty_coverage: float
    never_empty_mean_set_size: float
    singleton_fraction: float  # never-empty sets that hold one label: answers that decide
    lower: float  # coverage_interval of the plain sets
    upper: float

    @property
    def within(self) -> bool:
        return self.lower <= self.coverage <= self.upper


def position_report(
    calibration: PositionalCalibration,
    logits: Sequence[ArrayLike],
    labels: Sequence[ArrayLike],
    alphas: Sequence[float] = REPORT_ALPHAS,
    scores: Sequence[str] = REPORT_SCORES,
    seed: int = 0,
) -> list[CoverageRow]:
    """One row per (bucket, score, alpha) from test logits [m_k, C] and labels [m_k] per bucket.

    Randomised scores draw their U from a generator seeded with `seed`.
    """
    if len(logits) != len(calibration.buckets) or len(labels) != len(calibration.buckets):
        raise ValueError(f"{len(calibration.buckets)} buckets need as many test logits and labels")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for k, artifact in enumerate(calibration.artifacts):
        bucket_logits = as_logits(logits[k])
        bucket_labels = as_labels(labels[k], bucket_logits.shape[0], bucket_logits.shape[1])
        probs = artifact.calibrate(bucket_logits)  # [m, C]
        confidence, top = probs.max(dim=1)  # [m], [m]
        accuracy = float((top == bucket_labels).to(torch.float64).mean())
        for score in scores:
            uniform = torch.rand(probs.shape[0], generator=generator, dtype=torch.float64)
            for alpha in alphas:
                _, sets = artifact.predict(bucket_logits, alpha, score, uniform=uniform)
                rows.append(
                    _row(
                        calibration.buckets.describe(k),
                        score,
                        alpha,
                        artifact.n,
                        probs,
                        sets,
                        bucket_labels,
                        accuracy,
                        float(confidence.mean()),
                    )
                )
    return rows


def _row(
    position: str,
    score: str,
    alpha: float,
    n_calibration: int,
    probs: Tensor,
    sets: Tensor,
    labels: Tensor,
    accuracy: float,
    mean_confidence: float,
) -> CoverageRow:
    m = labels.shape[0]
    filled = include_top_label_if_empty(sets, probs)  # [m, C]
    covered = sets[torch.arange(m), labels].to(torch.float64)  # [m]
    filled_covered = filled[torch.arange(m), labels].to(torch.float64)  # [m]
    sizes = sets.sum(dim=1).to(torch.float64)  # [m]
    filled_sizes = filled.sum(dim=1).to(torch.float64)  # [m]
    lower, upper = coverage_interval(alpha, n_calibration, m)
    return CoverageRow(
        position=position,
        score=score,
        alpha=alpha,
        n_calibration=n_calibration,
        n_test=m,
        accuracy=accuracy,
        mean_confidence=mean_confidence,
        coverage=float(covered.mean()),
        mean_set_size=float(sizes.mean()),
        empty_fraction=float((sizes == 0).to(torch.float64).mean()),
        never_empty_coverage=float(filled_covered.mean()),
        never_empty_mean_set_size=float(filled_sizes.mean()),
        singleton_fraction=float((filled_sizes == 1).to(torch.float64).mean()),
        lower=lower,
        upper=upper,
    )


def rows_as_dicts(rows: Sequence[CoverageRow]) -> list[dict[str, Any]]:
    return [asdict(row) | {"within": row.within} for row in rows]
