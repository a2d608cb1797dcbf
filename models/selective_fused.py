"""The fused step of the selective SSM: `SelectiveModel.step` in fewer, cheaper ops.

Same maths as the reference (`SelectiveMixer.step` through `SelectiveBlock.step`), with:
- every matmul weight stored transposed ([in, out], `transposed`), half the time at batch 1;
- each RMSNorm folded into the matmul after it (in_proj, the head): the norm becomes one
  per-row division by hypot(‖x‖, √(D·eps)) of the matmul's output (`rms_folded`);
- A = −exp(A_log) and the depthwise conv taps precomputed (`DerivedWeights`);
- the decay, drive and state update as one exp, one mul and one baddbmm; the readout as a
  bmm; the residual added inside the output matmul (addmm); in-place ops where a result is
  fresh, so fewer tensors are allocated;
- the whole step (embedding, every block, head) one function compiled by TorchScript
  (`script`), so no Python runs between the ops;
- on CPU, for a few rows (`KERNEL_MAX_BATCH`), each block one call of a numba-compiled loop
  nest instead (models/kernels.py): no per-op dispatch at all.

bench/fused_step.py --compile measures the choice, each way called alike: eagerly 198 µs,
TorchScript 169 µs, torch.compile (inductor) 514 µs after 6 s compiling (charlm-selective,
batch 1, one run on the shared machine); the numba kernel's figures are in its table.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.base import State, StatefulModel
from models.fused import (
    DerivedWeights,
    cpu_array,
    encode,
    encoder_weights,
    kernel_applies,
    rms_folded,
    script,
    step_layer_pairs,
    transposed,
    weights_if_known,
)
from models.kernels import rms_head, selective_block_step


def block_step(
    u: Tensor,  # [B, D]
    conv_state: Tensor,  # [B, E, K-1]
    ssm_state: Tensor,  # [B, E, N]
    weights: list[Tensor],  # see `_derive`
    sqrt_d_eps: Tensor,  # √(D · eps) of the block's norm, 0-dim
    dt_rank: int,
    d_state: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """One block: (u + Mixer(RMSNorm(u)) [B, D], conv state, ssm state). Views come from
    chunk, split and narrow: each is one op, where `t[:, a:b]` is two."""
    in_t, conv_weight, conv_bias, x_t, dt_t, dt_bias, A, D, out_t = weights
    rms = torch.hypot(torch.linalg.vector_norm(u, dim=-1, keepdim=True), sqrt_d_eps)  # [B, 1]
    x, z = torch.mm(u, in_t).div_(rms).chunk(2, dim=1)  # [B, E] each, in_proj(RMSNorm(u))
    window = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)  # [B, E, K]
    x_conv = F.silu(torch.linalg.vecdot(window, conv_weight).add_(conv_bias), inplace=True)
    dt_low, B, C = torch.mm(x_conv, x_t).split([dt_rank, d_state, d_state], dim=1)
    dt = F.softplus(torch.addmm(dt_bias, dt_low, dt_t))  # [B, E]
    decay = torch.mul(dt.unsqueeze(-1), A).exp_()  # [B, E, N]
    drive = (dt * x_conv).unsqueeze(-1)  # [B, E, 1]
    h = torch.baddbmm(decay.mul_(ssm_state), drive, B.unsqueeze(-2))  # [B, E, N]
    y = torch.bmm(h, C.unsqueeze(-1)).squeeze(-1).addcmul_(D, x_conv)  # [B, E]
    out = torch.addmm(u, y.mul_(F.silu(z)), out_t)  # [B, D], the residual included
    return out, window.narrow(2, 1, window.shape[2] - 1), h


def model_step(
    x_t: Tensor,  # [B] tokens or [B, F] features
    conv_states: list[Tensor],
    ssm_states: list[Tensor],
    enc_weight: Tensor,
    enc_bias: Tensor | None,
    blocks: list[list[Tensor]],
    sqrt_d_eps: list[Tensor],
    head_t: Tensor,  # [D, n_out]
    head_sqrt_d_eps: Tensor,
    dt_rank: int,
    d_state: int,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The whole step: (logits [B, n_out], new conv states, new ssm states)."""
    u = encode(x_t, enc_weight, enc_bias)  # [B, D]
    new_conv: list[Tensor] = []
    new_ssm: list[Tensor] = []
    for i in range(len(blocks)):
        u, conv, ssm = block_step(
            u, conv_states[i], ssm_states[i], blocks[i], sqrt_d_eps[i], dt_rank, d_state
        )
        new_conv.append(conv)
        new_ssm.append(ssm)
    rms = torch.hypot(torch.linalg.vector_norm(u, dim=-1, keepdim=True), head_sqrt_d_eps)
    return torch.mm(u, head_t).div_(rms), new_conv, new_ssm  # [B, n_out]


# What `fused_selective_step` runs: `model_step` compiled by TorchScript.
scripted_model_step = script(model_step)


