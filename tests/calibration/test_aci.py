"""Adaptive conformal inference on a stream with an abrupt shift halfway, Gibbs & Candès'
deterministic miscoverage bound, the full/empty sets outside (0, 1), and the state's JSON
round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from calibration.aci import AdaptiveConformal
from calibration.quantile import conformal_quantile
from calibration.scores import LAC
from calibration.synthetic import sample_classifier_outputs

ALPHA = 0.1
GAMMA = 0.02
HALF = 3000  # stream steps before and after the shift
WINDOW = 2000  # the last WINDOW steps: well after the shift


def shifted_stream() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Calibration scores [n], stream probs [2 * HALF, C] and labels [2 * HALF].

    Before the shift the stream is exchangeable with the calibration data. After it the
    model reports the same kind of logits but is three times overconfident: labels follow
    softmax(z / 3), so its top labels are right far less often than it claims.
    """
    generator = torch.Generator().manual_seed(0)
    cal_logits, cal_labels = sample_classifier_outputs(1000, 10, generator)
    clean_logits, clean_labels = sample_classifier_outputs(HALF, 10, generator)
    shifted_logits, shifted_labels = sample_classifier_outputs(
        HALF, 10, generator, logit_scale=1.0, overconfidence=3.0
    )
    calibration_scores = LAC().score(cal_logits.softmax(1), cal_labels)
    probs = torch.cat([clean_logits, shifted_logits]).softmax(dim=1)
    return calibration_scores, probs, torch.cat([clean_labels, shifted_labels])


def run_stream(aci: AdaptiveConformal, calibration_scores, probs, labels):
    """Online loop: set from the current level, then feedback. Returns errors and levels."""
    errors, levels = [], []
    for probs_t, label in zip(probs, labels, strict=True):
        levels.append(aci.alpha_t)
        sets = LAC().prediction_sets(probs_t[None], aci.quantile(calibration_scores))  # [1, C]
        covered = bool(sets[0, label])
        errors.append(0.0 if covered else 1.0)
        aci.update(covered)
    return torch.tensor(errors, dtype=torch.float64), torch.tensor(levels, dtype=torch.float64)


@pytest.fixture(scope="module")
def stream_run():
    calibration_scores, probs, labels = shifted_stream()
    aci = AdaptiveConformal(ALPHA, GAMMA)
    errors, levels = run_stream(aci, calibration_scores, probs, labels)
    fixed_qhat = conformal_quantile(calibration_scores, ALPHA)
    fixed_sets = LAC().prediction_sets(probs, fixed_qhat)
    fixed_errors = (~fixed_sets[torch.arange(len(labels)), labels]).to(torch.float64)
    return aci, errors, levels, fixed_errors


def test_fixed_split_conformal_loses_coverage_after_the_shift(stream_run) -> None:
    _, _, _, fixed_errors = stream_run
    # Before the shift it is exchangeable: miscoverage near alpha (binomial 3-SE band,
    # widened by the calibration set's own 1/(n+1) slack).
    before = float(fixed_errors[:HALF].mean())
    assert abs(before - ALPHA) <= 3 * math.sqrt(ALPHA * (1 - ALPHA) / HALF) + 1 / 1001
    # After it, miscoverage stays far above alpha: more than 3 binomial SE of the window.
    after = float(fixed_errors[-WINDOW:].mean())
    assert after - ALPHA > 3 * math.sqrt(ALPHA * (1 - ALPHA) / WINDOW)
    assert after > 2 * ALPHA


def test_aci_miscoverage_returns_to_alpha_after_the_shift(stream_run) -> None:
    _, errors, levels, _ = stream_run
    # Summing the update over any window of W steps telescopes:
    #   sum (alpha - err_t) = (alpha_end - alpha_start) / gamma,
    # and alpha_t stays in [-gamma, 1 + gamma], so |window miscoverage - alpha| is at most
    # (1 + 2 gamma) / (W gamma) -- deterministically, whatever the data does.
    window_bound = (1 + 2 * GAMMA) / (WINDOW * GAMMA)
    assert abs(float(errors[-WINDOW:].mean()) - ALPHA) <= window_bound
    # The level had to drop to compensate for the now overconfident model.
    assert float(levels[-WINDOW:].mean()) < ALPHA


def test_paper_bound_holds_over_the_whole_stream(stream_run) -> None:
    aci, errors, levels, _ = stream_run
    assert aci.steps == len(errors) and aci.miscovered == int(errors.sum())
    bound = (max(ALPHA, 1 - ALPHA) + GAMMA) / (len(errors) * GAMMA)
    assert aci.miscoverage_bound() == pytest.approx(bound)
    assert abs(aci.miscoverage_rate - ALPHA) <= bound
    # ... and every prefix obeys its own bound, because the level never leaves its band.
    steps = torch.arange(1, len(errors) + 1, dtype=torch.float64)
    prefix_rate = errors.cumsum(0) / steps
    prefix_bound = (max(ALPHA, 1 - ALPHA) + GAMMA) / (steps * GAMMA)
    assert bool(((prefix_rate - ALPHA).abs() <= prefix_bound + 1e-12).all())
    assert float(levels.min()) >= -GAMMA and float(levels.max()) <= 1 + GAMMA


def test_levels_outside_zero_one_give_full_and_empty_sets() -> None:
    scores = torch.linspace(0.0, 1.0, 100, dtype=torch.float64)
    probs = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    full = AdaptiveConformal(0.1, alpha_t=-0.01)
    assert LAC().prediction_sets(probs, full.quantile(scores)).all()
    full.update(covered=True)  # a full set always covers: the level rises by gamma * alpha
    assert full.alpha_t == pytest.approx(-0.01 + full.gamma * 0.1)
    empty = AdaptiveConformal(0.1, alpha_t=1.0)
    assert not LAC().prediction_sets(probs, empty.quantile(scores)).any()
    empty.update(covered=False)  # an empty set always misses: the level falls
    assert empty.alpha_t == pytest.approx(1.0 - empty.gamma * 0.9)


def test_state_round_trips_through_json() -> None:
    aci = AdaptiveConformal(0.2, gamma=0.01)
    for covered in (True, False, False, True, True):
        aci.update(covered)
    restored = AdaptiveConformal.from_dict(json.loads(json.dumps(aci.to_dict())))
    assert restored == aci
    assert restored.miscoverage_rate == pytest.approx(2 / 5)
    assert restored.initial_alpha == 0.2
    assert math.isnan(AdaptiveConformal(0.1).miscoverage_rate)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: AdaptiveConformal(0.0), r"alpha must be a number in the open interval \(0, 1\)"),
        (lambda: AdaptiveConformal(0.1, gamma=0.0), "gamma must be a positive"),
        (lambda: AdaptiveConformal(0.1, alpha_t=float("inf")), "finite"),
        (lambda: AdaptiveConformal(0.1, steps=2, miscovered=3), "miscovered <= steps"),
        (lambda: AdaptiveConformal.from_dict({"target_alpha": 0.1}), "needs exactly the keys"),
        (lambda: AdaptiveConformal.from_dict([0.1]), "needs exactly the keys"),
    ],
)
def test_bad_state_is_rejected_with_a_clear_message(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
