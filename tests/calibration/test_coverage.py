"""Coverage of split conformal over many random calibration/test re-splits.

For exchangeable data, each score's mean coverage must lie in [1 - alpha, 1 - alpha +
1/(n + 1)] (the upper end only for untied scores), allowing 3 standard errors of the mean
estimated from the per-split spread; the Mondrian variant must do the same within every
class. Runs on synthetic exchangeable data always, and on the built-in digits classifiers
when they are committed: their calibration and test splits (797 points) are pooled and
re-split 400/397.

The guarantee holds conditionally on the pool: for a fixed pool and a uniformly random split,
a test point and the calibration points are a uniformly random arrangement of pool points,
whatever fixed function of the pool produced their scores. So every score must be fixed
before the re-splits: RAPS's k_reg and lam are tuned once, on separate synthetic data, or on
the whole digits pool in its fixed order (the only held-out digits data there is), never per
split.
"""

from __future__ import annotations

import math

import pytest
import torch

from calibration.evaluation import ResplitResult, random_splits, resplit_evaluate, resplit_reference
from calibration.scores import APS, LAC, RAPS, ConformityScore, TopK, tune_raps
from calibration.synthetic import sample_classifier_outputs
from tests.calibration.builtin_models import BUILTIN_CLASSIFIERS, builtin_logits

ALPHAS = (0.05, 0.1, 0.2)
N_SPLITS = 250
Z = 3.0  # standard errors allowed around the theoretical interval


