"""Coverage and set size of split conformal over many random calibration/test re-splits.

All re-splits are evaluated at once as batched tensors ([S, n] scores, [S, m, C] sets), so
hundreds of splits take well under a second. `resplit_reference` does the same with a plain
loop over `SplitConformal` and is the slow path the fast one is tested against.

Per split the marginal coverage of exchangeable data has expectation in
[1 - alpha, 1 - alpha + 1 / (n + 1)] (the upper end needs untied scores). This holds even
conditionally on the pool: for a fixed pool and a uniformly random split, each test point
and the calibration points are a uniformly random ordering of n + 1 pool points. So the
mean over re-splits of one pool estimates a quantity inside that interval, with a standard
error estimated from the spread over splits. For the Mondrian
variant the same holds per class with n_c, the class's calibration count in that split;
`class_upper` holds that per-split bound (1 where the class quantile is infinite).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from calibration.checks import ArrayLike, as_labels, as_probs, check_alpha
from calibration.conformal import SplitConformal, include_top_label_if_empty
from calibration.quantile import class_conditional_quantiles, conformal_quantile
from calibration.scores.base import ConformityScore


@dataclass(frozen=True)
class ResplitResult:
    alpha: float
    n_calibration: int
    coverage: Tensor  # [S] fraction of test labels in their set, per split
    set_size: Tensor  # [S] mean set size per split
    empty_fraction: Tensor  # [S] fraction of empty sets per split
    class_coverage: Tensor  # [S, C] per-class coverage (NaN where a class has no test point)
    class_upper: Tensor  # [S, C] per-class upper bound 1 - alpha + 1/(n_c + 1), or 1
    untied: bool  # no two pool points share a true-label score in any split

    @property
    def n_splits(self) -> int:
        return self.coverage.shape[0]


def random_splits(
    n_total: int, n_calibration: int, n_splits: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Index tensors [S, n] (calibration) and [S, n_total - n] (test) of random permutations."""
    if not 0 < n_calibration < n_total:
        raise ValueError(
            f"n_calibration must be between 1 and {n_total - 1} (pool size - 1), "
            f"got {n_calibration}"
        )
    if n_splits < 1:
        raise ValueError(f"n_splits must be at least 1, got {n_splits}")
    permutations = torch.rand(n_splits, n_total, generator=generator).argsort(dim=1)  # [S, M]
    return permutations[:, :n_calibration], permutations[:, n_calibration:]


def _class_statistics(
    covered: Tensor, test_labels: Tensor, cal_labels: Tensor, qhat_class: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    num_classes = qhat_class.shape[-1]
    one_hot = torch.nn.functional.one_hot(test_labels, num_classes).to(torch.float64)  # [S, m, C]
    hits = (one_hot * covered[..., None]).sum(dim=1)  # [S, C]
    counts = one_hot.sum(dim=1)  # [S, C]
    class_coverage = hits / counts  # NaN where counts == 0
    n_class = torch.nn.functional.one_hot(cal_labels, num_classes).sum(dim=1)  # [S, C]
    upper = 1.0 - alpha + 1.0 / (n_class.to(torch.float64) + 1.0)
    class_upper = torch.where(torch.isinf(qhat_class), torch.ones_like(upper), upper)
    return class_coverage, class_upper


def resplit_evaluate(
    probs: ArrayLike,
    labels: ArrayLike,
    score: ConformityScore,
    n_calibration: int,
    alpha: float,
    n_splits: int,
    generator: torch.Generator,
    class_conditional: bool = False,
    never_empty: bool = False,
) -> ResplitResult:
    """Split a pool probs [M, C], labels [M] at random S times into n calibration points and
    M - n test points, calibrate on each and measure the test sets."""
    alpha = check_alpha(alpha)
    probs = as_probs(probs)
    labels = as_labels(labels, probs.shape[0], probs.shape[1])
    num_pool, num_classes = probs.shape
    cal_idx, test_idx = random_splits(num_pool, n_calibration, n_splits, generator)
    if score.randomized:  # fresh U for every split and point
        table = score.label_scores(probs.expand(n_splits, -1, -1), generator)  # [S, M, C]
    else:
        table = score.label_scores(probs).expand(n_splits, -1, -1)  # [S, M, C]
    true_scores = table.gather(2, labels.expand(n_splits, -1)[..., None]).squeeze(2)  # [S, M]
    sorted_scores = true_scores.sort(dim=1).values  # [S, M]
    untied = bool((sorted_scores[:, 1:] > sorted_scores[:, :-1]).all())
    cal_scores = true_scores.gather(1, cal_idx)  # [S, n]
    cal_labels, test_labels = labels[cal_idx], labels[test_idx]  # [S, n], [S, m]
    qhat_class = class_conditional_quantiles(cal_scores, cal_labels, num_classes, alpha)  # [S, C]
    if class_conditional:
        qhat = qhat_class[:, None, :]  # [S, 1, C]
    else:
        qhat = conformal_quantile(cal_scores, alpha)[:, None, None]  # [S, 1, 1]
    test_table = table.gather(1, test_idx[..., None].expand(-1, -1, num_classes))  # [S, m, C]
    sets = test_table <= qhat  # [S, m, C]
    if never_empty:
        sets = include_top_label_if_empty(sets, probs[test_idx])
    covered = sets.gather(2, test_labels[..., None]).squeeze(2).to(torch.float64)  # [S, m]
    sizes = sets.sum(dim=2).to(torch.float64)  # [S, m]
    class_coverage, class_upper = _class_statistics(
        covered, test_labels, cal_labels, qhat_class, alpha
    )
    return ResplitResult(
        alpha=alpha,
        n_calibration=n_calibration,
        coverage=covered.mean(dim=1),
        set_size=sizes.mean(dim=1),
        empty_fraction=(sizes == 0).to(torch.float64).mean(dim=1),
        class_coverage=class_coverage,
        class_upper=class_upper,
        untied=untied,
    )


def resplit_reference(
    probs: ArrayLike,
    labels: ArrayLike,
    score: ConformityScore,
    cal_idx: Tensor,
    test_idx: Tensor,
    alpha: float,
    class_conditional: bool = False,
    never_empty: bool = False,
) -> tuple[Tensor, Tensor]:
    """Slow path for deterministic scores: coverage [S] and mean set size [S], split by split."""
    probs = as_probs(probs)
    labels = as_labels(labels, probs.shape[0], probs.shape[1])
    coverage, set_size = [], []
    for cal, test in zip(cal_idx, test_idx, strict=True):
        predictor = SplitConformal.calibrate(score, probs[cal], labels[cal])
        sets = predictor.predict(probs[test], alpha, class_conditional, never_empty)
        coverage.append(sets[torch.arange(len(test)), labels[test]].to(torch.float64).mean())
        set_size.append(sets.sum(dim=1).to(torch.float64).mean())
    return torch.stack(coverage), torch.stack(set_size)
