"""Finite-sample quantiles and the split-conformal predictor: exact ranks, infinite quantiles,
ties, empty and single-class calibration sets, invalid alpha, never-empty and Mondrian sets."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.conformal import SplitConformal, include_top_label_if_empty
from calibration.quantile import (
    class_conditional_quantiles,
    conformal_quantile,
    conformal_rank,
    quantile_at_level,
)
from calibration.scores import APS, LAC, TopK


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 3000), per_mille=st.integers(1, 999))
def test_rank_is_the_exact_ceiling_despite_float_rounding(n: int, per_mille: int) -> None:
    exact = math.ceil((n + 1) * (1 - Fraction(per_mille, 1000)))
    assert conformal_rank(n, per_mille / 1000) == exact


def test_known_rounding_trap() -> None:
    # 20 * (1 - 0.95) evaluates to 1.0000000000000009 in floating point; the rank is 1.
    assert conformal_rank(19, 0.95) == 1


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.floats(-10, 10), min_size=1, max_size=60),
    per_mille=st.integers(1, 999),
)
def test_quantile_is_the_kth_smallest_score_or_infinity(scores: list[float], per_mille: int):
    alpha = per_mille / 1000
    qhat = float(conformal_quantile(torch.tensor(scores, dtype=torch.float64), alpha))
    k = math.ceil((len(scores) + 1) * (1 - Fraction(per_mille, 1000)))
    assert qhat == (sorted(scores)[k - 1] if k <= len(scores) else math.inf)


def test_quantile_of_one_to_ten() -> None:
    scores = torch.arange(1.0, 11.0)  # n = 10
    assert float(conformal_quantile(scores, 0.2)) == 9.0  # ceil(11 * 0.8) = 9
    assert float(conformal_quantile(scores, 0.1)) == 10.0  # ceil(11 * 0.9) = 10
    assert float(conformal_quantile(scores, 0.05)) == math.inf  # ceil(11 * 0.95) = 11 > 10


def test_quantile_works_over_leading_dimensions() -> None:
    scores = torch.randn(7, 3, 50, generator=torch.Generator().manual_seed(0))
    batched = conformal_quantile(scores, 0.1)  # [7, 3]
    assert batched.shape == (7, 3)
    assert float(batched[4, 2]) == float(conformal_quantile(scores[4, 2], 0.1))


def test_tiny_alpha_gives_every_label() -> None:
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.5, 0.3]], dtype=torch.float64)
    predictor = SplitConformal.calibrate(LAC(), probs, torch.tensor([0, 1]))
    # n = 2: ceil(3 * (1 - alpha)) = 3 > 2 for every alpha < 1/3.
    assert float(predictor.quantile(0.3)) == math.inf
    assert predictor.predict(probs, 0.3).all()


def test_tied_scores_include_every_tied_label() -> None:
    probs = torch.full((5, 4), 0.25, dtype=torch.float64)
    predictor = SplitConformal.calibrate(LAC(), probs, torch.arange(5) % 4)
    assert float(predictor.quantile(0.5)) == 0.75  # every LAC score is 0.75
    assert predictor.predict(probs, 0.5).all()  # all four tied labels are in


def test_single_class_sets_are_that_class() -> None:
    probs = torch.ones(10, 1, dtype=torch.float64)
    labels = torch.zeros(10, dtype=torch.long)
    for score in (LAC(), APS(), TopK()):
        predictor = SplitConformal.calibrate(score, probs, labels)
        assert predictor.predict(probs, 0.1).all()
        assert predictor.predict(probs, 0.1, class_conditional=True).all()


def test_empty_calibration_set_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="calibration set is empty"):
        SplitConformal.calibrate(LAC(), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="calibration set is empty"):
        conformal_quantile(torch.zeros(0), 0.1)
    with pytest.raises(ValueError, match="calibration set is empty"):
        class_conditional_quantiles(torch.zeros(0), torch.zeros(0), 3, 0.1)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_invalid_alpha_names_the_valid_range(alpha) -> None:
    probs = torch.tensor([[0.7, 0.3]], dtype=torch.float64)
    predictor = SplitConformal.calibrate(LAC(), probs, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"alpha must be .*\(0, 1\)"):
        predictor.predict(probs, alpha)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        conformal_quantile(torch.ones(3), alpha)


def test_never_empty_adds_the_top_label_only_to_empty_sets() -> None:
    sets = torch.tensor([[False, False, False], [False, True, False]])
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]], dtype=torch.float64)
    filled = include_top_label_if_empty(sets, probs)
    assert filled.tolist() == [[False, True, False], [False, True, False]]


def test_never_empty_predictions_are_supersets_and_never_empty() -> None:
    generator = torch.Generator().manual_seed(1)
    probs = (3 * torch.randn(400, 10, generator=generator, dtype=torch.float64)).softmax(1)
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    predictor = SplitConformal.calibrate(LAC(), probs[:200], labels[:200])
    plain = predictor.predict(probs[200:], 0.3)
    filled = predictor.predict(probs[200:], 0.3, never_empty=True)
    assert (~plain.any(dim=1)).any(), "alpha = 0.3 should leave some LAC sets empty"
    assert filled.any(dim=1).all()
    assert (filled | plain).eq(filled).all()


def test_class_conditional_quantiles_use_each_class_alone() -> None:
    generator = torch.Generator().manual_seed(2)
    scores = torch.rand(300, generator=generator, dtype=torch.float64)
    labels = torch.randint(3, (300,), generator=generator)
    labels[labels == 2] = 1  # class 2 has no calibration point
    labels[:5] = 2  # ... now 5: fewer than (1 - alpha) / alpha = 9 at alpha = 0.1
    per_class = class_conditional_quantiles(scores, labels, 4, 0.1)
    for label in (0, 1):
        assert float(per_class[label]) == float(conformal_quantile(scores[labels == label], 0.1))
    assert float(per_class[2]) == math.inf  # too few points: always in the set
    assert float(per_class[3]) == math.inf  # no points at all: always in the set


def test_mondrian_sets_use_the_class_quantiles() -> None:
    generator = torch.Generator().manual_seed(3)
    probs = (2 * torch.randn(500, 5, generator=generator, dtype=torch.float64)).softmax(1)
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    predictor = SplitConformal.calibrate(LAC(), probs, labels)
    per_class = predictor.quantile(0.1, class_conditional=True)  # [C]
    sets = predictor.predict(probs, 0.1, class_conditional=True)
    assert torch.equal(sets, (1.0 - probs) <= per_class)


def test_quantile_at_level_outside_zero_one() -> None:
    scores = torch.arange(10.0)
    assert float(quantile_at_level(scores, 0.0)) == math.inf
    assert float(quantile_at_level(scores, -0.3)) == math.inf
    assert float(quantile_at_level(scores, 1.0)) == -math.inf
    assert float(quantile_at_level(scores, 1.2)) == -math.inf
    assert float(quantile_at_level(scores, 0.2)) == float(conformal_quantile(scores, 0.2))
    with pytest.raises(ValueError, match="NaN"):
        quantile_at_level(scores, float("nan"))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: SplitConformal.calibrate(
                LAC(), torch.ones(2, 1), torch.zeros(2, dtype=torch.long)
            ).predict(torch.full((1, 2), 0.5), 0.1),
            "calibrated for 1 classes",
        ),
        (lambda: conformal_quantile(torch.tensor(1.0), 0.1), r"at least one dimension"),
        (lambda: conformal_quantile(torch.tensor([float("nan")]), 0.1), "NaN"),
        (
            lambda: class_conditional_quantiles(torch.ones(3), torch.zeros(2), 2, 0.1),
            "must match scores",
        ),
        (
            lambda: SplitConformal(LAC(), torch.ones(3), torch.zeros(2, dtype=torch.long), 2),
            r"shape \[n\]",
        ),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
