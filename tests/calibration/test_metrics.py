"""Calibration metrics against hand-worked examples, slow loop references, scikit-learn, and
the sampling behaviour of calibrated and miscalibrated synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from calibration.metrics import (
    adaptive_calibration_error,
    brier_score,
    calibration_report,
    equal_mass_bins,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)


def binary_probs(confidence: torch.Tensor) -> torch.Tensor:
    return torch.stack([confidence, 1.0 - confidence], dim=1)  # [N, 2]


def loop_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> tuple[float, float]:
    """ECE and MCE with plain Python loops over examples and (lo, hi] bins."""
    members: list[list[tuple[float, bool]]] = [[] for _ in range(n_bins)]
    for row, label in zip(probs.tolist(), labels.tolist(), strict=True):
        confidence = max(row)
        predicted = row.index(confidence)
        for b in range(n_bins):
            lo, hi = b / n_bins, (b + 1) / n_bins
            if lo < confidence <= hi or (b == 0 and confidence == 0.0):
                members[b].append((confidence, predicted == label))
                break
    n = len(labels)
    ece, mce = 0.0, 0.0
    for bucket in members:
        if bucket:
            gap = abs(
                sum(hit for _, hit in bucket) / len(bucket)
                - sum(c for c, _ in bucket) / len(bucket)
            )
            ece += len(bucket) / n * gap
            mce = max(mce, gap)
    return ece, mce


def test_hand_worked_example() -> None:
    # Two examples at confidence 0.85 (one right, one wrong), two at 0.55 (both right).
    probs = binary_probs(torch.tensor([0.85, 0.85, 0.55, 0.55], dtype=torch.float64))
    labels = torch.tensor([0, 1, 0, 0])
    # ECE = 1/2 * |0.5 - 0.85| + 1/2 * |1.0 - 0.55| = 0.175 + 0.225
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    assert maximum_calibration_error(probs, labels) == pytest.approx(0.45)
    # Brier per example: right at 0.85 -> 2 * 0.15^2, wrong -> 2 * 0.85^2, 0.55 -> 2 * 0.45^2
    expected_brier = (2 * 0.15**2 + 2 * 0.85**2 + 2 * 2 * 0.45**2) / 4
    assert brier_score(probs, labels) == pytest.approx(expected_brier)
    expected_nll = -(math.log(0.85) + math.log(0.15) + 2 * math.log(0.55)) / 4
    assert negative_log_likelihood(probs, labels) == pytest.approx(expected_nll)


@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_ece_and_mce_match_loop_reference(n_bins: int) -> None:
    generator = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(500, 7, generator=generator, dtype=torch.float64)
    probs = logits.softmax(dim=1)
    labels = torch.randint(7, (500,), generator=generator)
    ece, mce = loop_ece(probs, labels, n_bins)
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(ece, abs=1e-12)
    assert maximum_calibration_error(probs, labels, n_bins) == pytest.approx(mce, abs=1e-12)


def test_nll_and_brier_match_scikit_learn_and_numpy() -> None:
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(5), size=300)  # [300, 5]
    labels = rng.integers(0, 5, size=300)
    assert negative_log_likelihood(probs, labels) == pytest.approx(
        log_loss(labels, probs, labels=range(5)), rel=1e-9
    )
    one_hot = np.eye(5)[labels]
    assert brier_score(probs, labels) == pytest.approx(((probs - one_hot) ** 2).sum(1).mean())


def test_calibrated_data_has_small_ece_within_its_sampling_bound() -> None:
    # Outcomes drawn with probability equal to the stated confidence: in every bin the
    # accuracy is an unbiased estimate of the mean confidence, so E|gap_b| <= sd_b <= 0.5/sqrt(n_b)
    # and ECE <= sum_b w_b * 0.5 / sqrt(n_b) on average, with independent bins.
    generator = torch.Generator().manual_seed(3)
    n = 20_000
    confidence = 0.5 + 0.5 * torch.rand(n, generator=generator, dtype=torch.float64)
    correct = torch.rand(n, generator=generator, dtype=torch.float64) < confidence
    labels = (~correct).long()  # label 0 is the top label, right with probability = confidence
    probs = binary_probs(confidence)
    bins = reliability_bins(probs, labels)
    filled = bins.count > 0
    weights, counts = bins.count[filled] / n, bins.count[filled]
    mean_bound = float((weights * 0.5 / counts.sqrt()).sum())
    spread = float((weights**2 * 0.25 / counts).sum().sqrt())
    assert expected_calibration_error(probs, labels) <= mean_bound + 3 * spread


def test_overconfident_data_has_the_expected_ece() -> None:
    # Every example claims 0.95 but is right with probability 0.7: ECE = |acc - 0.95|, where
    # acc is a binomial proportion with mean 0.7 and standard error sqrt(0.7 * 0.3 / n).
    generator = torch.Generator().manual_seed(4)
    n = 10_000
    correct = torch.rand(n, generator=generator) < 0.7
    probs = binary_probs(torch.full((n,), 0.95, dtype=torch.float64))
    labels = (~correct).long()
    tolerance = 3 * math.sqrt(0.7 * 0.3 / n)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.25, abs=tolerance)
    # One occupied bin: adaptive ECE and MCE equal the plain ECE.
    assert adaptive_calibration_error(probs, labels) == pytest.approx(
        expected_calibration_error(probs, labels)
    )
    assert maximum_calibration_error(probs, labels) == pytest.approx(
        expected_calibration_error(probs, labels)
    )


def test_equal_mass_bins_hold_equal_counts_in_confidence_order() -> None:
    generator = torch.Generator().manual_seed(5)
    probs = (2 * torch.randn(1003, 4, generator=generator, dtype=torch.float64)).softmax(1)
    labels = torch.randint(4, (1003,), generator=generator)
    bins = equal_mass_bins(probs, labels, n_bins=10)
    assert int(bins.count.sum()) == 1003
    assert int(bins.count.max() - bins.count.min()) <= 1
    assert bool((bins.edges[1:] >= bins.edges[:-1]).all())
    assert bool((bins.mean_confidence[1:] >= bins.mean_confidence[:-1]).all())
    # Fewer examples than bins: one example per bin.
    assert equal_mass_bins(probs[:3], labels[:3], n_bins=10).count.tolist() == [1, 1, 1]


def test_reliability_bins_put_certain_predictions_in_the_last_bin() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    bins = reliability_bins(probs, labels, n_bins=4)
    assert bins.count.tolist() == [0, 1, 0, 2]
    assert bins.accuracy[3].item() == pytest.approx(0.5)  # one right, one wrong at confidence 1
    assert int(bins.count.sum()) == 3


def test_report_holds_every_metric_as_floats() -> None:
    probs = binary_probs(torch.tensor([0.9, 0.6], dtype=torch.float64))
    report = calibration_report(probs, torch.tensor([0, 1]))
    assert set(report) == {"accuracy", "nll", "ece", "adaptive_ece", "mce", "brier"}
    assert report["accuracy"] == pytest.approx(0.5)
    assert all(isinstance(value, float) for value in report.values())


def test_nll_of_a_zero_probability_label_is_finite_but_huge() -> None:
    probs = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert negative_log_likelihood(probs, torch.tensor([1])) > 600


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        (torch.tensor([[0.5, 0.6]]), torch.tensor([0]), "sum to 1"),
        (torch.tensor([[1.5, -0.5]]), torch.tensor([0]), "negative"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([2]), "labels must lie in 0..1"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0.0]), "integers"),
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "empty"),
        (torch.tensor([0.5, 0.5]), torch.tensor([0]), "shape"),
        (torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]), "NaN"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(probs, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(probs, labels)


def test_bin_count_must_be_positive() -> None:
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins(torch.tensor([[1.0]]), torch.tensor([0]), n_bins=0)
