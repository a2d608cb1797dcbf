"""The selective SSM's compiled block step (models/selective_kernel.py) against the reference
and the TorchScript step: which batches take it, and that every path gives the same step."""

from __future__ import annotations

import pytest
import torch

from models.architectures import build_model
from models.base import StatefulModel
from models.selective_fused import (
    fused_selective_step,
    kernel_applies,
    kernel_selective_step,
    scripted_model_step,
)
from models.selective_kernel import KERNEL_MAX_BATCH
from tests.models.test_architectures import random_input, warm_state

TOL = 1e-5


def selective(dtype: torch.dtype = torch.float32, **config) -> StatefulModel:
    torch.manual_seed(0)
    config = {
        "vocab_size": 97,
        "d_output": 97,
        "d_model": 48,
        "n_layers": 2,
        "d_state": 4,
        **config,
    }
    return build_model("selective", config).eval().to(dtype)


def derived(model: StatefulModel):
    with torch.no_grad():
        return model._fused_weights.get(model)


def assert_same_step(got, expected, tol: float = TOL) -> None:
    (logits, state), (logits_ref, state_ref) = got, expected
    torch.testing.assert_close(logits, logits_ref, rtol=tol, atol=tol)
    assert state.keys() == state_ref.keys()
    for name in state:
        torch.testing.assert_close(state[name], state_ref[name], rtol=tol, atol=tol)


def test_a_few_cpu_rows_take_the_kernel_and_more_take_torchscript() -> None:
    model = selective()
    weights = derived(model)
    for batch, expected in ((1, True), (KERNEL_MAX_BATCH, True), (KERNEL_MAX_BATCH + 1, False)):
        state = model.init_state(batch)
        assert kernel_applies(weights, model.example_step_input(batch), state) is expected
    # A state of another dtype than the weights goes where torch's promotion rules apply.
    state64 = {name: t.double() for name, t in model.init_state(1).items()}
    assert not kernel_applies(weights, model.example_step_input(1), state64)


@pytest.mark.parametrize("batch", [1, 3])
def test_kernel_torchscript_and_reference_agree_over_many_steps(batch: int) -> None:
    model = selective()
    weights = derived(model)
    x = random_input(model, batch, 48, seed=batch)
    kernel = scripted = reference = warm_state(model, batch)  # conv states are strided views
    for t in range(x.shape[1]):
        with torch.inference_mode():
            logits_k, kernel = kernel_selective_step(weights, x[:, t], kernel)
            logits_s, scripted = fused_selective_step(model, x[:, t], scripted, scripted_model_step)
        with torch.no_grad():
            logits_r, reference = model.step_reference(x[:, t], reference)
        assert_same_step((logits_k, kernel), (logits_r, reference))
        assert_same_step((logits_s, scripted), (logits_r, reference))


def test_the_kernel_leaves_its_inputs_unchanged() -> None:
    model = selective()
    state = warm_state(model, 2)
    before = {name: t.clone() for name, t in state.items()}
    x = model.example_step_input(2)
    with torch.inference_mode():
        kernel_selective_step(derived(model), x, state)
    for name, tensor in state.items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize(
    ("dtype", "config"),
    [
        (torch.float64, {}),  # compiled again for float64, exact to float64's precision
        (torch.float32, {"d_conv": 3, "expand": 1}),
        (torch.float32, {"d_conv": 2, "d_state": 1, "dt_rank": 3}),
        (torch.float32, {"input_kind": "features", "d_input": 5}),
    ],
)
def test_the_kernel_follows_dtypes_and_options(dtype: torch.dtype, config: dict) -> None:
    model = selective(dtype, **config)
    x = random_input(model, 2, 6)
    x = x.to(dtype) if x.is_floating_point() else x
    kernel = reference = model.init_state(2, dtype=dtype)
    for t in range(x.shape[1]):
        with torch.inference_mode():
            got = kernel_selective_step(derived(model), x[:, t], kernel)
        with torch.no_grad():
            expected = model.step_reference(x[:, t], reference)
        assert_same_step(got, expected, tol=1e-12 if dtype == torch.float64 else TOL)
        kernel, reference = got[1], expected[1]


def test_warm_up_prepares_the_fused_step() -> None:
    model = selective()
    assert model._fused_weights.cached is None
    model.warm_up()
    assert model._fused_weights.cached is not None
