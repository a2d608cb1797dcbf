"""What every fused step shares: when it may run, and its weights derived once per change.

A batch-1 step of a small stateful model costs interpreter time, not arithmetic: dozens of
small tensor ops, each a Python call and a kernel launch. A fused step (one per architecture,
beside the model in `models/<arch>_fused.py`) runs the same maths in fewer ops over weights
derived ahead of time: projections concatenated so one matmul replaces several, a
normalisation's gain folded into the matmul after it, the discretisation (decays, rotations)
precomputed. Those derived weights depend only on the parameters, so they are computed once
and reused until a parameter changes.

A change is noticed three ways: an in-place update (fine-tuning, `load_state_dict`) bumps the
tensor's `_version`; a move or `.data` swap changes its `data_ptr()`; a new parameter, buffer or
submodule anywhere (an assigned `nn.Parameter`, a registered parametrization, which also
swaps the module's class) advances a process-wide registration count that torch's global
registration hooks keep. The cache holds the watched tensors and their storages, so no
other tensor can take their addresses while it lives. Tensors created under
`torch.inference_mode()` keep no version counter: an in-place update of such a parameter
(possible only inside inference mode) goes unnoticed, so update parameters outside it, as
the fine-tuning code does.

The fused step runs only where the reference would give the same thing and nothing needs
the graph or the model's own ops: eval mode (no dropout), no autograd, no tracing or export
(the ONNX exporter traces the reference step), no torch-function mode (backends that route
``F.linear``). `step_reference` in `models.base` always runs the reference.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from models.kernels import KERNEL_MAX_BATCH

Derived = TypeVar("Derived")

_registrations = itertools.count()
_registration_count = 0


def _count_registration(*_args) -> None:
    global _registration_count
    _registration_count = next(_registrations)


# Any parameter, buffer or submodule registered anywhere (module.__setattr__, register_*,
# parametrize) counts; rare in a server, so a spurious rebuild costs nothing that matters.
torch_module.register_module_parameter_registration_hook(_count_registration)
torch_module.register_module_buffer_registration_hook(_count_registration)
torch_module.register_module_module_registration_hook(_count_registration)


def fused_step_applies(model: nn.Module) -> bool:
    """True when a fused step may stand in for the reference: eval mode, no autograd, no
    tracing (the TorchScript ONNX exporter traces), no compiling or export (torch.compile,
    torch.export and the dynamo ONNX exporter), and no torch-function mode active (the analog
    and stochastic backends route the model's own ``F.linear`` calls through one,
    hardware_backends/routing.py; the fused step's matmuls over derived weights would escape
    it). Checked on every step, so the cheapest tests come first."""
    return not (
        model.training
        or torch.is_grad_enabled()
        or torch._C._len_torch_function_stack() > 0  # no public query for an active mode
        or torch._C._get_tracing_state() is not None  # what torch.jit.is_tracing() reads
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
    )


# The fields every architecture's config shares (`models.base.check_common_config`).
COMMON_CONFIG = frozenset(
    {"d_input", "vocab_size", "input_kind", "d_output", "d_model", "n_layers", "input_scale"}
)


def weights_if_known(
    config: Any, known: frozenset[str], derive: Callable[[nn.Module], Derived]
) -> DerivedWeights[Derived] | None:
    """The cache of `derive`'s weights for a model of `config`, or None when `config` has a
    field that is neither common nor in `known` (the options its fused step was written for).
    A field added later (a new option) thus sends the model to its reference step until its
    fused step learns the option; a test checks that every built-in takes the fused path."""
    fields = {field.name for field in dataclasses.fields(config)}
    return DerivedWeights(derive) if fields <= COMMON_CONFIG | known else None


class _Derivation(NamedTuple):
    watched: tuple[Tensor, ...]  # every parameter and buffer
    storages: tuple  # their storages, held so that no other tensor can take their addresses
    versioned: tuple[Tensor, ...]  # those with a version counter (not inference tensors)
    key: tuple
    value: Any


def _key(watched: tuple[Tensor, ...], versioned: tuple[Tensor, ...]) -> tuple:
    return (
        _registration_count,
        tuple(t._version for t in versioned),
        tuple(t.data_ptr() for t in watched),
    )


class DerivedWeights(Generic[Derived]):
    """`derive(model)` computed once and reused while none of `model`'s parameters and buffers
    changes (see the module docstring for what counts as a change). One derivation is one
    object swapped in whole, so a step on another thread never sees a key beside an older
    value; the key is taken before deriving, so a change made meanwhile is seen next time."""

    def __init__(self, derive: Callable[[nn.Module], Derived]) -> None:
        self.derive = derive
        self._derivation: _Derivation | None = None

    def get(self, model: nn.Module) -> Derived:
        derivation = self._derivation
        if derivation is None or derivation.key != _key(derivation.watched, derivation.versioned):
            watched = tuple(itertools.chain(model.parameters(), model.buffers()))
            versioned = tuple(t for t in watched if not t.is_inference())
            key = _key(watched, versioned)
            storages = tuple(t.untyped_storage() for t in watched)
            with torch.no_grad():
                derivation = _Derivation(watched, storages, versioned, key, self.derive(model))
            self._derivation = derivation
        return derivation.value

    @property
    def cached(self) -> Derived | None:
        """The derived weights in use, or None before the first fused step."""
        return None if self._derivation is None else self._derivation.value

    def __deepcopy__(self, memo: dict) -> DerivedWeights[Derived]:
        return DerivedWeights(self.derive)  # a copy derives afresh from its own parameters


# ---- the input encoder, shared by every architecture ----------------------------------------


def encoder_weights(encoder: nn.Module) -> tuple[Tensor, Tensor | None]:
    """An `InputEncoder` as (weight, bias): the embedding table for tokens ([V, D], no bias),
    or the projection, transposed, with `input_scale` folded in for features ([F, D], [D])."""
    if encoder.input_kind == "tokens":
        return encoder.embed.weight, None
    return transposed(encoder.proj.weight * encoder.input_scale), encoder.proj.bias


def encode(x_t: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One step's input, tokens [B] or features [B, F], -> [B, D] with `encoder_weights`.
    Written so that TorchScript can compile it too (bench/fused_step.py --compile)."""
    if bias is None:
        return F.embedding(x_t, weight)  # [B, D]
    return torch.addmm(bias, x_t, weight)  # [B, D]


