"""Temperature scaling (Guo et al. 2017): divide all logits by one learned T > 0.

T is fitted by minimising the negative log-likelihood of the calibration labels with torch's
LBFGS over log T (so T stays positive without constraints). The NLL is convex in 1/T, hence
unimodal in log T, which lets `fit_temperature_by_search` (golden-section search, slow and
obvious) serve as the reference the LBFGS fit is tested against.

T is kept within [1e-2, 1e2]: on a calibration set the model classifies perfectly, the NLL
keeps falling as T -> 0 and has no finite minimiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from calibration.checks import ArrayLike, as_labels, as_logits, check_not_empty

MIN_LOG_TEMPERATURE = math.log(1e-2)
MAX_LOG_TEMPERATURE = math.log(1e2)


def _fit_inputs(logits: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor]:
    logits = as_logits(logits)
    labels = as_labels(labels, logits.shape[0], logits.shape[1])
    check_not_empty(logits.shape[0], "the calibration set")
    return logits, labels


def temperature_nll(logits: Tensor, labels: Tensor, log_temperature: Tensor) -> Tensor:
    """Mean NLL of softmax(logits / T) at T = exp(log_temperature)."""
    return F.cross_entropy(logits / log_temperature.exp(), labels)


@dataclass(frozen=True)
class TemperatureScaling:
    temperature: float
    kind: ClassVar[str] = "temperature"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature must be a positive finite number, got {self.temperature}"
            )

    @classmethod
    def fit(cls, logits: ArrayLike, labels: ArrayLike, max_iter: int = 100) -> TemperatureScaling:
        logits, labels = _fit_inputs(logits, labels)
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_t],
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=1e-12,
            tolerance_change=1e-14,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = temperature_nll(logits, labels, log_t)
            loss.backward()
            return loss

        optimizer.step(closure)
        log_t_value = float(log_t.detach().clamp(MIN_LOG_TEMPERATURE, MAX_LOG_TEMPERATURE))
        return cls(math.exp(log_t_value))

    def calibrated_logits(self, logits: ArrayLike) -> Tensor:
        return as_logits(logits) / self.temperature  # [N, C]

    def apply(self, logits: ArrayLike) -> Tensor:
        """Calibrated probabilities [N, C]."""
        return self.calibrated_logits(logits).softmax(dim=1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "temperature": self.temperature}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TemperatureScaling:
        if data.get("kind") != cls.kind:
            raise ValueError(f"not a temperature map: kind={data.get('kind')!r}")
        return cls(float(data["temperature"]))


def fit_temperature_by_search(logits: ArrayLike, labels: ArrayLike, tol: float = 1e-9) -> float:
    """Reference fit: golden-section search for the NLL-minimising log T in the allowed range."""
    logits, labels = _fit_inputs(logits, labels)

    def nll(log_t: float) -> float:
        return float(temperature_nll(logits, labels, torch.tensor(log_t, dtype=torch.float64)))

    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    low, high = MIN_LOG_TEMPERATURE, MAX_LOG_TEMPERATURE
    left, right = high - inv_phi * (high - low), low + inv_phi * (high - low)
    f_left, f_right = nll(left), nll(right)
    while high - low > tol:
        if f_left <= f_right:
            high, right, f_right = right, left, f_left
            left = high - inv_phi * (high - low)
            f_left = nll(left)
        else:
            low, left, f_left = left, right, f_right
            right = low + inv_phi * (high - low)
            f_right = nll(right)
    return math.exp((low + high) / 2.0)
