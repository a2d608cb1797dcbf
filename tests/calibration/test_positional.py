"""Calibration per position: buckets, one fit per position, storage, the early-decision rule
built from it, and coverage at every position over many re-drawn calibrations."""

from __future__ import annotations

import math

import pytest
import torch

from calibration import (
    EarlyDecisionRule,
    PositionalCalibration,
    PositionBuckets,
    fit_calibration_artifact,
    fit_positional_calibration,
    fit_stepwise_calibration,
)
from calibration.position_report import coverage_interval, position_report
from calibration.quantile import conformal_quantile
from calibration.synthetic import sample_evidence_streams

NUM_STEPS = 6
CREATED = "2026-01-01T00:00:00+00:00"


def stream_logits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits after every step [n, T, C] of streams that sharpen over time, and labels [n]."""
    probs, labels = sample_evidence_streams(
        n, NUM_STEPS, 10, torch.Generator().manual_seed(seed), evidence_per_step=1.0
    )
    return probs.clamp_min(1e-12).log(), labels


@pytest.fixture(scope="module")
def calibration() -> PositionalCalibration:
    logits, labels = stream_logits(400, seed=0)
    return fit_stepwise_calibration(logits, labels, "m", "1", "torch", seed=0, created=CREATED)


# ---- buckets ----------------------------------------------------------------------------------


def test_buckets_map_positions_to_their_bucket() -> None:
    steps = PositionBuckets.every_step(8)
    assert steps.horizon == 8 and len(steps) == 8
    assert [steps.index(p) for p in (1, 5, 8)] == [0, 4, 7]
    assert steps.index(0) is None and steps.index(9) is None
    doubling = PositionBuckets.doubling(256)
    assert doubling.edges == (1, 2, 4, 8, 16, 32, 64, 128, 257)
    assert [doubling.describe(k) for k in (0, 1, 7)] == ["1", "2-3", "128-256"]
    assert doubling.index(3) == 1 and doubling.index(256) == 7 and doubling.index(257) is None
    assert PositionBuckets.doubling(100).edges == (1, 2, 4, 8, 16, 32, 64, 101)


@pytest.mark.parametrize("edges", [(1,), (0, 2), (1, 3, 3), (2, 1), (1, 2.5)])
def test_bad_bucket_edges_are_refused(edges) -> None:
    with pytest.raises(ValueError, match="bucket edges"):
        PositionBuckets(edges)


# ---- fitting and lookup -----------------------------------------------------------------------


def test_every_position_has_its_own_fit_and_none_lies_past_the_horizon(calibration) -> None:
    logits, labels = stream_logits(400, seed=0)
    assert calibration.horizon == NUM_STEPS
    for step in range(1, NUM_STEPS + 1):
        alone = fit_calibration_artifact(
            logits[:, step - 1], labels, "m", "1", "torch", seed=0, created=CREATED
        )
        artifact = calibration.at(step)
        assert torch.equal(artifact.scores["lac"], alone.scores["lac"])
        # The same seed splits every step alike: the same examples are the conformal part.
        assert torch.equal(artifact.labels, calibration.at(1).labels)
    assert calibration.at(NUM_STEPS + 1) is None and calibration.at(0) is None
    # Early steps are less certain: their scores, hence their sets, are larger.
    assert float(calibration.at(1).quantile(0.1, "lac")) > float(
        calibration.at(NUM_STEPS).quantile(0.1, "lac")
    )


def test_a_fit_names_the_position_that_failed() -> None:
    logits, labels = stream_logits(40, seed=1)
    buckets = PositionBuckets((1, 2, 3))
    with pytest.raises(ValueError, match="position 2: .*too few"):
        fit_positional_calibration(
            [logits[:, 0], logits[:3, 1]], [labels, labels[:3]], buckets, "m", "1", "torch"
        )


def test_storage_round_trip_and_identity(calibration) -> None:
    loaded = PositionalCalibration.from_serialized(
        calibration.to_json(), calibration.to_safetensors()
    )
    assert loaded.buckets == calibration.buckets
    assert loaded.calibration_id == calibration.calibration_id
    logits, _ = stream_logits(50, seed=2)
    for step in (1, NUM_STEPS):
        assert torch.equal(
            loaded.at(step).predict(logits[:, step - 1], 0.1, "raps")[1],
            calibration.at(step).predict(logits[:, step - 1], 0.1, "raps")[1],
        )
    other = fit_stepwise_calibration(
        *stream_logits(400, seed=3), "m", "1", "torch", seed=0, created=CREATED
    )
    assert other.calibration_id != calibration.calibration_id


def test_a_single_position_artifact_file_is_refused_with_the_fix() -> None:
    logits, labels = stream_logits(40, seed=4)
    single = fit_calibration_artifact(logits[:, -1], labels, "m", "1", "torch")
    with pytest.raises(ValueError, match="run `neuroserve calibrate` again"):
        PositionalCalibration.from_serialized(single.to_json(), single.to_safetensors())


# ---- early decisions from the calibration -----------------------------------------------------


@pytest.mark.parametrize("score", ["lac", "raps"])
def test_the_early_decision_rule_uses_each_steps_scores_at_alpha_over_k(calibration, score) -> None:
    rule = EarlyDecisionRule.from_calibration(calibration, 0.1, score, max_set_size=1)
    assert rule.checkpoint_steps == tuple(range(1, NUM_STEPS + 1))
    for k, artifact in enumerate(calibration.artifacts):
        expected = conformal_quantile(artifact.scores[score], 0.1 / NUM_STEPS)
        assert float(rule.thresholds[k]) == float(expected)
    logits, _ = stream_logits(300, seed=5)
    probs = torch.stack(
        [a.calibrate(logits[:, k]) for k, a in enumerate(calibration.artifacts)], dim=1
    )
    stop_at, sets = rule.run(probs)
    reference_stop, reference_sets = rule.run_reference(probs)
    assert torch.equal(stop_at, reference_stop) and torch.equal(sets, reference_sets)


def test_early_decisions_need_a_deterministic_score_and_per_step_buckets(calibration) -> None:
    with pytest.raises(ValueError, match="deterministic score"):
        EarlyDecisionRule.from_calibration(calibration, 0.1, "aps_randomized")
    wide = PositionalCalibration(PositionBuckets((1, 3)), (calibration.artifacts[0],))
    with pytest.raises(ValueError, match="one bucket per step"):
        EarlyDecisionRule.from_calibration(wide, 0.1, "lac")


# ---- coverage at every position ---------------------------------------------------------------


def test_coverage_interval_is_the_beta_binomial_band() -> None:
    low, high = coverage_interval(0.1, 200, 397)
    se = math.sqrt(0.09 * (1 / 202 + 1 / 397))
    assert low == pytest.approx(0.9 - 3 * se) and high == pytest.approx(0.9 + 1 / 201 + 3 * se)


RUNS = 30  # independent calibrations, each on 400 fresh streams
TEST_STREAMS = 2000


@pytest.fixture(scope="module")
def many_calibrations() -> list[PositionalCalibration]:
    return [
        fit_stepwise_calibration(*stream_logits(400, seed=100 + run), "m", "1", "torch", seed=run)
        for run in range(RUNS)
    ]


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_coverage_holds_at_every_position_over_many_calibrations(
    many_calibrations, alpha: float
) -> None:
    """Over 30 independent calibrations (400 streams each, 200 conformal scores per step)
    and fresh test streams, the mean plain coverage at every step lies within 3 standard
    errors of [1 - alpha, 1 - alpha + 1/(n+1)], and the sets shrink as evidence accrues."""
    test_logits, test_labels = stream_logits(TEST_STREAMS, seed=999)
    coverage = torch.zeros(NUM_STEPS, dtype=torch.float64)
    sizes = torch.zeros(NUM_STEPS, dtype=torch.float64)
    for fitted in many_calibrations:
        rows = position_report(
            fitted,
            [test_logits[:, t] for t in range(NUM_STEPS)],
            [test_labels] * NUM_STEPS,
            alphas=[alpha],
            scores=["lac"],
        )
        coverage += torch.tensor([row.coverage for row in rows]) / RUNS
        sizes += torch.tensor([row.mean_set_size for row in rows]) / RUNS
    n = 200
    # The spread of one calibration's coverage (Beta) over runs, plus the shared test set's.
    se = math.sqrt(alpha * (1 - alpha) * (1 / (RUNS * (n + 2)) + 1 / TEST_STREAMS))
    assert (coverage >= 1 - alpha - 3 * se).all(), coverage
    assert (coverage <= 1 - alpha + 1 / (n + 1) + 3 * se).all(), coverage
    assert (sizes[1:] <= sizes[:-1] + 0.05).all(), sizes
