"""Conformity scores: consistency between calibration scores and prediction sets (property
tests), agreement with per-example loops written from the papers' formulas, and edge cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.scores import (
    APS,
    LAC,
    RAPS,
    SCORE_NAMES,
    TopK,
    make_score,
    pick_k_reg,
    tune_raps,
)
from calibration.synthetic import sample_classifier_outputs

ALL_SCORES = [
    LAC(),
    APS(),
    APS(randomized=True),
    RAPS(lam=0.3, k_reg=1),
    RAPS(lam=0.05, k_reg=2, randomized=True),
    TopK(),
]


@st.composite
def probability_tables(draw) -> torch.Tensor:
    """[N, C] probability rows; values come partly from a tiny set so that ties are common."""
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 6))
    entry = st.one_of(st.sampled_from([0.0, 1.0, 2.0]), st.floats(0.001, 10.0))
    weights = torch.tensor(draw(st.lists(entry, min_size=n * c, max_size=n * c)))
    weights = weights.reshape(n, c).to(torch.float64)
    weights[weights.sum(dim=1) == 0] = 1.0  # an all-zero row becomes uniform
    return weights / weights.sum(dim=1, keepdim=True)


@settings(max_examples=150, deadline=None)
@given(
    probs=probability_tables(),
    score_index=st.integers(0, len(ALL_SCORES) - 1),
    seed=st.integers(0, 2**16),
    qhat_source=st.one_of(st.floats(-0.5, 7.0), st.integers(0, 35)),
)
def test_label_is_in_the_set_iff_its_score_is_at_most_qhat(
    probs: torch.Tensor, score_index: int, seed: int, qhat_source
) -> None:
    score = ALL_SCORES[score_index]
    n, num_classes = probs.shape
    if isinstance(qhat_source, int):  # exactly one of the scores: the boundary case
        table = score.label_scores(probs, torch.Generator().manual_seed(seed))
        qhat = float(table.flatten()[qhat_source % table.numel()])
    else:
        qhat = qhat_source
    sets = score.prediction_sets(probs, qhat, torch.Generator().manual_seed(seed))
    assert sets.shape == (n, num_classes) and sets.dtype == torch.bool
    for label in range(num_classes):
        labels = torch.full((n,), label)
        label_score = score.score(probs, labels, torch.Generator().manual_seed(seed))  # [N]
        assert torch.equal(label_score <= qhat, sets[:, label])


def order_of(row: list[float]) -> list[int]:
    """Labels by decreasing probability, ties by label index."""
    return sorted(range(len(row)), key=lambda label: (-row[label], label))


def reference_scores(name: str, row: list[float], u: float, lam: float = 0.0, k_reg: int = 0):
    """One example's score for every label, straight from the papers' definitions."""
    order = order_of(row)
    scores = [0.0] * len(row)
    for position, label in enumerate(order):
        rank = position + 1
        mass_above = sum(row[other] for other in order[:position])
        if name == "lac":
            scores[label] = 1.0 - row[label]
        elif name == "topk":
            scores[label] = float(rank)
        else:  # APS (lam = 0) and RAPS
            own = u * row[label] if name.endswith("randomized") else row[label]
            scores[label] = mass_above + own + lam * max(0, rank - k_reg)
    return scores


@pytest.mark.parametrize(
    "score",
    [LAC(), APS(), APS(randomized=True), RAPS(0.2, 2), RAPS(0.1, 1, randomized=True), TopK()],
    ids=lambda score: repr(score),
)
def test_vectorised_scores_match_per_example_reference(score) -> None:
    generator = torch.Generator().manual_seed(0)
    probs = (2 * torch.randn(40, 6, generator=generator, dtype=torch.float64)).softmax(dim=1)
    probs[:5] = torch.tensor([0.3, 0.3, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)  # ties
    uniform = torch.rand(40, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    table = score.label_scores(probs, torch.Generator().manual_seed(7))
    params = score.params()
    name = score.name
    for row, u, got in zip(probs.tolist(), uniform.tolist(), table.tolist(), strict=True):
        expected = reference_scores(name, row, u, params.get("lam", 0.0), params.get("k_reg", 0))
        assert got == pytest.approx(expected, abs=1e-12)


def test_raps_without_penalty_is_aps() -> None:
    probs = (torch.randn(30, 5, generator=torch.Generator().manual_seed(1))).softmax(1)
    assert torch.equal(RAPS(0.0, 0).label_scores(probs), APS().label_scores(probs))


def test_ties_are_ranked_by_label_index() -> None:
    probs = torch.full((1, 4), 0.25, dtype=torch.float64)
    assert TopK().label_scores(probs).tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert APS().label_scores(probs).tolist() == [[0.25, 0.5, 0.75, 1.0]]


def test_a_single_class_has_trivial_scores() -> None:
    probs, labels = torch.ones(3, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
    assert LAC().score(probs, labels).tolist() == [0.0, 0.0, 0.0]
    assert APS().score(probs, labels).tolist() == [1.0, 1.0, 1.0]
    assert TopK().score(probs, labels).tolist() == [1.0, 1.0, 1.0]
    assert APS().prediction_sets(probs, 1.0).all()


def test_class_wise_quantiles_broadcast_over_labels() -> None:
    probs = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    qhat = torch.tensor([0.5, 0.5, 0.95], dtype=torch.float64)  # LAC: 1 - p <= q_c
    assert LAC().prediction_sets(probs, qhat).tolist() == [[True, False, True]]


def test_pick_k_reg_is_the_top_k_conformal_quantile() -> None:
    logits, labels = sample_classifier_outputs(500, 10, torch.Generator().manual_seed(2))
    probs = logits.softmax(1)
    k_reg = pick_k_reg(probs, labels, 0.1)
    ranks = TopK().score(probs, labels)
    # k_reg labels cover at least ceil(501 * 0.9) = 451 examples; one fewer does not.
    assert int((ranks <= k_reg).sum()) >= 451
    assert int((ranks <= k_reg - 1).sum()) < 451


def test_tune_raps_prefers_a_penalty_when_tails_are_long() -> None:
    # 50 classes, a weak signal: APS sets absorb many tail labels that a penalty removes.
    logits, labels = sample_classifier_outputs(
        600, 50, torch.Generator().manual_seed(3), logit_scale=1.5
    )
    tuned = tune_raps(logits.softmax(1), labels, alpha=0.1)
    assert tuned.lam > 0
    assert 1 <= tuned.k_reg <= 50
    randomized = tune_raps(
        logits.softmax(1), labels, 0.1, randomized=True, rng=torch.Generator().manual_seed(0)
    )
    assert randomized.randomized and randomized.name == "raps_randomized"


def test_make_score_builds_every_registered_name() -> None:
    for name in SCORE_NAMES:
        score = make_score(name, lam=0.1, k_reg=2)
        assert score.name == name
        assert score.randomized == name.endswith("randomized")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_score("margin"), "unknown conformity score 'margin'"),
        (lambda: make_score("raps"), r"needs parameters \['k_reg', 'lam'\]"),
        (lambda: RAPS(-1.0, 1), "lam must be a finite number >= 0"),
        (lambda: RAPS(0.1, 1.5), "k_reg must be an integer >= 0"),
        (lambda: APS(randomized=True).label_scores(torch.ones(1, 1)), "needs rng"),
        (lambda: APS(randomized=True).label_scores(torch.ones(1, 1), rng=3), "torch.Generator"),
        (lambda: LAC().score(torch.ones(2, 1), torch.zeros(3, dtype=torch.long)), r"shape \[2\]"),
        (lambda: LAC().prediction_sets(torch.ones(1, 1), float("nan")), "qhat is NaN"),
        (lambda: tune_raps(torch.ones(3, 1), torch.zeros(3, dtype=torch.long), 0.1), "at least 4"),
        (lambda: tune_raps(torch.ones(5, 1), torch.zeros(5, dtype=torch.long), 1.0), "alpha"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
