"""The fused step of the LRU stack: `LRUModel.step` in fewer ops.

Per layer, the reference runs two drive matmuls, the complex rotation as six elementwise ops,
two readout matmuls and D ⊙ u. All of it is linear in z = [h_re, h_im, u] [B, 2N + H], so
one matmul gives both the new state and the readout:

    [h'_re; h'_im] = R z,   R = [[diag Re Λ, −diag Im Λ, γ ⊙ B_re],
                                 [diag Im Λ,  diag Re Λ, γ ⊙ B_im]]        [2N, 2N + H]
    y = Re(C h') + D ⊙ u = (C' R + [0, 0, diag D]) z,   C' = [C_re, −C_im]  [H, 2N + H]

with R and the readout rows stacked into one [2N + H, 2N + H] matrix computed once per
parameter change (`DerivedWeights`) and stored transposed, as every matmul weight here
(`transposed`); the GLU's residual add is one addcmul. A layer is seven ops. Eval mode only
(no dropout), so `fused_step_applies` guards it.

The step runs eagerly: compiled by TorchScript it was no faster at digits-lru's sizes (81
against 79 µs per batch-1 step, same run). On CPU, for a few rows, each layer is instead one
call of a numba-compiled loop nest over the same derived weights (models/kernels.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import State, StatefulModel
from models.fused import (
    DerivedWeights,
    cpu_array,
    encode,
    encoder_weights,
    kernel_applies,
    step_layer_pairs,
    transposed,
    weights_if_known,
)
from models.kernels import lru_layer_step, norm_head


def model_step(
    x_t: Tensor,  # [B] tokens or [B, F] features
    h_re: list[Tensor],  # [B, N] per layer
    h_im: list[Tensor],
    enc_weight: Tensor,
    enc_bias: Tensor | None,
    layers: list[list[Tensor]],  # see `_derive`
    norm_weights: list[Tensor],  # per layer, then the final norm
    norm_biases: list[Tensor | None],  # None for RMSNorm
    norm_eps: float,
    head_t: Tensor,  # [H, n_out]
    head_bias: Tensor,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The whole step: (logits [B, n_out], new h_re, new h_im)."""
    x = encode(x_t, enc_weight, enc_bias)  # [B, H]
    new_re: list[Tensor] = []
    new_im: list[Tensor] = []
    for i in range(len(layers)):
        transition_t, glu_t, glu_bias = layers[i]
        N, H = h_re[i].shape[1], x.shape[1]
        u = _normalise(x, norm_weights[i], norm_biases[i], norm_eps)  # [B, H]
        z = torch.cat([h_re[i], h_im[i], u], dim=1)  # [B, 2N + H]
        re, im, y = torch.mm(z, transition_t).split([N, N, H], dim=1)  # [B, N], [B, N], [B, H]
        new_re.append(re)
        new_im.append(im)
        a, b = torch.addmm(glu_bias, F.gelu(y), glu_t).chunk(2, dim=1)  # [B, H] each
        x = torch.addcmul(x, a, torch.sigmoid(b))  # [B, H], x + GLU
    u = _normalise(x, norm_weights[-1], norm_biases[-1], norm_eps)
    return torch.addmm(head_bias, u, head_t), new_re, new_im