def synthetic_pool() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(pool probs, pool labels, tuning probs, tuning labels, n_calibration)."""
    logits, labels = sample_classifier_outputs(1500, 10, torch.Generator().manual_seed(0))
    probs = logits.softmax(dim=1)
    return probs[500:], labels[500:], probs[:500], labels[:500], 500


def builtin_pool(name: str):
    cal_logits, cal_labels = builtin_logits(name, "calibration")
    test_logits, test_labels = builtin_logits(name, "test")
    probs = torch.cat([cal_logits, test_logits]).softmax(dim=1)  # [797, C]
    labels = torch.cat([cal_labels, test_labels])
    # RAPS is tuned once on the pool in its fixed order, before any re-split (see the module
    # docstring); the training split would not do, the model has memorised it.
    return probs, labels, probs, labels, 400


POOLS = ("synthetic", *BUILTIN_CLASSIFIERS)


@pytest.fixture(scope="module", params=POOLS)
def pool(request):
    if request.param == "synthetic":
        return synthetic_pool()
    return builtin_pool(request.param)


def scores_for(tune_probs: torch.Tensor, tune_labels: torch.Tensor) -> list[ConformityScore]:
    raps = tune_raps(tune_probs, tune_labels, alpha=0.1)
    return [
        LAC(),
        APS(),
        APS(randomized=True),
        raps,
        RAPS(raps.lam, raps.k_reg, randomized=True),
        TopK(),
    ]


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    values = values[~torch.isnan(values)]
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


def check_interval(values: torch.Tensor, lower: float, upper: float | None, what: str) -> None:
    mean, se = mean_and_se(values)
    assert mean >= lower - Z * se, f"{what}: mean coverage {mean:.4f} < {lower:.4f} - {Z} SE"
    if upper is not None:
        assert mean <= upper + Z * se, f"{what}: mean coverage {mean:.4f} > {upper:.4f} + {Z} SE"


@pytest.mark.parametrize("alpha", ALPHAS)
def test_marginal_coverage_is_within_the_finite_sample_interval(pool, alpha: float) -> None:
    probs, labels, tune_probs, tune_labels, n_cal = pool
    for score in scores_for(tune_probs, tune_labels):
        result = resplit_evaluate(
            probs, labels, score, n_cal, alpha, N_SPLITS, torch.Generator().manual_seed(1)
        )
        upper = 1 - alpha + 1 / (n_cal + 1) if result.untied else None
        check_interval(result.coverage, 1 - alpha, upper, f"{score!r} at alpha={alpha}")
        never_empty = resplit_evaluate(
            probs,
            labels,
            score,
            n_cal,
            alpha,
            N_SPLITS,
            torch.Generator().manual_seed(1),  # the same splits and U draws as above
            never_empty=True,
        )
        check_interval(never_empty.coverage, 1 - alpha, None, f"never-empty {score!r}")
        assert bool((never_empty.set_size >= result.set_size).all())
        assert float(never_empty.empty_fraction.max()) == 0.0


@pytest.mark.parametrize("alpha", ALPHAS)
def test_mondrian_coverage_holds_within_every_class(pool, alpha: float) -> None:
    probs, labels, _, _, n_cal = pool
    for score in (LAC(), APS(randomized=True)):
        result: ResplitResult = resplit_evaluate(
            probs,
            labels,
            score,
            n_cal,
            alpha,
            N_SPLITS,
            torch.Generator().manual_seed(2),
            class_conditional=True,
        )
        check_interval(result.coverage, 1 - alpha, None, f"Mondrian {score!r} marginal")
        for label in range(probs.shape[1]):
            upper = float(result.class_upper[:, label].mean()) if result.untied else None
            check_interval(
                result.class_coverage[:, label],
                1 - alpha,
                upper,
                f"Mondrian {score!r} class {label} at alpha={alpha}",
            )


@pytest.mark.parametrize("class_conditional", [False, True])
@pytest.mark.parametrize("score", [LAC(), APS(), RAPS(0.05, 2), TopK()], ids=repr)
def test_batched_resplits_agree_with_the_split_by_split_reference(score, class_conditional):
    probs, labels, _, _, n_cal = synthetic_pool()
    fast = resplit_evaluate(
        probs,
        labels,
        score,
        n_cal,
        0.1,
        5,
        torch.Generator().manual_seed(3),
        class_conditional=class_conditional,
        never_empty=True,
    )
    cal_idx, test_idx = random_splits(len(labels), n_cal, 5, torch.Generator().manual_seed(3))
    coverage, set_size = resplit_reference(
        probs, labels, score, cal_idx, test_idx, 0.1, class_conditional, never_empty=True
    )
    assert torch.allclose(fast.coverage, coverage)
    assert torch.allclose(fast.set_size, set_size)


@pytest.mark.parametrize("randomized", [False, True])
def test_tuned_raps_sets_are_no_larger_than_aps(randomized: bool) -> None:
    # 50 classes and a classifier right half the time: the many unlikely labels are ranked
    # by noise, and APS sets pick some of them up on the way to the threshold.
    logits, labels = sample_classifier_outputs(
        1500, 50, torch.Generator().manual_seed(4), logit_scale=3.0
    )
    probs = logits.softmax(dim=1)
    tuned = tune_raps(
        probs[:500], labels[:500], 0.1, randomized, rng=torch.Generator().manual_seed(5)
    )
    sizes = {}
    for score in (APS(randomized=randomized), tuned):
        result = resplit_evaluate(
            probs[500:], labels[500:], score, 500, 0.1, 150, torch.Generator().manual_seed(6)
        )
        sizes[score.name.split("_")[0]] = result.set_size  # same seed: the same splits
    mean, se = mean_and_se(sizes["raps"] - sizes["aps"])  # paired by split
    assert mean <= Z * se, f"RAPS is larger than APS by {mean:.3f} (SE {se:.3f})"
    if tuned.lam > 0:  # the tuning chose a penalty: it should pay off on fresh data
        assert mean + Z * se < 0, f"RAPS - APS = {mean:.3f} (SE {se:.3f}) is not negative"


def test_builtin_raps_is_no_larger_than_aps_on_average(pool) -> None:
    probs, labels, tune_probs, tune_labels, n_cal = pool
    tuned = tune_raps(tune_probs, tune_labels, alpha=0.1)
    generator_seed = 7
    aps = resplit_evaluate(
        probs, labels, APS(), n_cal, 0.1, N_SPLITS, torch.Generator().manual_seed(generator_seed)
    )
    raps = resplit_evaluate(
        probs, labels, tuned, n_cal, 0.1, N_SPLITS, torch.Generator().manual_seed(generator_seed)
    )
    mean, se = mean_and_se(raps.set_size - aps.set_size)
    assert mean <= Z * se, f"RAPS is larger than APS by {mean:.3f} (SE {se:.3f})"
