"""The fused step of the recurrent LIF network: `SNNModel.step` in fewer ops.

Each LIF layer's drive is a feed-forward current plus the recurrence over last step's spikes,
two matmuls in the reference. Both are linear, so one matmul over the concatenated inputs
gives their sum:

    drive_i = [W_i, V_i] [in_i; s_{i,t−1}] + b_i

where in_0 is the raw input (input_scale folded into W_0) and in_i the spikes layer i − 1 just
sent. The decays σ(α), σ(β), σ(β_out) are precomputed and the weights stored transposed
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
from models.fused import DerivedWeights, encoder_weights, knows_config, transposed


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
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], Tensor, Tensor]:
    """The whole step: (logits, new syn, mem, spk, spikes [B], synaptic ops [B])."""
    new_syn: list[Tensor] = []
    new_mem: list[Tensor] = []
    new_spk: list[Tensor] = []
    spikes = torch.zeros_like(readout_mem[:, 0])  # [B]
    synaptic_ops = torch.zeros_like(spikes)
    inputs = x_t  # then the spikes each layer sends forward
    for i in range(len(weights)):
        bias = biases[i]
        if bias is None:  # tokens: the embedding row plus the recurrence
            assert embedding is not None
            drive = torch.addmm(F.embedding(inputs, embedding), spk[i], weights[i])  # [B, n]
        else:
            drive = torch.addmm(bias, torch.cat([inputs, spk[i]], dim=1), weights[i])  # [B, n]
        syn_i = torch.addcmul(drive, alphas[i], syn[i])  # [B, n]
        mem_i = torch.addcmul(syn_i, betas[i], mem[i]).sub_(spk[i], alpha=thresholds[i])
        spk_i = (mem_i > thresholds[i]).to(mem_i.dtype)  # [B, n]
        new_syn.append(syn_i)
        new_mem.append(mem_i)
        new_spk.append(spk_i)
        layer_spikes = spk_i.sum(-1)  # [B]
        spikes = spikes + layer_spikes
        synaptic_ops = synaptic_ops + layer_spikes * fan_outs[i]
        inputs = spk_i
    logits = torch.addmm(readout_bias, inputs, readout_t).addcmul_(readout_beta, readout_mem)
    return logits, new_syn, new_mem, new_spk, spikes, synaptic_ops


def _derive(model: StatefulModel) -> tuple:
    """The arguments of `model_step` after the states."""
    enc_weight, enc_bias = encoder_weights(model.encoder)  # [F, n] or the [V, n] table
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
    )


# The SNNConfig fields this fused step was written for (`knows_config`).
KNOWN_CONFIG = frozenset(
    {
        "d_input",
        "vocab_size",
        "input_kind",
        "d_output",
        "d_model",
        "n_layers",
        "input_scale",
        "threshold",
        "alpha_init",
        "beta_init",
        "readout_beta_init",
        "learn_decays",
        "surrogate",
        "surrogate_slope",
        "dropout",
    }
)


def fused_weights(config) -> DerivedWeights | None:
    """The cache an `SNNModel` keeps for `fused_snn_step`; None for a config with a field this fused
    step does not know (the model then always takes its reference step)."""
    return DerivedWeights(_derive) if knows_config(config, KNOWN_CONFIG) else None


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
    neurons = torch.full_like(spikes, model.config.d_model * L)
    return logits, new_state, {"spikes": spikes, "neurons": neurons, "synaptic_ops": synaptic_ops}
