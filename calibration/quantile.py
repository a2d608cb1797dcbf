"""Finite-sample conformal quantiles of calibration scores.

With n exchangeable calibration scores, a test score falls at or below the k-th smallest of
them with probability at least k / (n + 1). Choosing k = ceil((n + 1)(1 - alpha)) therefore
gives coverage >= 1 - alpha, and at most 1 - alpha + 1 / (n + 1) when scores have no ties
(Vovk et al. 2005; Angelopoulos & Bates 2021). When k > n no calibration score is large
enough and the quantile is +inf: the prediction set is every label.

All functions work on the last dimension, so many re-splits can be handled at once:
`scores [..., n] -> qhat [...]`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from calibration.checks import check_alpha

# (n + 1)(1 - alpha) is an integer for many "round" pairs (n = 19, alpha = 0.05), but float
# rounding can land it a hair above that integer; ceil would then demand one extra score.
# In float64 the product is off by at most (n + 1) * 2 eps (alpha and 1 - alpha each carry
# half an ulp, the product another), so a slack of (n + 1) * 4 eps absorbs the rounding,
# while a true fractional part, at least 1 / 1000 for an alpha with three decimals, stays far
# above it for any n a calibration set can have (the slack is 1e-10 at n = 10^5).
_RANK_SLACK_PER_POINT = 4 * torch.finfo(torch.float64).eps


def conformal_ranks(n: Tensor, alpha: float) -> Tensor:
    """k = ceil((n + 1)(1 - alpha)), at least 1, for every count in n [...] -> long [...].

    Always in float64, whatever the dtype of n: an integer tensor times a Python float is
    float32 in torch, whose 24-bit mantissa gets k wrong by one (in either direction) for
    many alphas once n is in the tens of thousands, or as soon as n = 24 at alpha = 0.4.
    """
    count = torch.as_tensor(n).to(torch.float64) + 1.0  # [...]
    k = torch.ceil(count * (1.0 - alpha) - count * _RANK_SLACK_PER_POINT)  # [...]
    return k.long().clamp(min=1)


def conformal_rank(n: int, alpha: float) -> int:
    """k = ceil((n + 1)(1 - alpha)): which order statistic of n scores is the quantile."""
    return int(conformal_ranks(torch.tensor(n), alpha))


def _kth_smallest_or_inf(sorted_scores: Tensor, k: Tensor) -> Tensor:
    """sorted_scores [..., n] ascending, k [...] 1-based (any integer >= 1) -> [...]."""
    n = sorted_scores.shape[-1]
    if n == 0:
        return torch.full(k.shape, math.inf, dtype=torch.float64)
    index = (k - 1).clamp(0, n - 1)[..., None]  # [..., 1]
    picked = sorted_scores.gather(-1, index).squeeze(-1)  # [...]
    return torch.where(k > n, torch.full_like(picked, math.inf), picked)


def _as_scores(scores: Tensor) -> Tensor:
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.ndim == 0:
        raise ValueError("scores must have at least one dimension [..., n]")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores


def conformal_quantile(scores: Tensor, alpha: float) -> Tensor:
    """qhat [...] from calibration scores [..., n]: the ceil((n+1)(1-alpha))-th smallest."""
    alpha = check_alpha(alpha)
    scores = _as_scores(scores)
    n = scores.shape[-1]
    if n == 0:
        raise ValueError("the calibration set is empty; conformal prediction needs scores")
    k = torch.full(scores.shape[:-1], conformal_rank(n, alpha), dtype=torch.long)
    return _kth_smallest_or_inf(scores.sort(dim=-1).values, k)


def quantile_at_level(scores: Tensor, alpha_t: float) -> Tensor:
    """Like `conformal_quantile` but for any real level, as online conformal needs.

    alpha_t <= 0 asks for certain coverage: +inf (every label). alpha_t >= 1 asks for none:
    -inf (the empty set).
    """
    scores = _as_scores(scores)
    if math.isnan(alpha_t):
        raise ValueError("alpha_t is NaN")
    batch_shape = scores.shape[:-1]
    if alpha_t <= 0.0:
        return torch.full(batch_shape, math.inf, dtype=torch.float64)
    if alpha_t >= 1.0:
        return torch.full(batch_shape, -math.inf, dtype=torch.float64)
    return conformal_quantile(scores, alpha_t)


def class_conditional_quantiles(
    scores: Tensor, labels: Tensor, num_classes: int, alpha: float
) -> Tensor:
    """Mondrian quantiles [..., C]: class c's qhat from the n_c scores whose label is c.

    A class with ceil((n_c + 1)(1 - alpha)) > n_c, e.g. with no calibration example or fewer
    than (1 - alpha) / alpha of them, gets +inf: it is always in the set, which keeps its
    coverage guarantee at the price of a larger set.
    """
    alpha = check_alpha(alpha)
    scores = _as_scores(scores)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must match scores {tuple(scores.shape)}"
        )
    if scores.shape[-1] == 0:
        raise ValueError("the calibration set is empty; conformal prediction needs scores")
    quantiles = []
    for label in range(num_classes):
        in_class = labels == label  # [..., n]
        n_class = in_class.sum(dim=-1)  # [...]
        # Other classes' scores move past the end of the sort as +inf.
        masked = torch.where(in_class, scores, torch.full_like(scores, math.inf))
        k = conformal_ranks(n_class, alpha)  # [...]
        qhat = _kth_smallest_or_inf(masked.sort(dim=-1).values, k)
        quantiles.append(torch.where(k > n_class, torch.full_like(qhat, math.inf), qhat))
    return torch.stack(quantiles, dim=-1)  # [..., C]
