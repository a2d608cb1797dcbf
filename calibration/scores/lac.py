"""LAC, the least-ambiguous set-valued classifier score (Sadinle, Lei & Wasserman 2019).

score(x, y) = 1 - p_y. Sets {y : p_y >= 1 - qhat} are the smallest on average among sets
with the same coverage, but they ignore how the rest of the mass is spread and can be empty
when no label is probable enough.
"""

from __future__ import annotations

from torch import Tensor

from calibration.scores.base import ConformityScore


class LAC(ConformityScore):
    name = "lac"

    def _label_scores(self, probs: Tensor, uniform: Tensor | None) -> Tensor:
        return 1.0 - probs  # [..., C]
