"""Calibration metrics for a classifier's probabilities: top-label reliability bins, ECE
(equal-width and equal-mass bins), MCE, Brier score and negative log-likelihood.

All functions take `probs [N, C]` (rows sum to 1) and integer `labels [N]` and return
Python floats (or a `ReliabilityBins` of tensors). "Top-label" means each example counts
once, with its highest probability as the confidence and whether that label is right as the
outcome; ties in the top probability go to the lowest label index, like `argmax`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from calibration.checks import ArrayLike, as_labels, as_probs, check_not_empty

DEFAULT_BINS = 15
# log(0) guard for NLL: a probability of exactly 0 on the true label costs -log(1e-300) ~ 691.
_MIN_PROB = 1e-300


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of top-label confidence vs accuracy (empty bins have count 0)."""

    edges: Tensor  # [B + 1] bin edges in [0, 1]
    count: Tensor  # [B] examples per bin
    mean_confidence: Tensor  # [B] mean top probability in the bin (0 where empty)
    accuracy: Tensor  # [B] fraction correct in the bin (0 where empty)

    @property
    def gap(self) -> Tensor:
        return (self.accuracy - self.mean_confidence).abs()  # [B]


def _inputs(probs: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor]:
    probs = as_probs(probs)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape [N, C], got {tuple(probs.shape)}")
    labels = as_labels(labels, probs.shape[0], probs.shape[1])
    check_not_empty(probs.shape[0], "the evaluation set")
    return probs, labels


def top_label(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence [N] and correctness [N] (float 0/1)."""
    confidence, predicted = probs.max(dim=1)  # [N], [N]
    return confidence, (predicted == labels).to(probs.dtype)


def _bin_statistics(confidence: Tensor, correct: Tensor, bin_index: Tensor, n_bins: int):
    count = torch.zeros(n_bins, dtype=confidence.dtype).index_add_(
        0, bin_index, torch.ones_like(confidence)
    )  # [B]
    conf_sum = torch.zeros(n_bins, dtype=confidence.dtype).index_add_(0, bin_index, confidence)
    hit_sum = torch.zeros(n_bins, dtype=confidence.dtype).index_add_(0, bin_index, correct)
    safe = count.clamp(min=1)
    return count, conf_sum / safe, hit_sum / safe


def reliability_bins(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_BINS):
    """Equal-width bins on [0, 1]; bin b holds confidences in (edge_b, edge_{b+1}].

    Right-closed bins (as in Guo et al. 2017) keep confidence 1.0 in the last bin; the lowest
    bin also takes confidence 0 exactly.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    probs, labels = _inputs(probs, labels)
    confidence, correct = top_label(probs, labels)
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)  # [B + 1]
    bin_index = (torch.searchsorted(edges, confidence, right=False) - 1).clamp(0, n_bins - 1)
    count, mean_conf, accuracy = _bin_statistics(confidence, correct, bin_index, n_bins)
    return ReliabilityBins(edges, count, mean_conf, accuracy)


def equal_mass_bins(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_BINS):
    """Bins holding (nearly) the same number of examples, sorted by confidence.

    Examples are split in confidence order into `n_bins` contiguous groups whose sizes differ
    by at most one (fewer bins when N < n_bins). Edges are the lowest confidence of each bin
    and the highest overall.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    probs, labels = _inputs(probs, labels)
    confidence, correct = top_label(probs, labels)
    n = confidence.shape[0]
    n_bins = min(n_bins, n)
    order = torch.argsort(confidence, stable=True)  # [N]
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n))  # [N] position in order
    bin_index = rank * n_bins // n  # [N] equal-size groups
    count, mean_conf, accuracy = _bin_statistics(confidence, correct, bin_index, n_bins)
    sorted_conf = confidence[order]
    starts = torch.arange(n_bins) * n // n_bins  # first sorted position of each bin
    edges = torch.cat([sorted_conf[starts], sorted_conf[-1:]])  # [B + 1]
    return ReliabilityBins(edges, count, mean_conf, accuracy)


def _expected_gap(bins: ReliabilityBins) -> float:
    weights = bins.count / bins.count.sum()  # [B]
    return float((weights * bins.gap).sum())


def expected_calibration_error(
    probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_BINS
) -> float:
    """ECE: count-weighted mean |accuracy - confidence| over equal-width top-label bins."""
    return _expected_gap(reliability_bins(probs, labels, n_bins))


def adaptive_calibration_error(
    probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_BINS
) -> float:
    """Adaptive ECE: the same weighted gap over equal-mass bins (Nixon et al. 2019)."""
    return _expected_gap(equal_mass_bins(probs, labels, n_bins))


def maximum_calibration_error(
    probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_BINS
) -> float:
    """MCE: the largest |accuracy - confidence| over non-empty equal-width bins."""
    bins = reliability_bins(probs, labels, n_bins)
    return float(bins.gap[bins.count > 0].max())


def brier_score(probs: ArrayLike, labels: ArrayLike) -> float:
    """Multi-class Brier score: mean over examples of sum_c (p_c - 1[y = c])^2, in [0, 2]."""
    probs, labels = _inputs(probs, labels)
    one_hot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)  # [N, C]
    return float(((probs - one_hot) ** 2).sum(dim=1).mean())


def negative_log_likelihood(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean -log p_y (nats)."""
    probs, labels = _inputs(probs, labels)
    p_true = probs.gather(1, labels[:, None]).squeeze(1)  # [N]
    return float(-p_true.clamp(min=_MIN_PROB).log().mean())


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    probs, labels = _inputs(probs, labels)
    return float(top_label(probs, labels)[1].mean())


def calibration_report(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_BINS):
    """All metrics at once, as a JSON-safe dict of floats."""
    return {
        "accuracy": accuracy(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "adaptive_ece": adaptive_calibration_error(probs, labels, n_bins),
        "mce": maximum_calibration_error(probs, labels, n_bins),
        "brier": brier_score(probs, labels),
    }
