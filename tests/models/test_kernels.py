"""The compiled batch-1 steps (models/kernels.py) of the selective SSM and the LRU against
their references and their torch fused steps: which batches take them, and that every path
gives the same step."""

from __future__ import annotations

import numba
import pytest
import torch

from models.architectures import build_model
from models.base import StatefulModel
from models.fused import kernel_applies
from models.kernels import KERNEL_MAX_BATCH, compiled
from models.lru_fused import fused_lru_step, kernel_lru_step
from models.lru_fused import model_step as lru_model_step
from models.selective_fused import (
    fused_selective_step,
    kernel_selective_step,
    scripted_model_step,
)
from tests.models.test_architectures import random_input, warm_state

TOL = 1e-5

# Per architecture: a small config, the kernel step, and the torch fused step without it.
ARCHITECTURES = {
    "selective": (
        {"vocab_size": 97, "d_output": 97, "d_model": 48, "n_layers": 2, "d_state": 4},
        kernel_selective_step,
        lambda model, x, state: fused_selective_step(model, x, state, scripted_model_step),
    ),
    "lru": (
        {"d_model": 24, "d_state": 12, "n_layers": 2},
        kernel_lru_step,
        lambda model, x, state: fused_lru_step(model, x, state, lru_model_step),
    ),
}


def build(architecture: str, dtype: torch.dtype = torch.float32, **config) -> StatefulModel:
    """A model whose parameters are all off their initial values (norms start at weight 1
    and bias 0, where a kernel that ignored them would still agree)."""
    torch.manual_seed(0)
    base, _, _ = ARCHITECTURES[architecture]
    model = build_model(architecture, {**base, **config}).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.to(dtype)


def derived(model: StatefulModel):
    with torch.no_grad():
        return model._fused_weights.get(model)


def assert_same_step(got, expected, tol: float = TOL) -> None:
    (logits, state), (logits_ref, state_ref) = got, expected
    torch.testing.assert_close(logits, logits_ref, rtol=tol, atol=tol)
    assert state.keys() == state_ref.keys()
    for name in state:
        torch.testing.assert_close(state[name], state_ref[name], rtol=tol, atol=tol)


def test_a_few_cpu_rows_of_the_weights_dtype_take_a_kernel() -> None:
    x = torch.zeros(1, dtype=torch.long)
    state = {"h": torch.zeros(1, 3)}
    assert kernel_applies(True, torch.float32, x, state)
    assert kernel_applies(True, torch.float32, torch.zeros(KERNEL_MAX_BATCH), state)
    assert not kernel_applies(True, torch.float32, torch.zeros(KERNEL_MAX_BATCH + 1), state)
    assert not kernel_applies(False, torch.float32, x, state)  # weights off the CPU
    # A state of another dtype goes where torch's type promotion decides what happens.
    assert not kernel_applies(True, torch.float32, x, {"h": torch.zeros(1, 3).double()})


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("batch", [1, 3])
def test_kernel_torch_and_reference_steps_agree_over_many_steps(
    architecture: str, batch: int
) -> None:
    _, kernel_step, torch_step = ARCHITECTURES[architecture]
    model = build(architecture)
    weights = derived(model)
    x = random_input(model, batch, 48, seed=batch)
    kernel = fused = reference = warm_state(model, batch)  # SSM conv states: strided views
    for t in range(x.shape[1]):
        with torch.inference_mode():
            logits_k, kernel = kernel_step(weights, x[:, t], kernel)
            logits_f, fused = torch_step(model, x[:, t], fused)
        with torch.no_grad():
            logits_r, reference = model.step_reference(x[:, t], reference)
        assert_same_step((logits_k, kernel), (logits_r, reference))
        assert_same_step((logits_f, fused), (logits_r, reference))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_kernel_leaves_its_inputs_unchanged(architecture: str) -> None:
    _, kernel_step, _ = ARCHITECTURES[architecture]
    model = build(architecture)
    state = warm_state(model, 2)
    before = {name: t.clone() for name, t in state.items()}
    x = model.example_step_input(2)
    with torch.inference_mode():
        kernel_step(derived(model), x, state)
    for name, tensor in state.items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize(
    ("architecture", "dtype", "config"),
    [
        ("selective", torch.float64, {}),  # compiled again for float64
        ("selective", torch.float32, {"d_conv": 3, "expand": 1}),
        ("selective", torch.float32, {"d_conv": 2, "d_state": 1, "dt_rank": 3}),
        ("selective", torch.float32, {"input_kind": "features", "d_input": 5}),
        ("lru", torch.float64, {}),
        ("lru", torch.float32, {"norm": "rmsnorm"}),
        ("lru", torch.float32, {"input_kind": "tokens", "vocab_size": 11, "d_state": 1}),
    ],
)
def test_a_kernel_follows_dtypes_and_options(
    architecture: str, dtype: torch.dtype, config: dict
) -> None:
    _, kernel_step, _ = ARCHITECTURES[architecture]
    model = build(architecture, dtype, **config)
    x = random_input(model, 2, 6)
    x = x.to(dtype) if x.is_floating_point() else x
    kernel = reference = model.init_state(2, dtype=dtype)
    for t in range(x.shape[1]):
        with torch.inference_mode():
            got = kernel_step(derived(model), x[:, t], kernel)
        with torch.no_grad():
            expected = model.step_reference(x[:, t], reference)
        assert_same_step(got, expected, tol=1e-12 if dtype == torch.float64 else TOL)
        kernel, reference = got[1], expected[1]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_warm_up_prepares_the_fused_step(architecture: str) -> None:
    model = build(architecture)
    assert model._fused_weights.cached is None
    model.warm_up()
    assert model._fused_weights.cached is not None


def test_a_kernel_compiles_where_numba_can_cache_nothing() -> None:
    namespace: dict = {}
    exec("def double(x):\n    return 2 * x\n", namespace)  # no file: no place to cache it
    with pytest.raises(RuntimeError, match="cannot cache"):  # what a read-only disk gives
        numba.njit(cache=True)(namespace["double"])
    assert compiled(namespace["double"])(21) == 42
