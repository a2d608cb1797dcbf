"""Top-K score: the rank of the true label (1 = most probable).

The prediction set is the qhat most probable labels for every example, i.e. a fixed-size
top-K set whose K is chosen by conformal calibration. Ranks are integers, so scores tie
heavily and coverage lands above 1 - alpha by up to the mass of the tied rank.
"""

from __future__ import annotations

from torch import Tensor

from calibration.scores.base import ConformityScore, rank_and_mass_above


class TopK(ConformityScore):
    name = "topk"

    def _label_scores(self, probs: Tensor, uniform: Tensor | None) -> Tensor:
        rank, _ = rank_and_mass_above(probs)  # [..., C]
        return rank.to(probs.dtype)
