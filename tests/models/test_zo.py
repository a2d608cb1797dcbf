"""Zeroth-order optimisers: exact perturbations, unbiased estimates, schedules and parameter
selection (the loss through a backend: tests/service/test_finetuning_forward.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.architectures import build_model
from models.finetune import attach_targets
from models.zo import (
    GAUSSIAN_CLIP,
    ZOConfig,
    ZOOptimizer,
    grid_step,
    learning_rate,
    on_grid,
)

TINY_LRU = {"d_input": 3, "d_output": 4, "d_model": 8, "d_state": 4, "n_layers": 2}


def _lru(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("lru", dict(TINY_LRU, dropout=0.0)).eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- exact perturbations -------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_a_perturbation_pair_restores_the_weights_bit_for_bit(direction: str) -> None:
    model = _lru()
    optimizer = ZOOptimizer(list(model.named_parameters()), ZOConfig(direction=direction))
    snapped = _snapshot(model)
    seen = []

    def loss(seed: int) -> float:
        seen.append(_snapshot(model))
        return float(sum(p.double().square().sum() for p in model.parameters()))

    for seed in range(20):
        optimizer.estimate(seed, loss)
        assert _bit_equal(_snapshot(model), snapped)
    plus, minus = seen[-2], seen[-1]
    assert not _bit_equal(plus, snapped) and not _bit_equal(minus, snapped)  # it did perturb


@pytest.mark.parametrize("optimizer_name", ["mezo", "zo_sign", "zo_adam"])
def test_a_step_with_zero_learning_rate_changes_nothing(optimizer_name: str) -> None:
    model = _lru()
    config = ZOConfig(optimizer=optimizer_name, n_perturbations=2)
    optimizer = ZOOptimizer(list(model.named_parameters()), config)
    snapped = _snapshot(model)
    result = optimizer.step([3, 4], lambda seed: float(model.head.weight.double().sum()), lr=0.0)
    assert all(g != 0 for g in result.projected_grads)
    assert _bit_equal(_snapshot(model), snapped)


def test_plain_float_arithmetic_would_not_restore_the_weights() -> None:
    """Why the grid exists: θ + εz - 2εz + εz in float32 misses θ in many entries."""
    theta = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 0.1
    z = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    moved = theta.clone().add_(z * 1e-3).add_(z * -2e-3).add_(z * 1e-3)
    assert (moved != theta).float().mean() > 0.1


def test_snapping_moves_each_weight_by_at_most_half_a_grid_step() -> None:
    model = _lru()
    before = _snapshot(model)
    config = ZOConfig(eps=1e-3)
    optimizer = ZOOptimizer(list(model.named_parameters()), config)
    for (name, parameter), step in zip(model.named_parameters(), optimizer.grid_steps, strict=True):
        bound = float(before[name].abs().max()) + 2 * config.eps * config.z_max
        assert bound < 2**24 * step <= 2 * bound
        assert float((parameter.detach() - before[name]).abs().max()) <= step / 2
        assert torch.equal(parameter, on_grid(parameter, step))


def test_grid_step_keeps_every_multiple_within_the_bound_exact() -> None:
    step = grid_step(3.0, torch.float32)
    assert step == 2.0**-22  # 3 < 2^2 = 2^24 · 2^-22
    values = torch.arange(-(2**24), 2**24 + 1, 2**12, dtype=torch.float64) * step
    assert torch.equal(values.float().double(), values)  # exactly representable in float32


def test_updates_that_outgrow_the_grid_coarsen_it_and_stay_exact() -> None:
    weight = nn.Parameter(torch.tensor([0.5, -0.25, 0.0]))
    optimizer = ZOOptimizer([("w", weight)], ZOConfig(optimizer="zo_sign", eps=1e-3))
    first = optimizer.grid_steps[0]
    optimizer.update_([0], [1.0], lr=4.0)  # each entry moves by 4: |w| grows past 2^24·step
    assert optimizer.grid_steps[0] > first
    assert torch.equal(weight.data, on_grid(weight.data, optimizer.grid_steps[0]))
    assert float(weight.detach().abs().max()) > 3.0
    snapped = weight.detach().clone()
    optimizer.estimate(7, lambda seed: 0.0)
    assert torch.equal(weight.data, snapped)


# ---- the estimate --------------------------------------------------------------------------


class Quadratic:
    """L(θ) = ½ θᵀAθ + bᵀθ on one parameter vector; evaluated in float64."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        q = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))[0]
        self.A = q @ torch.diag(torch.linspace(0.5, 1.0, dim, dtype=torch.float64)) @ q.T
        self.b = torch.randn(dim, generator=generator, dtype=torch.float64)
        self.theta = nn.Parameter(torch.randn(dim, generator=generator))

    def loss(self, seed: int = 0) -> float:
        t = self.theta.detach().double()
        return float(0.5 * t @ self.A @ t + self.b @ t)

    def gradient(self) -> torch.Tensor:
        return self.A @ self.theta.detach().double() + self.b


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_the_estimate_is_an_unbiased_gradient_on_a_quadratic(direction: str) -> None:
    """For a quadratic the central difference is exact: g = zᵀ∇L; so E[g z] = E[z zᵀ]∇L = ∇L.
    Per coordinate Var[g z_i] = |∇L|² + ∇L_i² (Gaussian) or |∇L|² - ∇L_i² (Rademacher), at
    most 2|∇L|²; the mean of N draws stays within 4.5 standard errors of ∇L in every
    coordinate except with probability below dim · 7e-6."""
    problem, n_draws = Quadratic(dim=8), 4000
    optimizer = ZOOptimizer([("theta", problem.theta)], ZOConfig(eps=1e-3, direction=direction))
    gradient = problem.gradient()
    total = torch.zeros_like(gradient)
    # The grid rounds each εz_i by at most q/2, which moves g by at most |∇L|₁ q / (2ε).
    rounding = float(gradient.abs().sum()) * optimizer.grid_steps[0] / (2 * 1e-3)
    for seed in range(n_draws):
        g, _, _ = optimizer.estimate(seed, problem.loss)
        _, z = next(optimizer.directions(seed))
        assert abs(g - float(z.double() @ gradient)) <= rounding + 1e-9  # the exact derivative
        total += g * z.double()
    standard_error = math.sqrt(2 * float(gradient @ gradient) / n_draws)
    assert (total / n_draws - gradient).abs().max() < 4.5 * standard_error


