"""Adaptive Conformal Inference (Gibbs & Candès 2021, "Adaptive Conformal Inference Under
Distribution Shift"): an online level that reacts to label feedback.

After each labelled prediction the working level moves against the observed error:

    alpha_{t+1} = alpha_t + gamma * (alpha - err_t),    err_t = 1 if y_t not in the set

Sets are built from the fixed calibration scores at level alpha_t. alpha_t may leave (0, 1):
at alpha_t <= 0 the set is every label (err_t = 0), at alpha_t >= 1 it is empty (err_t = 1),
which is what keeps alpha_t within [-gamma, 1 + gamma]. Telescoping the update then bounds
the long-run miscoverage for ANY sequence, shifted or adversarial (their Proposition 4.1):

    | (1/T) sum_t err_t - alpha | <= (max(alpha_1, 1 - alpha_1) + gamma) / (T * gamma)

The bound needs the raw sets: forcing a label into an empty set (never_empty) breaks it.

A server learns labels late: a set is served at the level of its time, and its error arrives
after up to D other updates. err_t must then be the error of the set actually served, and
alpha_t stays within [-(D + 1) gamma, 1 + (D + 1) gamma] (a set served while the level was
past 1 or below 0 is empty or full), so the bound becomes

    | (1/T) sum_t err_t - alpha | <= (max(alpha_1, 1 - alpha_1) + (D + 1) gamma) / (T * gamma)

The state is two counters (labels seen, labels missed): alpha_t is a function of them, so a
store can keep one level per key and update it with two atomic increments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from calibration.checks import check_alpha
from calibration.quantile import quantile_at_level

DEFAULT_GAMMA = 0.005  # the step size Gibbs & Candès use in their experiments


@dataclass
class AdaptiveConformal:
    target_alpha: float
    gamma: float = DEFAULT_GAMMA
    alpha_t: float | None = None  # the working level; starts at target_alpha
    initial_alpha: float | None = None  # alpha_1, for the bound
    steps: int = 0  # labelled predictions seen
    miscovered: int = 0  # of which the label was outside the set

    def __post_init__(self) -> None:
        self.target_alpha = check_alpha(self.target_alpha)
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be a positive finite step size, got {self.gamma!r}")
        if self.alpha_t is None:
            self.alpha_t = self.target_alpha
        if self.initial_alpha is None:
            self.initial_alpha = self.alpha_t
        if not (math.isfinite(self.alpha_t) and math.isfinite(self.initial_alpha)):
            raise ValueError("alpha_t and initial_alpha must be finite")
        if self.steps < 0 or not 0 <= self.miscovered <= self.steps:
            raise ValueError(
                f"counters must satisfy 0 <= miscovered <= steps, got {self.miscovered} "
                f"and {self.steps}"
            )

    def quantile(self, calibration_scores: Tensor) -> Tensor:
        """qhat at the working level: +inf (every label) when alpha_t <= 0, -inf (empty)
        when alpha_t >= 1."""
        return quantile_at_level(calibration_scores, self.alpha_t)

    def update(self, covered: bool) -> float:
        """Record whether the label was in the set; returns the new alpha_t."""
        error = 0.0 if covered else 1.0
        self.alpha_t = self.alpha_t + self.gamma * (self.target_alpha - error)
        self.steps += 1
        self.miscovered += int(not covered)
        return self.alpha_t

    @property
    def miscoverage_rate(self) -> float:
        """Fraction of labelled predictions whose label was outside the set (NaN before any)."""
        return self.miscovered / self.steps if self.steps else math.nan

    def miscoverage_bound(self, max_delay: int = 0) -> float:
        """Gibbs & Candès' deterministic bound on |miscoverage_rate - target_alpha|, when each
        label arrived after at most `max_delay` other labels' updates (0: in order)."""
        if self.steps == 0:
            return math.inf
        if isinstance(max_delay, bool) or not isinstance(max_delay, int) or max_delay < 0:
            raise ValueError(f"max_delay must be an integer >= 0, got {max_delay!r}")
        worst_start = max(self.initial_alpha, 1.0 - self.initial_alpha)
        return (worst_start + (max_delay + 1) * self.gamma) / (self.steps * self.gamma)

    @classmethod
    def from_counts(
        cls, target_alpha: float, gamma: float, steps: int, missed: int
    ) -> AdaptiveConformal:
        """The level after `steps` labels of which `missed` fell outside their sets, started
        at `target_alpha`: the updates telescope to alpha + gamma * (steps * alpha - missed)."""
        return cls(
            target_alpha=target_alpha,
            gamma=gamma,
            alpha_t=target_alpha + gamma * (steps * target_alpha - missed),
            initial_alpha=target_alpha,
            steps=steps,
            miscovered=missed,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_alpha": self.target_alpha,
            "gamma": self.gamma,
            "alpha_t": self.alpha_t,
            "initial_alpha": self.initial_alpha,
            "steps": self.steps,
            "miscovered": self.miscovered,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaptiveConformal:
        expected = {"target_alpha", "gamma", "alpha_t", "initial_alpha", "steps", "miscovered"}
        if not isinstance(data, dict) or set(data) != expected:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"ACI state needs exactly the keys {sorted(expected)}, got {got}")
        return cls(
            target_alpha=float(data["target_alpha"]),
            gamma=float(data["gamma"]),
            alpha_t=float(data["alpha_t"]),
            initial_alpha=float(data["initial_alpha"]),
            steps=int(data["steps"]),
            miscovered=int(data["miscovered"]),
        )
