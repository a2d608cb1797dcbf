"""The fused step of the recurrent LIF network: `SNNModel.step` in fewer ops.

Each LIF layer's drive is a feed-forward current plus the recurrence over last step's spikes,
two matmuls in the reference. Both are linear, so one matmul over the concatenated inputs
gives their sum:

    drive_i = [W_i, V_i] [in_i; s_{i,t−1}] + b_i

where in_0 is the raw input (input_scale folded into W_0) or, with thermometer inputs, the
input spikes (computed as the reference computes them), and in_i the spikes layer i − 1 just
sent. With `substeps` K > 1 the layers and the readout update K times on the same input.
The decays σ(α), σ(β), σ(β_out) are precomputed and the weights stored transposed
(`DerivedWeights`, `transposed`); each neuron update is one addcmul. Eval mode only (dropout
off), so `fused_step_applies` guards it. The step runs eagerly: compiled by TorchScript it
was slower at digits-snn's sizes (67 against 53 µs per batch-1 step, same run).

A sum in another order rounds differently; a membrane within a rounding error of the
threshold could spike in one path and not the other. The agreement test runs both on real
digits and checks it does not happen there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.base import State, StatefulModel
from models.fused import DerivedWeights, encoder_weights, transposed, weights_if_known


def model_step(
    x_t: Tensor,  # [B] tokens or [B, F] features
    syn: list[Tensor],  # [B, n] per layer
    mem: list[Tensor],
    spk: list[Tensor],
    readout_mem: Tensor,  # [B, n_out]
    embedding: Tensor | None,  # [V, n] for token input
    weights: list[Tensor],  # [in + n, n] per layer ([n, n] after an embedding)
    biases: list[Tensor | None],  # None where an embedding drives
    alphas: list[Tensor],  # [n]
    betas: list[Tensor],
    thresholds: list[float],
    fan_outs: list[float],
    readout_beta: Tensor,  # [n_out]
    readout_t: Tensor,  # [n, n_out]
    readout_bias: Tensor,
    thermometer: tuple[float, Tensor] | None = None,  # (input_scale, levels [L]) or None
    substeps: int = 1,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], Tensor, Tensor]:
    """The whole step: (logits, new syn, mem, spk, spikes [B], synaptic ops [B])."""
    spikes = torch.zeros_like(readout_mem[:, 0])  # [B]
    synaptic_ops = torch.zeros_like(spikes)
    if thermometer is not None:  # input spikes [B, F * L], as `ThermometerEncoder.encode`
        input_scale, levels = thermometer
        x_t = ((x_t * input_scale)[..., None] > levels).to(readout_mem.dtype).flatten(-2)
        synaptic_ops = x_t.sum(-1) * weights[0].shape[1]  # one accumulate per spike and neuron
    for _ in range(substeps):
        inputs = x_t  # then the spikes each layer sends forward
        for i in range(len(weights)):
            bias = biases[i]
            if bias is None:  # tokens: the embedding row plus the recurrence
                assert embedding is not None
                drive = torch.addmm(F.embedding(inputs, embedding), spk[i], weights[i])  # [B, n]
            else:
                drive = torch.addmm(bias, torch.cat([inputs, spk[i]], dim=1), weights[i])
            syn_i = torch.addcmul(drive, alphas[i], syn[i])  # [B, n]
            mem_i = torch.addcmul(syn_i, betas[i], mem[i]).sub_(spk[i], alpha=thresholds[i])
            spk_i = (mem_i > thresholds[i]).to(mem_i.dtype)  # [B, n]
            syn, mem, spk = (
                _replaced(syn, i, syn_i),
                _replaced(mem, i, mem_i),
                _replaced(spk, i, spk_i),
            )
            layer_spikes = spk_i.sum(-1)  # [B]
            spikes = spikes + layer_spikes
            synaptic_ops = synaptic_ops + layer_spikes * fan_outs[i]
            inputs = spk_i
        readout_mem = torch.addmm(readout_bias, inputs, readout_t).addcmul_(
            readout_beta, readout_mem
        )
    return readout_mem, syn, mem, spk, spikes, synaptic_ops


def _replaced(values: list[Tensor], i: int, value: Tensor) -> list[Tensor]:
    """`values` with entry i replaced (a new list: the caller's state lists stay as given)."""
    return [value if j == i else v for j, v in enumerate(values)]


def _derive(model: StatefulModel) -> tuple:
    """The arguments of `model_step` after the states."""
    config = model.config
    if config.input_encoding == "thermometer":  # layer 0 is driven by the input spikes
        proj = model.encoder.proj
        enc_weight, enc_bias = transposed(proj.weight), proj.bias  # [F * L, n], [n]
        thermometer = (float(model.encoder.input_scale), model.encoder.levels)
    else:
        enc_weight, enc_bias = encoder_weights(model.encoder)  # [F, n] or the [V, n] table
        thermometer = None
    weights, biases, alphas, betas, thresholds = [], [], [], [], []
    for i, layer in enumerate(model.layers):
        recurrent_t = transposed(layer.recurrent.weight)  # [n, n]
        if i == 0 and enc_bias is None:
            weights.append(recurrent_t)
            biases.append(None)
        elif i == 0:
            weights.append(torch.cat([enc_weight, recurrent_t]))  # [F + n, n]
            biases.append(enc_bias)
        else:
            feedforward = model.feedforward[i - 1]
            weights.append(torch.cat([transposed(feedforward.weight), recurrent_t]))  # [2n, n]
            biases.append(feedforward.bias)
        alphas.append(torch.sigmoid(layer.alpha_logit))
        betas.append(torch.sigmoid(layer.beta_logit))
        thresholds.append(float(layer.threshold))
    readout = model.readout
    return (
        enc_weight if enc_bias is None else None,
        weights,
        biases,
        alphas,
        betas,
        thresholds,
        [float(model._fan_out(i)) for i in range(len(model.layers))],
        torch.sigmoid(readout.beta_logit),
        transposed(readout.proj.weight),
        readout.proj.bias,
        thermometer,
        int(config.substeps),
    )


# The SNNConfig fields beyond the common ones that this fused step was written for.
KNOWN_CONFIG = frozenset(
    {
        "threshold",
        "alpha_init",
        "beta_init",
        "readout_beta_init",
        "learn_decays",
        "surrogate",
        "surrogate_slope",
        "dropout",
        "input_encoding",
        "input_levels",
        "substeps",
    }
)


def fused_weights(config) -> DerivedWeights | None:
    """The cache an `SNNModel` keeps for `fused_snn_step`; None for a config with a field this fused
    step does not know (the model then always takes its reference step)."""
    return weights_if_known(config, KNOWN_CONFIG, _derive)


def fused_snn_step(
    model: StatefulModel, x_t: Tensor, state: State, step=model_step
) -> tuple[Tensor, State, dict[str, Tensor]]:
    """The reference step's (logits [B, n_out], new state, activity), on checked inputs."""
    L = len(model.layers)
    parts = [[state[f"layers.{i}.{part}"] for i in range(L)] for part in ("syn", "mem", "spk")]
    logits, syn, mem, spk, spikes, synaptic_ops = step(
        x_t, *parts, state["readout.mem"], *model._fused_weights.get(model)
    )
    new_state: State = {}
    for i in range(L):
        new_state[f"layers.{i}.syn"], new_state[f"layers.{i}.mem"] = syn[i], mem[i]
        new_state[f"layers.{i}.spk"] = spk[i]
    new_state["readout.mem"] = logits
    neurons = torch.full_like(spikes, model.config.d_model * L * model.config.substeps)
    return logits, new_state, {"spikes": spikes, "neurons": neurons, "synaptic_ops": synaptic_ops}