def test_gaussian_directions_are_clipped_and_seeded() -> None:
    weight = nn.Parameter(torch.zeros(200_000))
    optimizer = ZOOptimizer([("w", weight)], ZOConfig())
    (_, z1), (_, z2) = next(optimizer.directions(5)), next(optimizer.directions(5))
    assert torch.equal(z1, z2) and float(z1.abs().max()) <= GAUSSIAN_CLIP
    assert abs(float(z1.mean())) < 5 / math.sqrt(200_000)
    assert float(z1.std()) == pytest.approx(1.0, abs=0.01)


def test_mezo_converges_on_a_well_conditioned_quadratic() -> None:
    """With A = I in d dimensions and lr = 1/(d+2), E|θ - θ*|² shrinks by 1 - 1/(d+2) per
    step, so after 300 steps E[L - L*] ≈ 5e-12 · (L0 - L*). Markov's inequality makes
    L - L* > 1e-6 · (L0 - L*) a 5e-6 event."""
    dim = 10
    problem = Quadratic(dim)
    problem.A = torch.eye(dim, dtype=torch.float64)
    optimum = float(-0.5 * problem.b @ problem.b)
    start = problem.loss() - optimum
    optimizer = ZOOptimizer([("theta", problem.theta)], ZOConfig(eps=1e-3))
    for step in range(300):
        optimizer.step([step], problem.loss, lr=1.0 / (dim + 2))
    assert problem.loss() - optimum < 1e-6 * start


@pytest.mark.parametrize("name,lr,steps", [("zo_sign", 0.01, 1000), ("zo_adam", 0.05, 400)])
def test_the_zo_bench_variants_descend_a_quadratic(name: str, lr: float, steps: int) -> None:
    """Both take steps of about lr per coordinate, so they settle within ~lr of the optimum:
    the excess loss ends far below 1% of where it started (measured: 3e-4 and 2e-6)."""
    problem = Quadratic(dim=10)
    start = problem.loss()
    optimizer = ZOOptimizer([("theta", problem.theta)], ZOConfig(optimizer=name))
    for step in range(steps):
        optimizer.step([step], problem.loss, lr=lr)
    optimum = float(-0.5 * problem.b @ torch.linalg.solve(problem.A, problem.b))
    assert problem.loss() - optimum < 0.01 * (start - optimum)


