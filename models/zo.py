"""Zeroth-order optimisers: fine-tuning from forward passes only.

MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes") is SPSA
with an in-place perturbation regenerated from a per-step seed:

    θ += εz;  L+ = L(θ);  θ -= 2εz;  L- = L(θ);  θ += εz       (z ~ N(0, I) from the seed)
    g = (L+ - L-) / (2ε)                                          the projected gradient
    θ -= lr · g · z                                               z regenerated from the seed

No copy of the parameters and no z is ever stored: each parameter's slice of z is drawn
afresh from a `torch.Generator` seeded with the step's seed, in a fixed parameter order.
`n_perturbations` > 1 averages n such estimates per step (n-SPSA). Two variants from ZO-Bench
(Zhang et al. 2024, "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM
Fine-Tuning: A Benchmark") use the same estimate ĝ = mean_i g_i z_i differently:
ZO-SGD-Sign steps by -lr · sign(ĝ), ZO-Adam feeds ĝ to Adam's moment estimates (it keeps
two buffers the size of the tuned parameters, the price ZO-Bench reports for it).

Exactness. In floating point, θ + εz - 2εz + εz is not θ: about half of the float32 entries
move by an ulp or more after one perturbation pair. Every tuned tensor is therefore kept on a
fixed-point grid (block floating point: one power-of-two step q per tensor, every value an
integer multiple of q, and q chosen so that every value a step can reach stays within 2^24·q
for float32). Sums of grid values are exact, so a perturbation pair restores the weights bit
for bit, and the weights after any number of steps depend only on the base weights and the
updates, never on the perturbations. That makes a trajectory (seeds, projected gradients,
learning rates) replayable bit for bit without running a single forward pass
(`models.trajectory`). The price: snapping the base weights to the grid moves each by at most
q/2, i.e. 2^-25 of the tensor's largest magnitude plus headroom, and perturbations and
updates are rounded to q (float32 rounds to a value's ulp, which is at most q anyway).

Everything runs under `torch.no_grad()`. The loss is whatever callable the caller passes;
the fine-tuning job (`service.finetuning`) runs each batch through a backend runner from a
fresh `init_state` (`service.finetuning.forward`), so a perturbed pass never reads or writes
a session's state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

OPTIMIZERS = ("mezo", "zo_sign", "zo_adam")
DIRECTIONS = ("gaussian", "rademacher")
SCHEDULES = ("constant", "linear", "cosine")
GAUSSIAN_CLIP = 6.0  # |z| is clipped here so the grid can reserve headroom for εz
MAX_SEED = 2**53 - 1  # seeds stay exact in every JSON parser (JavaScript numbers included)
MAX_UPDATE = 1e30  # |lr · g · z| beyond this is divergence (float32 overflows at 3.4e38)

Loss = Callable[[int], float]  # loss of the current weights; gets the perturbation's seed


@dataclass(frozen=True)
class ZOConfig:
    """How directions are drawn and how an estimate becomes an update (not the schedule)."""

    optimizer: str = "mezo"
    eps: float = 1e-3  # perturbation scale ε
    n_perturbations: int = 1  # estimates averaged per step (n-SPSA)
    direction: str = "gaussian"  # z ~ N(0, I) clipped to ±6, or uniform ±1 (Rademacher)
    beta1: float = 0.9  # zo_adam moment decays
    beta2: float = 0.999
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if not (math.isfinite(self.eps) and 1e-7 <= self.eps <= 1.0):
            raise ValueError(f"eps must lie in [1e-7, 1], got {self.eps}")
        if isinstance(self.n_perturbations, bool) or not 1 <= self.n_perturbations <= 1024:
            raise ValueError(f"n_perturbations must lie in [1, 1024], got {self.n_perturbations}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.adam_eps) and self.adam_eps > 0):
            raise ValueError(f"adam_eps must be positive, got {self.adam_eps}")

    @property
    def z_max(self) -> float:
        return GAUSSIAN_CLIP if self.direction == "gaussian" else 1.0

    def to_dict(self) -> dict:
        return asdict(self)


# ---- learning-rate schedules ---------------------------------------------------------------


def learning_rate(
    step: int, total_steps: int, lr: float, schedule: str, min_lr_fraction: float = 0.0
) -> float:
    """The rate for `step` (0-based) of `total_steps`: constant, or a linear or cosine decay
    from lr to lr·min_lr_fraction over the run (constant-rate MeZO drifts away from its best
    point late in a run, see FIELD_NOTES)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return lr
    progress = min(step / max(total_steps - 1, 1), 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    decay = 1.0 - progress if schedule == "linear" else cosine
    return lr * (min_lr_fraction + (1.0 - min_lr_fraction) * decay)


# ---- the fixed-point grid ------------------------------------------------------------------


def grid_step(bound: float, dtype: torch.dtype) -> float:
    """The power of two q with bound < 2^p·q ≤ 2·bound, p = the dtype's significand bits:
    every multiple of q up to `bound` in magnitude is exactly representable."""
    if not (math.isfinite(bound) and bound > 0):
        raise FloatingPointError(f"cannot place values of magnitude {bound} on a grid")
    _, exponent = math.frexp(bound)  # bound = m·2^exponent with 0.5 <= m < 1
    significand_bits = 1 - round(math.log2(torch.finfo(dtype).eps))  # 24 for float32
    return math.ldexp(1.0, exponent - significand_bits)


def as_float32(value: float) -> float:
    """`value` rounded to the nearest float32 (as a Python float)."""
    return float(np.float32(value))


def on_grid(values: Tensor, step: float) -> Tensor:
    """`values` rounded to the nearest multiple of `step` (a power of two: exact scaling)."""
    return values.div(step).round_().mul_(step)


# ---- the optimiser -------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    projected_grads: list[float]  # one per perturbation
    losses: list[tuple[float, float]]  # (L+, L-) per perturbation


class ZOOptimizer:
    """Zeroth-order updates of `parameters` in place (see the module docstring).

    Construction snaps the parameters to their grids. `step` estimates and applies one
    update; `update_` applies an update from recorded (seeds, projected gradients, lr) and
    is all a replay needs.
    """

    def __init__(self, parameters: Sequence[tuple[str, nn.Parameter]], config: ZOConfig) -> None:
        if not parameters:
            raise ValueError("no parameters to tune")
        for name, parameter in parameters:
            if not parameter.dtype.is_floating_point:
                raise ValueError(f"parameter {name!r} is {parameter.dtype}, not floating point")
        self.names = [name for name, _ in parameters]
        self.parameters = [parameter for _, parameter in parameters]
        self.config = config
        self.steps_done = 0
        self._headroom = 2.0 * config.eps * config.z_max
        self._moments: list[tuple[Tensor, Tensor]] | None = None  # zo_adam's m and v
        self._beta_powers = (1.0, 1.0)  # β1^t, β2^t by repeated multiplication (no libm pow)
        self.grid_steps: list[float] = []
        with torch.no_grad():
            for parameter in self.parameters:
                bound = float(parameter.abs().max()) + self._headroom
                step = grid_step(bound, parameter.dtype)
                parameter.copy_(on_grid(parameter, step))
                self.grid_steps.append(step)

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters)

    def directions(self, seed: int) -> Iterator[tuple[int, Tensor]]:
        """(index, z) for each tuned parameter, z drawn on the CPU from a generator seeded
        with `seed`; the same seed always yields the same z, parameter by parameter."""
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2^53), got {seed!r}")
        generator = torch.Generator().manual_seed(seed)
        for index, parameter in enumerate(self.parameters):
            if self.config.direction == "gaussian":
                z = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                z.clamp_(-GAUSSIAN_CLIP, GAUSSIAN_CLIP)
            else:
                bits = torch.randint(0, 2, parameter.shape, generator=generator)
                z = bits.to(parameter.dtype).mul_(2.0).sub_(1.0)
            yield index, z.to(parameter.device)

    @torch.no_grad()
    def perturb_(self, seed: int, multiple: int) -> None:
        """θ += multiple · ε · z(seed), exactly (ε·z is rounded to each tensor's grid)."""
        for index, z in self.directions(seed):
            delta = on_grid(z.mul_(self.config.eps), self.grid_steps[index])  # [*shape]
            self.parameters[index].add_(delta.mul_(float(multiple)))

    @torch.no_grad()
    def estimate(self, seed: int, loss: Loss) -> tuple[float, float, float]:
        """(projected gradient, L+, L-) along z(seed); the weights end exactly as they began."""
        self.perturb_(seed, +1)
        loss_plus = float(loss(seed))
        self.perturb_(seed, -2)
        loss_minus = float(loss(seed))
        self.perturb_(seed, +1)
        if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
            raise FloatingPointError(
                f"the loss is not finite at a perturbed point (L+={loss_plus}, L-={loss_minus})"
            )
        return (loss_plus - loss_minus) / (2.0 * self.config.eps), loss_plus, loss_minus

    @torch.no_grad()
    def step(self, seeds: Sequence[int], loss: Loss, lr: float) -> StepResult:
        """One update from len(seeds) == n_perturbations estimates."""
        if len(seeds) != self.config.n_perturbations:
            raise ValueError(f"expected {self.config.n_perturbations} seeds, got {len(seeds)}")
        grads, losses = [], []
        for seed in seeds:
            grad, loss_plus, loss_minus = self.estimate(seed, loss)
            grads.append(grad)
            losses.append((loss_plus, loss_minus))
        self.update_(seeds, grads, lr)
        return StepResult(grads, losses)

    @torch.no_grad()
    def update_(self, seeds: Sequence[int], grads: Sequence[float], lr: float) -> None:
        """Apply the update of recorded estimates: the only thing a replay runs per step."""
        if len(seeds) != len(grads) or not seeds:
            raise ValueError(f"need one gradient per seed, got {len(seeds)} and {len(grads)}")
        if not all(math.isfinite(g) for g in grads) or not (math.isfinite(lr) and lr >= 0):
            raise FloatingPointError(f"non-finite update: grads {list(grads)}, lr {lr}")
        # Applied as float32 values: what a trajectory stores, so a replay applies the same.
        grads, lr = [as_float32(g) for g in grads], as_float32(lr)
        # Refuse an update that could overflow before touching any weight, so a diverging
        # run stops with weights that still match its trajectory.
        if lr * max(abs(g) for g in grads) * self.config.z_max > MAX_UPDATE:
            raise FloatingPointError(f"update too large: lr {lr} x projected gradients {grads}")
        name = self.config.optimizer
        if name == "zo_adam":
            self._start_moments()
            b1, b2 = self.config.beta1, self.config.beta2
            self._beta_powers = (self._beta_powers[0] * b1, self._beta_powers[1] * b2)
        streams = [self.directions(seed) for seed in seeds]
        for index in range(len(self.parameters)):
            estimate = self._gradient_estimate(streams, grads)  # ĝ, [*shape]
            if name == "mezo":
                delta = estimate.mul_(-lr)
            elif name == "zo_sign":
                delta = estimate.sign_().mul_(-lr)
            else:
                delta = self._adam_direction(index, estimate).mul_(-lr)
            self._add_exact_(index, delta)
        self.steps_done += 1

    def _gradient_estimate(self, streams: list[Iterator], grads: Sequence[float]) -> Tensor:
        """ĝ = mean_i g_i z_i for the next parameter of every stream. Separate multiplies and
        adds (no fused multiply-add), so every machine rounds the same way."""
        n = len(grads)
        total = None
        for stream, grad in zip(streams, grads, strict=True):
            _, z = next(stream)
            term = z.mul_(grad / n)
            total = term if total is None else total.add_(term)
        return total

    def _start_moments(self) -> None:
        if self._moments is None:
            self._moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.parameters]

    def _adam_direction(self, index: int, estimate: Tensor) -> Tensor:
        """Adam's bias-corrected m̂ / (sqrt(v̂) + eps), each operation separately rounded."""
        m, v = self._moments[index]
        b1, b2 = self.config.beta1, self.config.beta2
        m.mul_(b1).add_(estimate * (1.0 - b1))
        v.mul_(b2).add_(estimate.mul(estimate).mul_(1.0 - b2))
        m_hat = m / (1.0 - self._beta_powers[0])
        v_hat = v / (1.0 - self._beta_powers[1])
        return m_hat.div_(v_hat.sqrt_().add_(self.config.adam_eps))

    def _add_exact_(self, index: int, delta: Tensor) -> None:
        """θ += delta on the grid; coarsens the grid first if θ + delta could leave it."""
        parameter, step = self.parameters[index], self.grid_steps[index]
        delta = on_grid(delta, step)
        needed = float(parameter.abs().max()) + float(delta.abs().max()) + self._headroom
        coarser = grid_step(needed, parameter.dtype)
        if coarser > step:
            parameter.copy_(on_grid(parameter, coarser))
            delta = on_grid(delta, coarser)
            self.grid_steps[index] = coarser
        parameter.add_(delta)