def _normalise(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    if bias is None:
        return F.rms_norm(x, [x.shape[-1]], weight, eps)
    return F.layer_norm(x, [x.shape[-1]], weight, bias, eps)


def _transition(lru: nn.Module) -> Tensor:
    """The stacked [R; C' R + [0, 0, diag D]] matrix of one layer, transposed: [2N + H, 2N + H]."""
    lam_re, lam_im, gamma = lru.compute_eigenvalues()  # [N] each
    N = lru.B_re.shape[0]
    rotation = torch.cat(
        [
            torch.cat([torch.diag(lam_re), -torch.diag(lam_im)], dim=1),
            torch.cat([torch.diag(lam_im), torch.diag(lam_re)], dim=1),
        ]
    )  # [2N, 2N]
    drive = torch.cat([lru.B_re, lru.B_im]) * gamma.repeat(2).unsqueeze(1)  # [2N, H]
    R = torch.cat([rotation, drive], dim=1)  # [2N, 2N + H]
    readout = torch.cat([lru.C_re, -lru.C_im], dim=1) @ R  # [H, 2N + H]
    readout[:, 2 * N :] += torch.diag(lru.D)
    return transposed(torch.cat([R, readout]))


def _norm_eps(norm: nn.Module, dtype: torch.dtype) -> float:
    return float(norm.eps if norm.eps is not None else torch.finfo(dtype).eps)  # RMSNorm: None


class KernelWeights(NamedTuple):
    """The derived weights as numpy views (same memory) for models/kernels.py."""

    layers: list[tuple]  # per layer: `lru_layer_step`'s arguments after the states
    head: tuple  # `norm_head`'s arguments after x


class LRUDerived(NamedTuple):
    arguments: tuple  # `model_step`'s arguments after the states
    names: list[tuple[str, str]]  # per layer: its (h_re, h_im) state names
    kernel: KernelWeights | None  # None off the CPU


def _derive(model: StatefulModel) -> LRUDerived:
    norms = [layer.norm for layer in model.layers] + [model.norm]
    layers = [
        [_transition(layer.lru), transposed(layer.mixer.proj.weight), layer.mixer.proj.bias]
        for layer in model.layers
    ]
    eps = _norm_eps(model.norm, model.head.weight.dtype)  # every norm of a model shares it
    head_t = transposed(model.head.weight)
    arguments = (
        *encoder_weights(model.encoder),
        layers,
        [norm.weight for norm in norms],
        [getattr(norm, "bias", None) for norm in norms],
        eps,
        head_t,
        model.head.bias,
    )
    names = [(f"layers.{i}.h_re", f"layers.{i}.h_im") for i in range(len(model.layers))]
    kernel = None
    if head_t.device.type == "cpu":
        rms = getattr(model.norm, "bias", None) is None
        empty = np.empty(0, dtype=head_t.numpy().dtype)  # RMSNorm has no bias

        def norm_arguments(norm: nn.Module) -> tuple:
            bias = getattr(norm, "bias", None)
            bias = empty if bias is None else bias.detach().numpy()
            return norm.weight.detach().numpy(), bias, rms, eps

        kernel = KernelWeights(
            [
                (*norm_arguments(norm), *(w.detach().numpy() for w in weights))
                for norm, weights in zip(norms[:-1], layers, strict=True)
            ],
            (*norm_arguments(model.norm), head_t.numpy(), model.head.bias.detach().numpy()),
        )
    return LRUDerived(arguments, names, kernel)


# The LRUConfig fields beyond the common ones that this fused step was written for.
KNOWN_CONFIG = frozenset(
    {
        "d_state",
        "r_min",
        "r_max",
        "max_phase",
        "norm",
        "dropout",
    }
)


def fused_weights(config) -> DerivedWeights | None:
    """The cache an `LRUModel` keeps for `fused_lru_step`; None for a config with a field this fused
    step does not know (the model then always takes its reference step)."""
    return weights_if_known(config, KNOWN_CONFIG, _derive)


def fused_lru_step(
    model: StatefulModel, x_t: Tensor, state: State, step=None
) -> tuple[Tensor, State]:
    """The reference step's (logits [B, n_out], new state), on checked inputs, eval mode.
    `step` None chooses: the numba kernel where it applies (`fused.kernel_applies`), else
    `model_step`; or `step` runs `model_step`'s ops as given."""
    derived: LRUDerived = model._fused_weights.get(model)
    if step is None:
        dtype = derived.arguments[0].dtype
        if kernel_applies(derived.kernel is not None, dtype, x_t, state):
            return kernel_lru_step(derived, x_t, state)
        step = model_step
    return step_layer_pairs(step, x_t, state, derived.names, derived.arguments)


def kernel_lru_step(derived: LRUDerived, x_t: Tensor, state: State) -> tuple[Tensor, State]:
    """`fused_lru_step` through models/kernels.py: one call per layer."""
    x = encode(x_t, derived.arguments[0], derived.arguments[1]).numpy()  # [B, H]
    new_state: State = {}
    for (re, im), weights in zip(derived.names, derived.kernel.layers, strict=True):
        x, re_t, im_t = lru_layer_step(x, cpu_array(state[re]), cpu_array(state[im]), *weights)
        new_state[re], new_state[im] = torch.from_numpy(re_t), torch.from_numpy(im_t)
    return torch.from_numpy(norm_head(x, *derived.kernel.head)), new_state
