"""Vector scaling (Guo et al. 2017): a per-class scale and offset, z'_c = w_c * z_c + b_c.

Richer than temperature scaling (2C parameters instead of 1): it can correct classes that
are systematically over- or under-predicted. The NLL is convex in (w, b); a small L2 pull
towards the identity (w = 1, b = 0) makes the minimiser unique and finite even when the
calibration set is separable. `fit_vector_scaling_by_gradient_descent` is the slow
reference the LBFGS fit is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from calibration.checks import ArrayLike, as_labels, as_logits, check_not_empty

DEFAULT_WEIGHT_DECAY = 1e-3


def _fit_inputs(logits: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor]:
    logits = as_logits(logits)
    labels = as_labels(labels, logits.shape[0], logits.shape[1])
    check_not_empty(logits.shape[0], "the calibration set")
    return logits, labels


def vector_scaling_objective(
    logits: Tensor, labels: Tensor, scale: Tensor, bias: Tensor, weight_decay: float
) -> Tensor:
    """Mean NLL of softmax(scale * logits + bias) plus the L2 pull towards the identity."""
    nll = F.cross_entropy(logits * scale + bias, labels)  # logits [N, C], scale/bias [C]
    penalty = ((scale - 1.0) ** 2).sum() + (bias**2).sum()
    return nll + weight_decay * penalty


@dataclass(frozen=True)
class VectorScaling:
    scale: tuple[float, ...]
    bias: tuple[float, ...]
    kind: ClassVar[str] = "vector_scaling"

    def __post_init__(self) -> None:
        if len(self.scale) != len(self.bias) or len(self.scale) == 0:
            raise ValueError(
                f"scale and bias need the same non-zero length, got {len(self.scale)} "
                f"and {len(self.bias)}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.scale)

    @classmethod
    def fit(
        cls,
        logits: ArrayLike,
        labels: ArrayLike,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
        max_iter: int = 200,
    ) -> VectorScaling:
        logits, labels = _fit_inputs(logits, labels)
        num_classes = logits.shape[1]
        scale = torch.ones(num_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [scale, bias],
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=1e-8,
            tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = vector_scaling_objective(logits, labels, scale, bias, weight_decay)
            loss.backward()
            return loss

        optimizer.step(closure)
        return cls(tuple(scale.detach().tolist()), tuple(bias.detach().tolist()))

    def calibrated_logits(self, logits: ArrayLike) -> Tensor:
        logits = as_logits(logits)
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"vector scaling was fitted for {self.num_classes} classes, "
                f"got logits with {logits.shape[1]}"
            )
        scale = torch.tensor(self.scale, dtype=torch.float64)  # [C]
        bias = torch.tensor(self.bias, dtype=torch.float64)  # [C]
        return logits * scale + bias  # [N, C]

    def apply(self, logits: ArrayLike) -> Tensor:
        """Calibrated probabilities [N, C]."""
        return self.calibrated_logits(logits).softmax(dim=1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": list(self.scale), "bias": list(self.bias)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VectorScaling:
        if data.get("kind") != cls.kind:
            raise ValueError(f"not a vector-scaling map: kind={data.get('kind')!r}")
        return cls(tuple(float(v) for v in data["scale"]), tuple(float(v) for v in data["bias"]))


def fit_vector_scaling_by_gradient_descent(
    logits: ArrayLike,
    labels: ArrayLike,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    steps: int = 20_000,
    lr: float = 0.05,
) -> VectorScaling:
    """Reference fit: many plain gradient steps on the same convex objective."""
    logits, labels = _fit_inputs(logits, labels)
    num_classes = logits.shape[1]
    scale = torch.ones(num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([scale, bias], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        vector_scaling_objective(logits, labels, scale, bias, weight_decay).backward()
        optimizer.step()
    return VectorScaling(tuple(scale.detach().tolist()), tuple(bias.detach().tolist()))
