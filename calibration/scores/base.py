"""The protocol every conformity score follows, and the ranking helper the sorted scores share.

A score assigns every candidate label of an example a number: larger means the label fits
the model's probabilities worse. Calibration uses the true label's score; a prediction set
holds every label whose score is at most the conformal quantile qhat. Deriving both from one
`label_scores` table makes them consistent by construction: label y is in the set iff
`score(probs, y) <= qhat`. Randomised scores draw one U ~ Uniform[0, 1) per example from the
caller's generator, first thing, so the same seed gives the same U in both calls, or take
the caller's own draws (`uniform`): a server that must be able to recompute a served set
later keeps the U it used.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from calibration.checks import ArrayLike, as_labels, as_probs, check_generator, check_uniform


def rank_and_mass_above(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Per label: its 1-based rank by probability [..., C] and the mass ranked above it [..., C].

    Labels are sorted by decreasing probability; equal probabilities keep label order (stable
    sort), so ranks are a permutation of 1..C in every row.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # [..., C]
    mass_above_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs  # [..., C] exclusive cumsum
    positions = torch.arange(1, probs.shape[-1] + 1).expand_as(order)  # [..., C]
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # [..., C]
    mass_above = torch.empty_like(probs).scatter_(-1, order, mass_above_sorted)  # [..., C]
    return rank, mass_above


class ConformityScore(ABC):
    """Subclasses define `label_scores`; scoring and set building follow from it."""

    name: str
    randomized: bool = False

    @abstractmethod
    def _label_scores(self, probs: Tensor, uniform: Tensor | None) -> Tensor:
        """probs [..., C] (validated float64), uniform [...] or None -> scores [..., C]."""

    def label_scores(
        self,
        probs: ArrayLike,
        rng: torch.Generator | None = None,
        uniform: Tensor | None = None,
    ) -> Tensor:
        """The score every label would get [..., C].

        A randomised score uses `uniform` [...] (one U in [0, 1) per example) when given,
        else draws it from `rng`; deterministic scores ignore both.
        """
        probs = as_probs(probs)
        if not self.randomized:
            return self._label_scores(probs, None)
        if uniform is not None:
            uniform = check_uniform(uniform, probs.shape[:-1])
        else:
            generator = check_generator(rng, f"score {self.name!r}")
            uniform = torch.rand(probs.shape[:-1], generator=generator, dtype=torch.float64)
        return self._label_scores(probs, uniform)

    def score(
        self,
        probs: ArrayLike,
        labels: ArrayLike,
        rng: torch.Generator | None = None,
        uniform: Tensor | None = None,
    ) -> Tensor:
        """Calibration scores [N] of the true labels."""
        table = self.label_scores(probs, rng, uniform)  # [N, C]
        if table.ndim != 2:
            raise ValueError(f"probs must have shape [N, C], got {tuple(table.shape)}")
        labels = as_labels(labels, table.shape[0], table.shape[1])
        return table.gather(1, labels[:, None]).squeeze(1)  # [N]

    def prediction_sets(
        self,
        probs: ArrayLike,
        qhat: float | Tensor,
        rng: torch.Generator | None = None,
        uniform: Tensor | None = None,
    ) -> Tensor:
        """Boolean mask [..., C]: label in set iff its score <= qhat.

        `qhat` is a scalar, or a tensor that broadcasts against [..., C]: shape [C] for
        class-conditional quantiles, [..., 1] for one quantile per row.
        """
        qhat = torch.as_tensor(qhat, dtype=torch.float64)
        if torch.isnan(qhat).any():
            raise ValueError("qhat is NaN")
        return self.label_scores(probs, rng, uniform) <= qhat

    def params(self) -> dict[str, Any]:
        """JSON-safe parameters that rebuild this score with `make_score`."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.params().items())
        return f"{type(self).__name__}({args})"
