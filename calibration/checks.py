"""Input checks shared by the calibration package: one place that turns user input into
float64/long tensors of the right shape, or raises a ValueError that names the problem.

Everything downstream works in float64: confident classifiers put probabilities within
1e-9 of 1, where float32 rounds many different scores to the same value and creates ties
that conformal quantiles are sensitive to.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray

# Rows of a probability matrix may be off by float rounding after a softmax in float32.
PROBABILITY_SUM_TOLERANCE = 1e-4


ALPHA_MESSAGE = "alpha must be a number in the open interval (0, 1)"


def check_alpha(alpha: float) -> float:
    """A miscoverage level must lie strictly between 0 and 1: the one check of alpha, for the
    calibration package and the server alike (which answers its ValueError as a 4xx)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{ALPHA_MESSAGE}, got {alpha!r}")
    if not 0.0 < float(alpha) < 1.0:  # also rejects NaN and infinities
        raise ValueError(f"{ALPHA_MESSAGE}, got {alpha!r}")
    return float(alpha)


def _as_float64(values: ArrayLike, name: str) -> Tensor:
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(np.ascontiguousarray(values))
    if not isinstance(values, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(values)}")
    if not (values.is_floating_point() or values.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must hold real numbers, got dtype {values.dtype}")
    values = values.detach().to(torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return values


def as_logits(logits: ArrayLike) -> Tensor:
    """Logits as a float64 [N, C] tensor with C >= 1."""
    logits = _as_float64(logits, "logits")
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape [N, C] with C >= 1, got {tuple(logits.shape)}")
    return logits


def as_probs(probs: ArrayLike, name: str = "probs") -> Tensor:
    """Probabilities as a float64 [..., C] tensor whose rows are non-negative and sum to 1."""
    probs = _as_float64(probs, name)
    if probs.ndim < 2 or probs.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [N, C] with C >= 1, got {tuple(probs.shape)}")
    if (probs < 0).any():
        raise ValueError(f"{name} has negative entries; pass probabilities, not logits")
    row_sums = probs.sum(dim=-1)
    if ((row_sums - 1.0).abs() > PROBABILITY_SUM_TOLERANCE).any():
        worst = float((row_sums - 1.0).abs().max())
        raise ValueError(f"{name} rows must sum to 1 (largest deviation {worst:.3g})")
    return probs


def as_labels(labels: ArrayLike, n: int, num_classes: int) -> Tensor:
    """Labels as a long [n] tensor with values in 0..num_classes-1."""
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(np.ascontiguousarray(labels))
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor or numpy array, got {type(labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.detach().to(torch.long)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
    if n > 0 and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1}, got range "
            f"{int(labels.min())}..{int(labels.max())}"
        )
    return labels


def check_not_empty(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"{what} is empty; at least one labelled example is needed")


def check_generator(rng: torch.Generator | None, who: str) -> torch.Generator:
    """Randomised scores draw U ~ Uniform(0, 1); the caller owns the seed."""
    if rng is None:
        raise ValueError(
            f"{who} is randomised and needs rng: pass a seeded torch.Generator "
            "(e.g. torch.Generator().manual_seed(0))"
        )
    if not isinstance(rng, torch.Generator):
        raise ValueError(f"rng must be a torch.Generator, got {type(rng)}")
    return rng


def check_uniform(uniform: ArrayLike, shape: torch.Size) -> Tensor:
    """The caller's U draws of a randomised score: float64 of `shape`, each in [0, 1)."""
    uniform = _as_float64(uniform, "uniform")
    if uniform.shape != shape:
        raise ValueError(f"uniform must have shape {tuple(shape)}, got {tuple(uniform.shape)}")
    if ((uniform < 0) | (uniform >= 1)).any():
        raise ValueError("uniform draws must lie in [0, 1)")
    return uniform