class KernelWeights(NamedTuple):
    """The derived weights as numpy views (same memory) for models/kernels.py."""

    blocks: list[tuple]  # per block: `block_step`'s weight arguments, then √(D·eps) as a float
    head_t: np.ndarray  # [D, n_out]
    head_sqrt_d_eps: float


class SelectiveDerived(NamedTuple):
    arguments: tuple  # `model_step`'s arguments after the states
    names: list[tuple[str, str]]  # per block: its (conv, ssm) state names
    kernel: KernelWeights | None  # None off the CPU


def _derive(model: StatefulModel) -> SelectiveDerived:
    blocks, sqrt_d_eps = [], []
    for layer in model.layers:
        mixer = layer.mixer
        in_t, block_sqrt_d_eps = rms_folded(mixer.in_proj.weight, layer.norm)  # [D, 2E]
        blocks.append(
            [
                in_t,
                mixer.conv.weight.squeeze(1),  # [E, K]
                mixer.conv.bias,  # [E]
                transposed(mixer.x_proj.weight),  # [E, R + 2N]
                transposed(mixer.dt_proj.weight),  # [R, E]
                mixer.dt_proj.bias,  # [E]
                -torch.exp(mixer.A_log),  # [E, N]
                mixer.D,  # [E]
                transposed(mixer.out_proj.weight),  # [E, D]
            ]
        )
        sqrt_d_eps.append(block_sqrt_d_eps)
    head_t, head_sqrt_d_eps = rms_folded(model.head.weight, model.norm)  # [D, n_out]
    mixer = model.layers[0].mixer
    arguments = (
        *encoder_weights(model.encoder),
        blocks,
        sqrt_d_eps,
        head_t,
        head_sqrt_d_eps,
        mixer.dt_rank,
        mixer.d_state,
    )
    names = [(f"layers.{i}.conv", f"layers.{i}.ssm") for i in range(len(model.layers))]
    kernel = None
    if head_t.device.type == "cpu":
        kernel = KernelWeights(
            [
                (*(w.detach().numpy() for w in weights), float(eps))
                for weights, eps in zip(blocks, sqrt_d_eps, strict=True)
            ],
            head_t.numpy(),
            float(head_sqrt_d_eps),
        )
    return SelectiveDerived(arguments, names, kernel)


# The SelectiveConfig fields beyond the common ones that this fused step was written for.
KNOWN_CONFIG = frozenset(
    {
        "d_state",
        "d_conv",
        "expand",
        "dt_rank",
        "dt_min",
        "dt_max",
        "tie_embeddings",
        # routed experts' options: a model that uses them (mixer "moe") takes the reference
        # step (`fused_weights`); with mixer "ssm" they are unused
        "mixer",
        "n_experts",
        "top_k",
        "d_expert",
        "load_balance_weight",
    }
)


def fused_weights(config) -> DerivedWeights | None:
    """The cache a `SelectiveModel` keeps for `fused_selective_step`; None for a config with
    a field this fused step does not know (the model then always takes its reference step),
    and for routed experts (mixer "moe"): their step's cost is the per-token gather of the
    chosen experts' weights, which fusing the SSM block around it would not remove."""
    if getattr(config, "mixer", "ssm") != "ssm":
        return None
    return weights_if_known(config, KNOWN_CONFIG, _derive)


def fused_selective_step(
    model: StatefulModel, x_t: Tensor, state: State, step=None
) -> tuple[Tensor, State]:
    """The reference step's (logits [B, n_out], new state), on checked inputs, no autograd.
    `step` None chooses: the numba kernel where it applies (`fused.kernel_applies`), else
    `model_step` compiled by TorchScript; or `step` runs `model_step`'s ops as given (eagerly,
    scripted, compiled: bench/fused_step.py compares them)."""
    derived: SelectiveDerived = model._fused_weights.get(model)
    if step is None:
        dtype = derived.arguments[0].dtype
        if kernel_applies(derived.kernel is not None, dtype, x_t, state):
            return kernel_selective_step(derived, x_t, state)
        step = scripted_model_step
    return step_layer_pairs(step, x_t, state, derived.names, derived.arguments)


def kernel_selective_step(
    derived: SelectiveDerived, x_t: Tensor, state: State
) -> tuple[Tensor, State]:
    """`fused_selective_step` through models/kernels.py: one call per block."""
    u = encode(x_t, derived.arguments[0], derived.arguments[1]).numpy()  # [B, D]
    new_state: State = {}
    for (conv, ssm), weights in zip(derived.names, derived.kernel.blocks, strict=True):
        u, conv_t, ssm_t = selective_block_step(
            u, cpu_array(state[conv]), cpu_array(state[ssm]), *weights
        )
        new_state[conv], new_state[ssm] = torch.from_numpy(conv_t), torch.from_numpy(ssm_t)
    logits = rms_head(u, derived.kernel.head_t, derived.kernel.head_sqrt_d_eps)
    return torch.from_numpy(logits), new_state
