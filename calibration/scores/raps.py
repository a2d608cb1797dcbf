"""RAPS, regularised adaptive prediction sets (Angelopoulos, Bates, Malik & Jordan 2021,
"Uncertainty Sets for Image Classifiers using Conformal Prediction").

APS plus a penalty on deep ranks, so the long tail of small probabilities stops padding the
sets:

    score(x, y) = mass_above(y) + (U or 1) * p_y + lam * max(0, rank(y) - k_reg)

`tune_raps` follows the paper's automatic choice on a tuning split that must be disjoint
from the data later used for the conformal quantile: k_reg is the Top-K conformal quantile
at the same alpha (the number of labels a fixed-size set needs for 1 - alpha coverage), and
lam is the grid value whose conformal sets are smallest on held-out tuning data.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from calibration.checks import ArrayLike, as_labels, as_probs, check_alpha
from calibration.quantile import conformal_quantile
from calibration.scores.base import ConformityScore, rank_and_mass_above
from calibration.scores.topk import TopK

# The paper's grid for the size criterion, with 0 (plain APS) so tuning can decline the penalty.
DEFAULT_LAMBDAS = (0.0, 0.001, 0.01, 0.1, 0.2, 0.5)


class RAPS(ConformityScore):
    def __init__(self, lam: float, k_reg: int, randomized: bool = False) -> None:
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"RAPS lam must be a finite number >= 0, got {lam!r}")
        if isinstance(k_reg, bool) or int(k_reg) != k_reg or k_reg < 0:
            raise ValueError(f"RAPS k_reg must be an integer >= 0, got {k_reg!r}")
        self.lam = float(lam)
        self.k_reg = int(k_reg)
        self.randomized = bool(randomized)
        self.name = "raps_randomized" if self.randomized else "raps"

    def _label_scores(self, probs: Tensor, uniform: Tensor | None) -> Tensor:
        rank, mass_above = rank_and_mass_above(probs)  # [..., C]
        own = probs if uniform is None else uniform[..., None] * probs  # [..., C]
        penalty = self.lam * (rank - self.k_reg).clamp(min=0).to(probs.dtype)  # [..., C]
        return mass_above + own + penalty

    def params(self) -> dict[str, Any]:
        return {"lam": self.lam, "k_reg": self.k_reg, "randomized": self.randomized}


def pick_k_reg(probs: Tensor, labels: Tensor, alpha: float) -> int:
    """The Top-K conformal quantile: rank needed to cover 1 - alpha (capped at C)."""
    ranks = TopK().score(probs, labels)  # [N]
    qhat = float(conformal_quantile(ranks, alpha))
    return probs.shape[1] if math.isinf(qhat) else int(qhat)


def _held_out_set_size(
    score: RAPS, probs: Tensor, labels: Tensor, alpha: float, rng: torch.Generator | None
) -> float:
    """Two-fold: calibrate on one half, measure the other half's mean set size, and swap."""
    half = probs.shape[0] // 2
    folds = [(slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))]
    sizes = []
    for calibrate, measure in folds:
        qhat = conformal_quantile(score.score(probs[calibrate], labels[calibrate], rng), alpha)
        sets = score.prediction_sets(probs[measure], qhat, rng)  # [n_half, C]
        sizes.append(sets.sum(dim=1).to(torch.float64).mean())
    return float(torch.stack(sizes).mean())


def tune_raps(
    probs: ArrayLike,
    labels: ArrayLike,
    alpha: float,
    randomized: bool = False,
    rng: torch.Generator | None = None,
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS,
) -> RAPS:
    """RAPS with k_reg and lam chosen on this tuning data (in random order, >= 4 points).

    Ties in set size keep the smaller lam. Pass `rng` when `randomized`.
    """
    alpha = check_alpha(alpha)
    probs = as_probs(probs)
    labels = as_labels(labels, probs.shape[0], probs.shape[1])
    if probs.shape[0] < 4:
        raise ValueError(f"RAPS tuning needs at least 4 examples, got {probs.shape[0]}")
    if not lambdas:
        raise ValueError("lambdas must name at least one candidate")
    k_reg = pick_k_reg(probs, labels, alpha)
    best: tuple[float, RAPS] | None = None
    for lam in sorted(lambdas):
        candidate = RAPS(lam, k_reg, randomized)
        size = _held_out_set_size(candidate, probs, labels, alpha, rng)
        if best is None or size < best[0]:
            best = (size, candidate)
    return best[1]
