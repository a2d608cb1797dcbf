"""Conformal ranks k = ceil((n + 1)(1 - alpha)) against exact rational arithmetic, for large
calibration sets and for (n, alpha) pairs where (n + 1)(1 - alpha) is an integer."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from calibration.quantile import class_conditional_quantiles, conformal_rank, conformal_ranks

# The alphas people use, then a spread of three-decimal ones: with float32 arithmetic the
# latter got the rank wrong for about one n in a hundred above n = 17,000.
ROUND_ALPHAS = (0.1, 0.05, 0.2, 0.01, 0.3, 0.15, 0.25, 0.02, 0.005, 0.001)
GRID_ALPHAS = (0.003, 0.007, 0.017, 0.021, 0.049, 0.058, 0.063, 0.109, 0.169, 0.257, 0.4, 0.7)

# Pairs that float32 arithmetic got wrong: too small by one (coverage below 1 - alpha) ...
FLOAT32_TOO_SMALL = [
    (17_550, 0.049),
    (17_618, 0.021),
    (17_856, 0.007),
    (18_070, 0.169),
    (19_210, 0.109),
    (34_930, 0.058),
    (131_798, 0.005),
]
# ... or too large by one where (n + 1)(1 - alpha) is an integer (25 * 0.6 = 15).
EXACT_INTEGER = [(19, 0.05), (24, 0.4), (49, 0.46), (49, 0.7), (99, 0.9), (199_999, 0.1)]


def exact_ranks(n: torch.Tensor, alpha: float) -> torch.Tensor:
    """ceil((n + 1)(1 - alpha)) in integers, alpha read as the decimal it is written as."""
    one_minus = 1 - Fraction(str(alpha))
    numerator, denominator = one_minus.numerator, one_minus.denominator
    return (-((-(n + 1) * numerator) // denominator)).clamp(min=1)  # ceil by floor division


def exact_rank(n: int, alpha: float) -> int:
    return max(1, math.ceil((n + 1) * (1 - Fraction(str(alpha)))))


@pytest.mark.parametrize("alpha", ROUND_ALPHAS + GRID_ALPHAS)
def test_ranks_match_exact_arithmetic_up_to_200k_points(alpha: float) -> None:
    n = torch.arange(1, 200_001)  # [n]
    assert torch.equal(conformal_ranks(n, alpha), exact_ranks(n, alpha))


def test_exact_ranks_helper_agrees_with_fractions() -> None:
    n = torch.tensor([1, 19, 24, 17_000, 123_457, 200_000])
    for alpha in ROUND_ALPHAS + GRID_ALPHAS:
        assert exact_ranks(n, alpha).tolist() == [exact_rank(int(m), alpha) for m in n]


@pytest.mark.parametrize(("n", "alpha"), EXACT_INTEGER)
def test_an_integer_product_is_not_bumped_up(n: int, alpha: float) -> None:
    product = (n + 1) * (1 - Fraction(str(alpha)))
    assert product.denominator == 1
    assert conformal_rank(n, alpha) == int(product)
    assert int(conformal_ranks(torch.tensor([n]), alpha)) == int(product)


def test_ranks_keep_the_shape_of_the_counts() -> None:
    n = torch.tensor([[0, 1], [9, 10]])
    assert conformal_ranks(n, 0.1).tolist() == [[1, 2], [9, 10]]


def class_zero_quantile(n: int, alpha: float) -> float:
    """Class 0 holds the scores 0, 1, ..., n - 1, so its quantile is the rank minus one."""
    scores = torch.arange(n + 3, dtype=torch.float64)
    labels = torch.zeros(n + 3, dtype=torch.long)
    labels[n:] = 1  # three points of another class, which must not count
    return float(class_conditional_quantiles(scores, labels, 2, alpha)[0])


LARGE_N = (17_000, 100_001, 200_000)


@pytest.mark.parametrize(
    ("n", "alpha"),
    FLOAT32_TOO_SMALL + EXACT_INTEGER + [(n, a) for n in LARGE_N for a in ROUND_ALPHAS[:5]],
)
def test_class_conditional_quantile_uses_the_exact_rank(n: int, alpha: float) -> None:
    k = exact_rank(n, alpha)
    assert class_zero_quantile(n, alpha) == (k - 1 if k <= n else math.inf)


def test_class_conditional_ranks_per_row_use_each_rows_count() -> None:
    # Two re-splits of the same points with different class sizes: 17,550 and 19,210.
    total = 20_000
    scores = torch.arange(total, dtype=torch.float64).repeat(2, 1)  # [2, total]
    labels = torch.ones(2, total, dtype=torch.long)
    labels[0, :17_550] = 0
    labels[1, :19_210] = 0
    qhat = class_conditional_quantiles(scores, labels, 2, 0.049)[:, 0]  # [2]
    assert qhat.tolist() == [exact_rank(17_550, 0.049) - 1, exact_rank(19_210, 0.049) - 1]
