"""The fused step of every architecture against its reference twin: the same logits, state
and activity over many steps, at batch 1 and above, and after every way a parameter changes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from models.architectures import build_model
from models.base import State, StatefulModel
from models.builtin import BUILTIN_RECIPES
from models.finetune import attach_targets
from models.lru import LRUConfig
from models.zo import ZOConfig, ZOOptimizer
from tests.models.test_architectures import CASES, make, random_input, warm_state

# Every built-in's own architecture and sizes, beside the small contract cases.
BUILTIN_CASES = {
    name: (recipe.architecture, recipe.model_config) for name, recipe in BUILTIN_RECIPES.items()
}
# Options no built-in uses yet, which the fused step must follow too.
BUILTIN_CASES["snn-thermometer-substeps-2layers"] = (
    "snn",
    {"d_model": 32, "n_layers": 2, "input_encoding": "thermometer", "substeps": 3},
)
TOL = 1e-5  # absolute and relative: float32 sums in another order, amplified over 64 steps
STEPS = 64


def build(case: str, seed: int = 0) -> StatefulModel:
    if case in CASES:
        return make(case, seed)
    torch.manual_seed(seed)
    architecture, config = BUILTIN_CASES[case]
    if architecture == "selective":  # the character LM: tokens over a small vocabulary
        config = {**config, "vocab_size": 97, "d_output": 97}
    return build_model(architecture, config).eval()


def run_both(model: StatefulModel, x: torch.Tensor, state: State):
    """Step x [B, T, ...] through the fused and the reference paths side by side."""
    fused = reference = state
    for t in range(x.shape[1]):
        with torch.inference_mode():
            logits_f, fused, activity_f = model.step_with_activity(x[:, t], fused)
        with torch.no_grad():
            logits_r, reference, activity_r = model.step_reference_with_activity(x[:, t], reference)
        yield (logits_f, fused, activity_f), (logits_r, reference, activity_r)


def assert_agree(model: StatefulModel, x: torch.Tensor, state: State) -> None:
    for (logits_f, fused, act_f), (logits_r, reference, act_r) in run_both(model, x, state):
        torch.testing.assert_close(logits_f, logits_r, rtol=TOL, atol=TOL)
        assert fused.keys() == reference.keys()
        for name in fused:
            if name.endswith(".spk"):  # spikes are decisions: equal, not merely close
                assert torch.equal(fused[name], reference[name]), name
            torch.testing.assert_close(fused[name], reference[name], rtol=TOL, atol=TOL)
        assert act_f.keys() == act_r.keys()
        for name in act_f:
            assert torch.equal(act_f[name], act_r[name]), name


@pytest.mark.parametrize("case", [*CASES, *BUILTIN_CASES])
@pytest.mark.parametrize("batch", [1, 4])
def test_fused_and_reference_steps_agree_over_many_steps(case: str, batch: int) -> None:
    model = build(case)
    x = random_input(model, batch, STEPS, seed=batch)
    assert_agree(model, x, warm_state(model, batch))
    # Every case really took the fused path (a config option the fused step does not know
    # would send it to the reference, and this test would compare the reference to itself),
    # but routed experts, which always take the reference step (`selective_fused`).
    if getattr(model.config, "mixer", "ssm") == "moe":
        assert model._fused_weights is None
    else:
        assert model._fused_weights is not None and model._fused_weights.cached is not None


def test_a_config_field_the_fused_step_does_not_know_takes_the_reference() -> None:
    @dataclasses.dataclass
    class WithNewOption(LRUConfig):
        new_option: int = 0

    model = build_model("lru", {"d_model": 8, "d_state": 4}).eval()
    other = type(model)(WithNewOption(d_model=8, d_state=4)).eval()
    other.load_state_dict(model.state_dict())
    assert other._fused_weights is None
    x = random_input(model, 2, 4)
    assert_agree(other, x, other.init_state(2))  # the reference on both sides, trivially


class PassThrough(TorchFunctionMode):
    """A torch-function mode that changes nothing, as a routing backend's does for most ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_the_fused_path_is_taken_only_where_it_applies() -> None:
    model = build("digits-lru")
    x = random_input(model, 2, 1)[:, 0]
    state = model.init_state(2)
    logits, _ = model.step(x, state)  # autograd on: the reference, with a graph
    assert logits.grad_fn is not None and model._fused_weights.cached is None
    model.train()
    with torch.no_grad():
        model.step(x, state)  # training mode: dropout, so the reference
    assert model._fused_weights.cached is None
    model.eval()
    with torch.inference_mode(), PassThrough():  # as a backend routing F.linear
        model.step(x, state)
    assert model._fused_weights.cached is None
    with torch.inference_mode():
        model.step(x, state)
    derived = model._fused_weights.cached
    assert derived is not None
    with torch.no_grad():
        model.step(x, state)
    assert model._fused_weights.cached is derived  # reused while nothing changed


def _agree_after_change(model: StatefulModel) -> None:
    dtype = next(model.parameters()).dtype
    x = random_input(model, 2, 13, seed=5)
    x = x.to(dtype) if x.is_floating_point() else x
    with torch.no_grad():
        _, warm = model(x[:, :5])
    assert_agree(model, x[:, 5:], warm)


def _prime(model: StatefulModel) -> torch.Tensor:
    """Fill the fused cache and return the fused logits of one step."""
    with torch.inference_mode():
        return model.step(random_input(model, 1, 1, seed=7)[:, 0], model.init_state(1))[0]


@pytest.mark.parametrize("case", ["lru-features", "selective-tokens", "snn-tokens-2layers"])
def test_the_fused_step_follows_parameter_changes(case: str) -> None:
    model = build(case)
    before = _prime(model)
    with torch.no_grad():  # in place, as a ZO perturbation or update does
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    assert not torch.equal(_prime(model), before)
    _agree_after_change(model)
    other = build(case, seed=3)
    model.load_state_dict(other.state_dict())  # copies in place
    _prime(model)
    _agree_after_change(model)
    model.to(torch.float64)  # a move: new storage behind the same parameters
    _agree_after_change(model)
    model.to(torch.float32)
    _agree_after_change(model)
    head = model.head if hasattr(model, "head") else model.readout.proj
    head.weight = nn.Parameter(head.weight.detach() * 2)  # a new parameter object
    _agree_after_change(model)


@pytest.mark.parametrize("case", ["lru-features", "selective-features", "snn-features"])
def test_the_fused_step_follows_zo_fine_tuning_and_adapters(case: str) -> None:
    model = build(case)
    _prime(model)
    targets = attach_targets(model, "input+norm+readout+lora2")  # parametrizations
    _prime(model)
    optimizer = ZOOptimizer(targets, ZOConfig())
    x = random_input(model, 4, 6)

    def loss(seed: int) -> float:
        with torch.inference_mode():
            logits, _ = model(x)
        return float(logits.square().mean())

    for seed in range(3):
        optimizer.step([seed], loss, lr=1e-2)
    assert any(float(p.detach().abs().max()) > 0 for n, p in targets if "lora_b" in n)  # it moved
    _agree_after_change(model)
