"""Calibration maps behind one protocol, their JSON round trip, and choosing one per model.

`fit_best_map` compares the identity (no change), temperature scaling and vector scaling by
K-fold cross-validated NLL and refits the chosen one on all the data. Cross-validation, not
the in-sample NLL, because the candidates are nested (identity is temperature at T = 1,
which is vector scaling with equal scales and zero offsets): in-sample the richest map
always wins, even when its extra 2C - 1 parameters only fit noise. Every candidate is scored
on points it was not fitted on, so the flexible map only wins when it predicts held-out
labels better.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from calibration.checks import ArrayLike, as_labels, as_logits
from calibration.temperature import TemperatureScaling
from calibration.vector_scaling import VectorScaling


@runtime_checkable
class CalibrationMap(Protocol):
    kind: ClassVar[str]

    def calibrated_logits(self, logits: ArrayLike) -> Tensor: ...

    def apply(self, logits: ArrayLike) -> Tensor: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class IdentityMap:
    """Leaves the model's softmax as it is (the choice when fitting does not help)."""

    kind: ClassVar[str] = "identity"

    @classmethod
    def fit(cls, logits: ArrayLike, labels: ArrayLike) -> IdentityMap:
        return cls()

    def calibrated_logits(self, logits: ArrayLike) -> Tensor:
        return as_logits(logits)

    def apply(self, logits: ArrayLike) -> Tensor:
        return self.calibrated_logits(logits).softmax(dim=1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IdentityMap:
        if data.get("kind") != cls.kind:
            raise ValueError(f"not an identity map: kind={data.get('kind')!r}")
        return cls()


MAP_TYPES: dict[str, Any] = {
    IdentityMap.kind: IdentityMap,
    TemperatureScaling.kind: TemperatureScaling,
    VectorScaling.kind: VectorScaling,
}


def map_from_dict(data: dict[str, Any]) -> CalibrationMap:
    """Rebuild a map from its `to_dict()` form."""
    if not isinstance(data, dict) or data.get("kind") not in MAP_TYPES:
        kind = data.get("kind") if isinstance(data, dict) else data
        raise ValueError(
            f"unknown calibration map kind {kind!r}; expected one of {list(MAP_TYPES)}"
        )
    return MAP_TYPES[data["kind"]].from_dict(data)


@dataclass(frozen=True)
class MapSelection:
    map: CalibrationMap
    cv_nll: dict[str, float]  # kind -> mean held-out NLL over the folds


def held_out_losses(
    kind: str, logits: Tensor, labels: Tensor, fold_of: Tensor, n_folds: int
) -> Tensor:
    """Per-example NLL [N] of map `kind`, each example scored by the fit without its fold."""
    losses = torch.empty(logits.shape[0], dtype=torch.float64)
    for fold in range(n_folds):
        held_out = fold_of == fold  # [N]
        fitted = MAP_TYPES[kind].fit(logits[~held_out], labels[~held_out])
        held_logits = fitted.calibrated_logits(logits[held_out])  # [n_fold, C]
        losses[held_out] = F.cross_entropy(held_logits, labels[held_out], reduction="none")
    return losses


# Simplest first. identity and temperature keep every argmax (the model's own decisions);
# vector scaling may change some of them.
MAP_CANDIDATES = ("identity", "temperature", "vector_scaling")


def fit_best_map(
    logits: ArrayLike,
    labels: ArrayLike,
    n_folds: int = 5,
    seed: int = 0,
    candidates: tuple[str, ...] = MAP_CANDIDATES,
) -> MapSelection:
    """Pick the candidate with the lowest cross-validated NLL and refit it on all the data.

    `candidates` go from simplest to richest; ties keep the simpler one. With fewer than
    `n_folds` examples the cross-validation becomes leave-one-out. (A one-standard-error
    rule in favour of simpler maps was tried on the built-in digits models and gave worse
    test NLL: a plain argmin of the held-out NLL is already unbiased.)
    """
    logits = as_logits(logits)
    labels = as_labels(labels, logits.shape[0], logits.shape[1])
    n = logits.shape[0]
    if n < 2:
        raise ValueError(f"fitting a calibration map needs at least 2 examples, got {n}")
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    unknown = [kind for kind in candidates if kind not in MAP_TYPES]
    if unknown or not candidates:
        raise ValueError(f"unknown map candidates {unknown}; expected some of {list(MAP_TYPES)}")
    n_folds = min(n_folds, n)
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(n, generator=generator)  # [N]
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[permutation] = torch.arange(n) % n_folds  # balanced folds in random order
    losses = {kind: held_out_losses(kind, logits, labels, fold_of, n_folds) for kind in candidates}
    cv_nll = {kind: float(loss.mean()) for kind, loss in losses.items()}
    chosen = min(candidates, key=lambda kind: cv_nll[kind])  # min keeps the first of equals
    return MapSelection(MAP_TYPES[chosen].fit(logits, labels), cv_nll)
