"""Early decisions for sequence classifiers: coverage at the stopping time over re-splits,
steps saved, the stepwise reference, and why the alpha / K correction is needed."""

from __future__ import annotations

import math

import pytest
import torch

from calibration.early_decision import EarlyDecisionRule
from calibration.quantile import conformal_quantile
from calibration.scores import APS, LAC
from calibration.synthetic import sample_evidence_streams

NUM_STEPS = 8
N_SPLITS = 100
Z = 3.0


@pytest.fixture(scope="module")
def streams() -> tuple[torch.Tensor, torch.Tensor]:
    # Accuracy grows from ~50% after one step to ~99% after eight.
    return sample_evidence_streams(
        2000, NUM_STEPS, 10, torch.Generator().manual_seed(0), evidence_per_step=1.5
    )


def resplit_coverage(probs, labels, make_rule) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage at stopping [S] and fraction of steps saved [S] over random 1000/1000 splits."""
    generator = torch.Generator().manual_seed(1)
    coverage, saved = [], []
    for _ in range(N_SPLITS):
        order = torch.randperm(len(labels), generator=generator)
        cal, test = order[:1000], order[1000:]
        report = make_rule(probs[cal], labels[cal]).evaluate(probs[test], labels[test])
        coverage.append(report.coverage)
        saved.append(report.fraction_steps_saved)
    return torch.tensor(coverage, dtype=torch.float64), torch.tensor(saved, dtype=torch.float64)


@pytest.mark.parametrize("max_set_size", [1, 2])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_coverage_at_the_stopping_time(streams, alpha: float, max_set_size: int) -> None:
    probs, labels = streams
    coverage, saved = resplit_coverage(
        probs,
        labels,
        lambda p, y: EarlyDecisionRule.calibrate(p, y, alpha, max_set_size=max_set_size),
    )
    mean, se = float(coverage.mean()), float(coverage.std()) / math.sqrt(N_SPLITS)
    assert mean >= 1 - alpha - Z * se
    # Stopping early is the point: on these streams a fifth of the steps or more are saved.
    assert float(saved.mean()) > 0.2


def test_without_the_bonferroni_correction_stopping_early_undercovers(streams) -> None:
    # Stopping at the first small set picks the checkpoint where the set looks best, so a
    # per-checkpoint level of alpha is not enough at the stopping time.
    probs, labels = streams
    alpha = 0.2

    def uncorrected(p: torch.Tensor, y: torch.Tensor) -> EarlyDecisionRule:
        scores = torch.stack([LAC().score(p[:, k], y) for k in range(NUM_STEPS)], dim=1)
        thresholds = conformal_quantile(scores.T, alpha)  # [K] at alpha, not alpha / K
        return EarlyDecisionRule(LAC(), thresholds, alpha, 1, tuple(range(1, NUM_STEPS + 1)))

    coverage, _ = resplit_coverage(probs, labels, uncorrected)
    mean, se = float(coverage.mean()), float(coverage.std()) / math.sqrt(N_SPLITS)
    assert mean + Z * se < 1 - alpha


@pytest.mark.parametrize("score", [LAC(), APS()], ids=repr)
def test_batched_run_agrees_with_the_stepwise_reference(streams, score) -> None:
    probs, labels = streams
    rule = EarlyDecisionRule.calibrate(probs[:1000], labels[:1000], 0.1, 2, score=score)
    stop_at, sets = rule.run(probs[1000:1300])
    reference_stop, reference_sets = rule.run_reference(probs[1000:1300])
    assert torch.equal(stop_at, reference_stop)
    assert torch.equal(sets, reference_sets)
    early = stop_at < NUM_STEPS - 1
    assert bool((sets[early].sum(dim=1) <= 2).all())


def test_thresholds_are_per_checkpoint_quantiles_at_alpha_over_k(streams) -> None:
    probs, labels = streams
    rule = EarlyDecisionRule.calibrate(probs[:500], labels[:500], 0.1)
    for k in range(NUM_STEPS):
        expected = conformal_quantile(LAC().score(probs[:500, k], labels[:500]), 0.1 / NUM_STEPS)
        assert float(rule.thresholds[k]) == float(expected)


def test_decide_always_stops_at_the_last_checkpoint(streams) -> None:
    probs, labels = streams
    rule = EarlyDecisionRule.calibrate(probs[:500], labels[:500], 0.1)
    stop, sets = rule.decide(probs[500:600, 0], checkpoint=0)
    assert torch.equal(stop, sets.sum(dim=1) <= 1)
    stop_last, _ = rule.decide(probs[500:600, -1], checkpoint=NUM_STEPS - 1)
    assert bool(stop_last.all())


def test_steps_saved_count_time_steps_between_checkpoints(streams) -> None:
    probs, labels = streams
    # Checkpoints every second step of a 16-step sequence (the probabilities are reused).
    steps = (2, 4, 6, 8, 10, 12, 14, 16)
    rule = EarlyDecisionRule.calibrate(probs[:1000], labels[:1000], 0.1, checkpoint_steps=steps)
    report = rule.evaluate(probs[1000:], labels[1000:])
    stop_at, _ = rule.run(probs[1000:])
    expected_stop = float(torch.tensor(steps, dtype=torch.float64)[stop_at].mean())
    assert report.mean_stop_step == pytest.approx(expected_stop)
    assert report.mean_steps_saved == pytest.approx(16 - expected_stop)
    assert report.fraction_steps_saved == pytest.approx((16 - expected_stop) / 16)
    longer = rule.evaluate(probs[1000:], labels[1000:], total_steps=20)
    assert longer.mean_steps_saved == pytest.approx(20 - expected_stop)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p, y: EarlyDecisionRule.calibrate(p[:, 0], y, 0.1), r"\[N, K, C\]"),
        (lambda p, y: EarlyDecisionRule.calibrate(p, y, 0.1, max_set_size=0), "max_set_size"),
        (lambda p, y: EarlyDecisionRule.calibrate(p, y, 1.2), r"\(0, 1\)"),
        (
            lambda p, y: EarlyDecisionRule.calibrate(p, y, 0.1, checkpoint_steps=(1, 1, 2)),
            "increasing",
        ),
        (
            lambda p, y: EarlyDecisionRule.calibrate(p[:0], y[:0], 0.1),
            "calibration set is empty",
        ),
        (lambda p, y: EarlyDecisionRule.calibrate(p, y, 0.1).run(p[:, :2]), "3 checkpoints"),
        (lambda p, y: EarlyDecisionRule.calibrate(p, y, 0.1).decide(p[:, 0], 3), "0..2"),
        (
            lambda p, y: EarlyDecisionRule.calibrate(p, y, 0.1).evaluate(p, y, total_steps=2),
            "before the last checkpoint",
        ),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(call, message: str) -> None:
    probs, labels = sample_evidence_streams(20, 3, 4, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=message):
        call(probs, labels)