def test_n_spsa_averages_its_estimates() -> None:
    """One n-SPSA update equals the mean of n single-estimate MeZO updates (on the grid)."""
    problem = Quadratic(dim=6)
    twin = nn.Parameter(problem.theta.detach().clone())
    averaged = ZOOptimizer([("theta", problem.theta)], ZOConfig(n_perturbations=4))
    result = averaged.step([10, 11, 12, 13], problem.loss, lr=0.01)
    reference = ZOOptimizer([("theta", twin)], ZOConfig())
    expected = twin.detach().double().clone()
    for seed, g in zip([10, 11, 12, 13], result.projected_grads, strict=True):
        _, z = next(reference.directions(seed))
        expected -= 0.01 * g / 4 * z.double()
    assert torch.allclose(problem.theta.detach().double(), expected, atol=1e-6)


def test_a_non_finite_loss_is_an_error() -> None:
    problem = Quadratic(dim=3)
    optimizer = ZOOptimizer([("theta", problem.theta)], ZOConfig())
    with pytest.raises(FloatingPointError, match="not finite"):
        optimizer.step([0], lambda seed: float("nan"), lr=0.1)


def test_bad_settings_are_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="eps"):
        ZOConfig(eps=0.0)
    with pytest.raises(ValueError, match="optimizer"):
        ZOConfig(optimizer="adamw")
    with pytest.raises(ValueError, match="n_perturbations"):
        ZOConfig(n_perturbations=0)
    optimizer = ZOOptimizer([("w", nn.Parameter(torch.zeros(3)))], ZOConfig(n_perturbations=2))
    with pytest.raises(ValueError, match="expected 2 seeds"):
        optimizer.step([1], lambda seed: 0.0, lr=0.1)
    with pytest.raises(ValueError, match="seed"):
        optimizer.perturb_(-1, 1)
    with pytest.raises(ValueError, match="no parameters"):
        ZOOptimizer([], ZOConfig())


# ---- schedules -------------------------------------------------------------------------------


def test_learning_rate_schedules() -> None:
    assert learning_rate(50, 100, 0.1, "constant") == 0.1
    linear = [learning_rate(s, 101, 0.1, "linear", 0.1) for s in range(101)]
    cosine = [learning_rate(s, 101, 0.1, "cosine", 0.0) for s in range(101)]
    assert linear[0] == cosine[0] == pytest.approx(0.1)
    assert linear[-1] == pytest.approx(0.01) and cosine[-1] == pytest.approx(0.0, abs=1e-15)
    assert linear[50] == pytest.approx(0.055) and cosine[50] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(cosine, cosine[1:], strict=False))
    with pytest.raises(ValueError, match="schedule"):
        learning_rate(0, 10, 0.1, "step")


# ---- which parameters ------------------------------------------------------------------------


def test_readout_and_norm_picks_the_head_and_the_norms_of_each_architecture() -> None:
    torch.manual_seed(0)
    lru = build_model("lru", dict(TINY_LRU))
    expected = {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    expected |= {f"layers.{i}.norm.{p}" for i in range(2) for p in ("weight", "bias")}
    assert {name for name, _ in attach_targets(lru, "readout_and_norm")} == expected

    tiny_lm = {"d_model": 8, "d_state": 2, "n_layers": 2, "vocab_size": 11, "d_output": 11}
    selective = build_model("selective", tiny_lm)
    names = [name for name, _ in attach_targets(selective, "readout_and_norm")]
    # The head is tied to the embedding, which named_parameters lists once, under its name.
    norms = ["layers.0.norm.weight", "layers.1.norm.weight", "norm.weight"]
    assert names == ["encoder.embed.weight", *norms]

    snn = build_model("snn", {"d_model": 8, "n_layers": 2})
    names = {name for name, _ in attach_targets(snn, "readout_and_norm")}
    assert names == {"readout.proj.weight", "readout.proj.bias", "readout.beta_logit"}


def test_all_is_every_parameter_in_order() -> None:
    model = _lru()
    assert [n for n, _ in attach_targets(model, "all")] == [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="unknown target"):
        attach_targets(model, "everything")


def test_untuned_parameters_never_move() -> None:
    model = _lru()
    before = _snapshot(model)
    optimizer = ZOOptimizer(attach_targets(model, "readout_and_norm"), ZOConfig())
    x = torch.rand(4, 5, 3)
    labels = torch.tensor([0, 1, 2, 3])

    def loss(seed: int) -> float:
        return float(nn.functional.cross_entropy(model(x)[0][:, -1], labels))

    for step in range(5):
        optimizer.step([step], loss, lr=0.1)
    tuned = {n for n, _ in attach_targets(model, "readout_and_norm")}
    after = _snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in tuned)
    assert all(not torch.equal(before[n], after[n]) for n in tuned)
