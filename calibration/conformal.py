"""Split conformal prediction: marginal and class-conditional (Mondrian) prediction sets.

Calibrate once (score the true labels of a held-out calibration set), then build a set for
any alpha at request time: the labels whose score is at most the finite-sample quantile of
the calibration scores (see `calibration.quantile`). Marginal sets cover the true label with
probability >= 1 - alpha over exchangeable draws; Mondrian sets use one quantile per class
from that class's scores, so the guarantee holds within every class (Vovk 2012).

`never_empty` adds the most probable label to any empty set. That only adds coverage, so
the lower guarantee still holds, but the sets over-cover: report both variants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from calibration.checks import ArrayLike, as_probs, check_alpha, check_not_empty
from calibration.quantile import class_conditional_quantiles, conformal_quantile
from calibration.scores.base import ConformityScore

_CACHED_LEVELS = 64


def include_top_label_if_empty(sets: Tensor, probs: Tensor) -> Tensor:
    """sets [..., C] bool; rows with no label get their argmax label (ties: lowest index)."""
    empty = ~sets.any(dim=-1, keepdim=True)  # [..., 1]
    top = torch.nn.functional.one_hot(probs.argmax(dim=-1), probs.shape[-1]).bool()  # [..., C]
    return sets | (empty & top)


@dataclass(frozen=True)
class SplitConformal:
    """Calibration scores of one conformity score, ready to produce sets at any alpha."""

    score: ConformityScore
    calibration_scores: Tensor  # [n] float64
    calibration_labels: Tensor  # [n] long
    num_classes: int

    def __post_init__(self) -> None:
        # qhat per (alpha, class_conditional): a server asks the same few levels of every
        # request, and each quantile is a sort of all n scores.
        object.__setattr__(self, "_quantiles", {})
        n = self.calibration_scores.shape[0]
        check_not_empty(n, "the calibration set")
        if self.calibration_scores.shape != (n,) or self.calibration_labels.shape != (n,):
            raise ValueError(
                "calibration scores and labels must both have shape [n], got "
                f"{tuple(self.calibration_scores.shape)} and {tuple(self.calibration_labels.shape)}"
            )

    @classmethod
    def calibrate(
        cls,
        score: ConformityScore,
        probs: ArrayLike,
        labels: ArrayLike,
        rng: torch.Generator | None = None,
    ) -> SplitConformal:
        """Score the true labels of the calibration examples probs [n, C], labels [n]."""
        probs = as_probs(probs)
        check_not_empty(probs.shape[0], "the calibration set")
        scores = score.score(probs, labels, rng)  # [n]
        labels = torch.as_tensor(labels, dtype=torch.long)
        return cls(score, scores, labels, probs.shape[1])

    @property
    def n(self) -> int:
        return self.calibration_scores.shape[0]

    def quantile(self, alpha: float, class_conditional: bool = False) -> Tensor:
        """qhat: a scalar tensor, or [C] per-class quantiles when class_conditional."""
        alpha = check_alpha(alpha)
        key = (alpha, class_conditional)
        qhat = self._quantiles.get(key)
        if qhat is not None:
            return qhat
        if class_conditional:
            qhat = class_conditional_quantiles(
                self.calibration_scores, self.calibration_labels, self.num_classes, alpha
            )
        else:
            qhat = conformal_quantile(self.calibration_scores, alpha)
        if len(self._quantiles) >= _CACHED_LEVELS:
            self._quantiles.clear()  # online levels move: keep the cache bounded
        self._quantiles[key] = qhat
        return qhat

    def predict(
        self,
        probs: ArrayLike,
        alpha: float,
        class_conditional: bool = False,
        never_empty: bool = False,
        rng: torch.Generator | None = None,
        uniform: Tensor | None = None,
    ) -> Tensor:
        """Prediction sets as a bool mask [N, C] for test probabilities [N, C].

        Randomised scores take their U from `uniform` [N] when given, else from `rng`."""
        probs = as_probs(probs)
        if probs.shape[-1] != self.num_classes:
            raise ValueError(
                f"calibrated for {self.num_classes} classes, got probs with {probs.shape[-1]}"
            )
        qhat = self.quantile(alpha, class_conditional)
        sets = self.score.prediction_sets(probs, qhat, rng, uniform)  # [N, C]
        return include_top_label_if_empty(sets, probs) if never_empty else sets