def transposed(weight: Tensor) -> Tensor:
    """A Linear's weight [out, in] stored as [in, out]: at batch 1, `mm(x, w_t)` over the
    contiguous transpose takes half the time of `F.linear(x, w)` on this CPU (BLAS's
    transposed matrix-vector path is the slower one)."""
    return weight.t().contiguous()


def rms_folded(weight: Tensor, norm: nn.RMSNorm) -> tuple[Tensor, Tensor]:
    """Linear(RMSNorm(x)) without the norm: RMSNorm(x) = √D · x / sqrt(x·x + D·eps) · gain,
    so Linear(RMSNorm(x)) = (x @ w') / hypot(‖x‖, √(D·eps)) with w' = (weight · gain · √D)ᵀ
    (two ops for the norm: vector_norm and hypot). Returns (w' [D, out], √(D·eps) 0-dim)."""
    D = weight.shape[1]
    gain = norm.weight if norm.weight is not None else torch.ones(D, dtype=weight.dtype)
    eps = norm.eps if norm.eps is not None else torch.finfo(weight.dtype).eps
    sqrt_d_eps = torch.tensor(math.sqrt(D * eps), dtype=weight.dtype, device=weight.device)
    return transposed(weight * gain * math.sqrt(D)), sqrt_d_eps


def script(function: Callable) -> Callable:
    """`function` compiled by TorchScript, for the fused steps where that measured faster
    (bench/fused_step.py --compile: charlm-selective ~15% faster than eager, same calls).
    Ready in milliseconds, any batch size, dtype and device; torch.compile (inductor) took
    4–25 s to compile on the first call and was slower at these sizes (guards and a wrapper
    per call). TorchScript warns that it is deprecated upstream; the warning is expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(function)


def step_layer_pairs(
    step: Callable, x_t: Tensor, state: dict, names: list[tuple[str, str]], arguments: tuple
) -> tuple[Tensor, dict]:
    """A fused step over a state of two tensors per layer (`names`: each layer's pair):
    `step(x_t, firsts, seconds, *arguments)` -> (logits, new firsts, new seconds), with the
    state taken apart into the two lists and the new one put together by the same names."""
    firsts = [state[first] for first, _ in names]
    seconds = [state[second] for _, second in names]
    logits, new_firsts, new_seconds = step(x_t, firsts, seconds, *arguments)
    new_state = {}
    for (first, second), first_t, second_t in zip(names, new_firsts, new_seconds, strict=True):
        new_state[first], new_state[second] = first_t, second_t
    return logits, new_state


# ---- the compiled kernels' side (models/kernels.py) ----------------------------------------


def kernel_applies(has_kernel: bool, dtype: torch.dtype, x_t: Tensor, state: dict) -> bool:
    """A kernel takes CPU steps (`has_kernel`: the weights are on the CPU) of a few rows whose
    state has the weights' dtype (a state of another dtype goes where torch's type promotion
    decides what happens)."""
    if not has_kernel or x_t.shape[0] > KERNEL_MAX_BATCH:
        return False
    return all(tensor.dtype == dtype for tensor in state.values())


def cpu_array(tensor: Tensor) -> np.ndarray:
    """A CPU tensor's data as a C-contiguous array for a kernel: a view, or a copy when
    strided (a conv window sliced from a longer sequence)."""
    return np.ascontiguousarray(tensor.detach().numpy())
