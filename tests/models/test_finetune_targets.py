"""Tuning targets (models.finetune): identity adapters change nothing, only targets move, no
copy of the parameters is made, merging equals the adapted forward, a trajectory over
adapters replays bit for bit, and the ZO estimate matches a finite-difference reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.architectures import build_model
from models.finetune import (
    adapt_inputs,
    attach_targets,
    canonical_targets,
    chip_view,
    is_adapted,
    merge_targets,
    merged_copy,
    parse_targets,
)
from models.trajectory import BaseReference, Trajectory, rebuild_weights
from models.zo import ZOConfig, ZOOptimizer

TINY_LRU = {"d_input": 3, "d_output": 4, "d_model": 8, "d_state": 4, "n_layers": 2, "dropout": 0.0}


def _lru(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("lru", dict(TINY_LRU)).eval()


def _batch():
    generator = torch.Generator().manual_seed(3)
    return torch.rand(6, 5, 3, generator=generator) * 16, torch.arange(6) % 4  # [6, 5, 3], [6]


def _loss(model, x, labels) -> float:
    return float(nn.functional.cross_entropy(model(x)[0][:, -1], labels))


def test_target_expressions_parse_to_a_canonical_form_and_bad_ones_say_what_exists() -> None:
    assert parse_targets("readout+input+lora4") == (["input", "readout", "lora"], 4)
    assert canonical_targets("readout_and_norm") == "norm+readout"
    assert canonical_targets("lora2 + input") == "input+lora2"
    for bad, message in (
        ("everything", "unknown target"),
        ("lora0", "unknown target"),
        ("lora99", "lora rank"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_targets(bad)


@pytest.mark.parametrize("expression", ["input", "lora2", "input+norm+readout+lora3", "all+input"])
def test_identity_adapters_change_nothing(expression: str) -> None:
    model = _lru()
    x, _ = _batch()
    with torch.no_grad():
        before = model(x)[0]
        attach_targets(model, expression)
        adapted = model(x)[0]
    assert torch.equal(before, adapted)
    merged = merged_copy(model)
    assert not is_adapted(merged) and is_adapted(model)
    with torch.no_grad():
        assert torch.equal(merged(x)[0], before)
        assert torch.equal(model(x)[0], before)  # the adapted original still works
        merge_targets(model)
        assert torch.equal(model(x)[0], before)


def test_the_input_adapter_is_an_affine_map_of_the_inputs() -> None:
    model = _lru()
    reference = copy.deepcopy(model)
    params = dict(attach_targets(model, "input"))
    assert sorted(params) == [  # stable names: trajectories record them
        "encoder.proj.parametrizations.bias.0.shift",
        "encoder.proj.parametrizations.weight.0.scale",
    ]
    assert sum(p.numel() for p in params.values()) == 2 * TINY_LRU["d_input"]
    scale = next(p for n, p in params.items() if n.endswith("scale"))
    shift = next(p for n, p in params.items() if n.endswith("shift"))
    with torch.no_grad():
        scale.copy_(torch.tensor([-1.0, 0.5, 2.0]))
        shift.copy_(torch.tensor([16.0, 1.0, -3.0]))
    x, _ = _batch()
    with torch.no_grad():
        expected = reference(x * scale + shift / model.encoder.input_scale)[0]
        assert torch.allclose(model(x)[0], expected, atol=1e-5)
        merge_targets(model)
        assert torch.allclose(model(x)[0], expected, atol=1e-5)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]


def test_the_chip_view_on_adapted_inputs_is_the_adapted_model_over_the_same_tensors() -> None:
    model = _lru()
    tuned = dict(attach_targets(model, "input+norm+readout"))
    view = chip_view(model)
    x, _ = _batch()
    with torch.no_grad():
        for parameter in tuned.values():  # move every target, in place
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
        # The reference: the adapted forward (the adapter folded into the encoder weights).
        torch.testing.assert_close(view(adapt_inputs(model, x))[0], model(x)[0])
    proj = model.encoder.proj.parametrizations
    assert view.encoder.proj.weight is proj.weight.original  # the base weight, not a copy
    assert view.encoder.proj.bias is proj.bias.original
    assert view.head.weight is model.head.weight  # a tuned crossbar weight: the live tensor
    adapter = {id(p) for name, p in tuned.items() if ".parametrizations." in name}  # s and b
    assert {id(p) for p in view.parameters()} == {id(p) for p in model.parameters()} - adapter
    assert not is_adapted(view)
    plain = _lru()
    assert chip_view(plain) is plain
    attach_targets(plain, "lora2")
    with pytest.raises(ValueError, match="low-rank adapters have no chip view"):
        chip_view(plain)


def test_adapters_hold_no_copy_of_the_base_parameters() -> None:
    model = _lru()
    base_ids = {id(p) for p in model.parameters()}
    base_numel = sum(p.numel() for p in model.parameters())
    tuned = attach_targets(model, "input+lora2")
    # Every base parameter is still the same object, and the only new tensors are the adapters.
    assert base_ids <= {id(p) for p in model.parameters()}
    new = [p for p in model.parameters() if id(p) not in base_ids]
    assert {id(p) for p in new} == {id(p) for _, p in tuned}
    n_lora = sum(p.numel() for n, p in tuned if "lora" in n)
    assert sum(p.numel() for p in new) == 2 * TINY_LRU["d_input"] + n_lora < base_numel / 2


@pytest.mark.parametrize("expression", ["input", "lora2", "norm+readout", "input+readout"])
def test_only_the_targets_move(expression: str) -> None:
    model = _lru()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = attach_targets(model, expression)
    optimizer = ZOOptimizer(tuned, ZOConfig(eps=1e-2))
    initial = {n: p.detach().clone() for n, p in tuned}
    x, labels = _batch()
    for step in range(4):
        optimizer.step([step], lambda _: _loss(model, x, labels), lr=0.05)
    moved = {n for n, p in tuned if not torch.equal(p, initial[n])}
    assert moved == {n for n, _ in tuned}
    merge_targets(model)
    after = dict(model.named_parameters())
    targets, _ = parse_targets(expression)
    adapted = set()
    if "input" in targets:
        adapted |= {"encoder.proj.weight", "encoder.proj.bias"}
    if "lora" in targets:
        adapted |= {n for n, p in base.items() if p.dim() == 2 and n.startswith("layers.")}
    if "readout" in targets:
        adapted |= {"head.weight", "head.bias"}
    if "norm" in targets:
        adapted |= {n for n in base if ".norm." in n or n.startswith("norm.")}
    for name, value in base.items():
        assert torch.equal(value, after[name]) == (name not in adapted), name


def test_a_trajectory_over_adapters_replays_to_the_same_weights() -> None:
    model = _lru()
    base = copy.deepcopy(model)
    tuned = attach_targets(model, "input+lora2+readout")
    config = ZOConfig(eps=1e-2, n_perturbations=2)
    optimizer = ZOOptimizer(tuned, config)
    trajectory = Trajectory(
        BaseReference("toy", "1", "0" * 64), config, "input+lora2+readout", optimizer.names
    )
    x, labels = _batch()
    for step in range(5):
        result = optimizer.step([2 * step, 2 * step + 1], lambda _: _loss(model, x, labels), 0.05)
        trajectory.append([2 * step, 2 * step + 1], result.projected_grads, 0.05)
    merge_targets(model)
    replayed, _ = rebuild_weights(base, trajectory)
    for (name, a), b in zip(model.named_parameters(), replayed.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not is_adapted(base)


def test_the_zo_estimate_matches_a_finite_difference_directional_derivative() -> None:
    """On a quadratic the central difference is exact: the projected gradient g along z must
    equal z·∇L, and the mean of g·z over many z approaches ∇L (E[zzᵀ] = I)."""
    target = torch.tensor([1.0, -2.0, 0.5, 3.0])
    weight = nn.Parameter(torch.zeros(4))
    optimizer = ZOOptimizer([("w", weight)], ZOConfig(eps=1e-2, direction="rademacher"))

    def loss(_: int) -> float:
        return float(((weight.double() - target) ** 2).sum())

    gradient = 2 * (weight.detach().double() - target)  # the exact ∇L at w = 0
    estimates = []
    for seed in range(400):
        g, _, _ = optimizer.estimate(seed, loss)
        _, z = next(optimizer.directions(seed))
        assert g == pytest.approx(float(z.double() @ gradient), rel=1e-5)
        estimates.append(g * z.double())
    assert torch.allclose(torch.stack(estimates).mean(0), gradient, atol=0.5)
    assert torch.equal(weight.detach(), torch.zeros(4))  # the pairs restored w exactly
