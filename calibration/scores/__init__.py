"""Conformity scores for split conformal prediction, one module each, and a registry by name.

Names: "lac", "aps", "aps_randomized", "raps", "raps_randomized", "topk".
"""

from __future__ import annotations

from typing import Any

from calibration.scores.aps import APS
from calibration.scores.base import ConformityScore, rank_and_mass_above
from calibration.scores.lac import LAC
from calibration.scores.raps import RAPS, pick_k_reg, tune_raps
from calibration.scores.topk import TopK

SCORE_NAMES = ("lac", "aps", "aps_randomized", "raps", "raps_randomized", "topk")


def make_score(name: str, **params: Any) -> ConformityScore:
    """Build a score by name; RAPS needs `lam` and `k_reg`."""
    if name == "lac":
        return LAC()
    if name in ("aps", "aps_randomized"):
        return APS(randomized=name == "aps_randomized")
    if name in ("raps", "raps_randomized"):
        missing = {"lam", "k_reg"} - params.keys()
        if missing:
            raise ValueError(f"score {name!r} needs parameters {sorted(missing)}")
        return RAPS(params["lam"], params["k_reg"], randomized=name == "raps_randomized")
    if name == "topk":
        return TopK()
    raise ValueError(f"unknown conformity score {name!r}; expected one of {SCORE_NAMES}")


__all__ = [
    "APS",
    "LAC",
    "RAPS",
    "SCORE_NAMES",
    "ConformityScore",
    "TopK",
    "make_score",
    "pick_k_reg",
    "rank_and_mass_above",
    "tune_raps",
]
