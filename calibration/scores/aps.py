"""APS, adaptive prediction sets (Romano, Sesia & Candès 2020).

Labels are sorted by decreasing probability; a label's score is the mass of the labels
ranked above it plus its own mass:

    deterministic:  score(x, y) = mass_above(y) + p_y
    randomised:     score(x, y) = mass_above(y) + U * p_y,   U ~ Uniform[0, 1) per example

A label is in the set iff its score is at most qhat. The deterministic score counts the
whole mass of the label that crosses qhat, so for the same coverage its sets are larger, and
a set is empty when the top label's probability alone exceeds qhat. Randomising how much of
that last label counts gives smaller sets with coverage still on 1 - alpha (Romano et al.,
Theorem 2), also with occasionally empty sets. (Libraries that always keep the crossing
label never return an empty set but over-cover; here that is the `never_empty` option.)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from calibration.scores.base import ConformityScore, rank_and_mass_above


class APS(ConformityScore):
    def __init__(self, randomized: bool = False) -> None:
        self.randomized = bool(randomized)
        self.name = "aps_randomized" if self.randomized else "aps"

    def _label_scores(self, probs: Tensor, uniform: Tensor | None) -> Tensor:
        _, mass_above = rank_and_mass_above(probs)  # [..., C]
        own = probs if uniform is None else uniform[..., None] * probs  # [..., C]
        return mass_above + own

    def params(self) -> dict[str, Any]:
        return {"randomized": self.randomized}