# ---- perturbation size above the noise floor -------------------------------------------------

EPS_CANDIDATES = (
    1e-3,
    2e-3,
    5e-3,
    1e-2,
    2e-2,
    5e-2,
    1e-1,
    2e-1,
)  # auto ε: the first whose signal clears the floor
SIGNAL_TO_NOISE = 4.0  # the median |L+ - L-| must be this many noise floors


@dataclass(frozen=True)
class EstimateNoise:
    eps: float
    signal: float  # median |L+ - L-| over the probe directions
    noise_floor: float  # RMS disagreement of two measurements of the same L+ - L-


def estimate_noise(
    optimizer: ZOOptimizer, loss_a: Loss, loss_b: Loss, seeds: Sequence[int]
) -> EstimateNoise:
    """How reproducible a loss difference is at the optimizer's ε: each direction's L+ - L-
    measured twice, by two losses that differ only in their noise (on the simulated chip: two
    chips programmed with different seeds). noise = RMS(d_a - d_b) / √2, the floor a single
    measurement carries; signal = median |(d_a + d_b) / 2|. The weights end as they began."""
    first = np.array([_pair_difference(optimizer, seed, loss_a) for seed in seeds])
    second = np.array([_pair_difference(optimizer, seed, loss_b) for seed in seeds])
    noise = float(np.sqrt(np.mean(np.square(first - second)) / 2.0))
    signal = float(np.median(np.abs(first + second) / 2.0))
    return EstimateNoise(optimizer.config.eps, signal, noise)


def _pair_difference(optimizer: ZOOptimizer, seed: int, loss: Loss) -> float:
    _, loss_plus, loss_minus = optimizer.estimate(seed, loss)
    return loss_plus - loss_minus


def choose_eps(measure: Callable[[float], EstimateNoise]) -> EstimateNoise:
    """The first of `EPS_CANDIDATES` whose signal is `SIGNAL_TO_NOISE` noise floors or more
    (the first at once for a deterministic loss), else the largest."""
    for eps in EPS_CANDIDATES:
        measured = measure(eps)
        if measured.signal >= SIGNAL_TO_NOISE * measured.noise_floor:
            break
    return measured
