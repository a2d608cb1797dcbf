"""Recurrent spiking network of current-based leaky integrate-and-fire (LIF) neurons.

Neuron model (current-based LIF, e.g. Gerstner et al., "Neuronal Dynamics", 2014, ch. 1;
the discrete form follows snnTorch's `Synaptic` neuron): per hidden layer and step t,

    syn_t = α ⊙ syn_{t-1} + W x_t + V s_{t-1}         synaptic current (V: recurrence)
    mem_t = β ⊙ mem_{t-1} + syn_t − θ s_{t-1}         membrane, subtractive reset by θ
    s_t   = H(mem_t − θ)                              spike (Heaviside)

with learnable per-neuron decays α, β ∈ (0, 1). The Heaviside step has no useful
gradient, so training uses a surrogate (Neftci, Mostafa, Zenke, "Surrogate Gradient
Learning in Spiking Neural Networks", IEEE SPM 2019): the backward pass replaces H' with
the derivative of a fast sigmoid (Zenke & Ganguli, SuperSpike, 2018) or of an arctan
(Fang et al., 2021). The reset term is detached from the graph, which makes surrogate
training more robust (Zenke & Vogels, Neural Computation 2021).

With analog inputs ("analog", the default) the first layer's W x is a dense projection of
the (scaled) raw input, one MAC per weight and step. With "thermometer" inputs each feature
is first turned into binary input spikes (level j fires when the scaled value exceeds
j − ½), so W is spike-driven as well. Deeper layers and the recurrence are driven by binary
spikes only. Every spike-driven projection costs one accumulate per spike and synapse; the
model reports those counts per step ("synaptic_ops"), so the event-driven estimate charges
MACs only for what is dense (analog input projection, decays). With `substeps` K > 1 the
neurons update K times per input step on the same input current, and the readout
integrates all K. The readout is a non-spiking leaky integrator whose membrane is the
logits: out_t = β_out ⊙ out_{t-1} + W_out s_t + b. In training, dropout acts on the spikes
sent forward (to the next layer and the readout), never on the recurrence.

Spiking is nonlinear in the state, so `forward` necessarily loops over time; it calls the
very same cell as `step`, which keeps the two identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.base import InputEncoder, State, StatefulModel, check_common_config
from models.fused import fused_step_applies
from models.snn_fused import fused_snn_step, fused_weights

SURROGATES = ("fast_sigmoid", "arctan")
INPUT_ENCODINGS = ("analog", "thermometer")


@dataclass
class SNNConfig:
    # Defaults are the digits classifier (8 rows of 8 pixels valued 0..16, 10 classes).
    d_input: int = 8
    vocab_size: int = 0
    input_kind: str = "features"
    d_output: int = 10
    d_model: int = 256  # LIF neurons per hidden layer
    n_layers: int = 1
    # Pixels 0..16 -> 0..4: a strong initial drive keeps ~20% of neuron-steps spiking; at
    # 1/16 the layer starts nearly silent and generalises several points worse on digits.
    input_scale: float = 0.25
    threshold: float = 1.0
    # Fast neuron decays make spikes follow the current row (memory lives in the recurrence);
    # the readout integrates almost losslessly over the whole sequence.
    alpha_init: float = 0.2  # synaptic-current decay
    beta_init: float = 0.5  # membrane decay
    readout_beta_init: float = 0.98
    learn_decays: bool = True
    surrogate: str = "fast_sigmoid"
    surrogate_slope: float = 3.0  # a wide surrogate; 10+ trained markedly worse here
    # Training-time dropout on the spikes sent forward (next layer, readout), not on the
    # recurrence: one recurrent layer overfits 1000 digits, and this is the regulariser
    # that travels with the model whatever the training loop.
    dropout: float = 0.5
    # How features reach layer 0. "analog": a dense projection of the scaled values (MACs).
    # "thermometer": each scaled feature becomes `input_levels` binary input spikes, level j
    # firing when input_scale * x > j - 1/2, so layer 0 is spike-driven too (accumulates).
    input_encoding: str = "analog"
    input_levels: int = 4
    # LIF updates per input step: the row's current is held while the neurons integrate it
    # this many times (more time to spike for a cheap accumulate-only recurrence).
    substeps: int = 1

    def __post_init__(self) -> None:
        check_common_config(self)
        if not self.threshold > 0.0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        for name in ("alpha_init", "beta_init", "readout_beta_init"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)}")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {self.surrogate!r}")
        if not self.surrogate_slope > 0.0:
            raise ValueError(f"surrogate_slope must be > 0, got {self.surrogate_slope}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.input_encoding not in INPUT_ENCODINGS:
            raise ValueError(
                f"input_encoding must be one of {INPUT_ENCODINGS}, got {self.input_encoding!r}"
            )
        if self.input_encoding == "thermometer" and self.input_kind != "features":
            raise ValueError("input_encoding 'thermometer' needs input_kind 'features'")
        if self.input_levels < 1:
            raise ValueError(f"input_levels must be >= 1, got {self.input_levels}")
        if self.substeps < 1:
            raise ValueError(f"substeps must be >= 1, got {self.substeps}")


# ---- the spike nonlinearity ---------------------------------------------------------------


class SurrogateSpike(torch.autograd.Function):
    """Heaviside H(v) forward; a smooth pseudo-derivative backward."""

    @staticmethod
    def forward(ctx, v: Tensor, slope: float, arctan: bool) -> Tensor:
        ctx.save_for_backward(v)
        ctx.slope, ctx.arctan = slope, arctan
        return (v > 0).to(v.dtype)

    @staticmethod
    def backward(ctx, grad_spike: Tensor):
        (v,) = ctx.saved_tensors
        k = ctx.slope
        if ctx.arctan:  # d/dv [atan(π/2 k v)/π + 1/2]
            surrogate = (k / 2) / (1 + (math.pi / 2 * k * v) ** 2)
        else:  # d/dv of the fast sigmoid k v / (1 + k |v|), scaled to peak 1
            surrogate = 1.0 / (1 + k * v.abs()) ** 2
        return grad_spike * surrogate, None, None


def spike(v: Tensor, slope: float, arctan: bool) -> Tensor:
    """1.0 where v > 0, else 0.0; differentiable through the surrogate when grad is on."""
    if not torch.is_grad_enabled():  # plain comparison: no autograd node, exports cleanly
        return (v > 0).to(v.dtype)
    return SurrogateSpike.apply(v, slope, arctan)


def _decay_logit(value: float, n: int) -> Tensor:
    return torch.full((n,), math.log(value / (1 - value)))  # sigmoid⁻¹, [n]


# ---- spike-encoded input --------------------------------------------------------------------


class ThermometerEncoder(nn.Module):
    """Features -> binary input spikes -> current into layer 0.

    Feature i of x [B, F] becomes `levels` spikes, level j (1-based) firing when
    input_scale * x_i > j - 1/2 (a thermometer code of the value rounded to a level), so
    the projection W [n, F * levels] is driven by spikes: one accumulate per input spike and
    neuron. The encoding has no parameters and no gradient to pass (the input has none).
    """

    def __init__(self, cfg: SNNConfig):
        super().__init__()
        self.input_scale = float(cfg.input_scale)
        self.n_channels = cfg.d_input * cfg.input_levels
        levels = torch.arange(1, cfg.input_levels + 1, dtype=torch.float32) - 0.5  # [L]
        self.register_buffer("levels", levels)
        self.proj = nn.Linear(self.n_channels, cfg.d_model)

    def encode(self, x: Tensor) -> Tensor:
        """x [B, F] -> input spikes [B, F * L] (feature-major: feature i owns channels iL..)."""
        scaled = (x * self.input_scale)[..., None]  # [B, F, 1]
        return (scaled > self.levels).to(x.dtype).flatten(-2)  # [B, F * L]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, F] -> (current [B, n], input spikes per sample [B])."""
        spikes = self.encode(x)  # [B, F * L]
        return self.proj(spikes), spikes.sum(-1)


# ---- a recurrent LIF layer ------------------------------------------------------------------


class LIFLayer(nn.Module):
    """n recurrent current-based LIF neurons; the feed-forward current comes from outside."""

    def __init__(self, cfg: SNNConfig):
        super().__init__()
        n = cfg.d_model
        self.threshold = cfg.threshold
        self.slope, self.arctan = cfg.surrogate_slope, cfg.surrogate == "arctan"
        self.recurrent = nn.Linear(n, n, bias=False)  # V, driven by last step's spikes
        alpha, beta = _decay_logit(cfg.alpha_init, n), _decay_logit(cfg.beta_init, n)
        if cfg.learn_decays:
            self.alpha_logit, self.beta_logit = nn.Parameter(alpha), nn.Parameter(beta)
        else:
            self.register_buffer("alpha_logit", alpha)
            self.register_buffer("beta_logit", beta)

    def forward(self, current: Tensor, syn: Tensor, mem: Tensor, spk: Tensor):
        """current, syn, mem, spk: [B, n] -> new (syn, mem, spk)."""
        alpha, beta = torch.sigmoid(self.alpha_logit), torch.sigmoid(self.beta_logit)  # [n]
        syn = alpha * syn + current + self.recurrent(spk)  # [B, n]
        mem = beta * mem + syn - self.threshold * spk.detach()  # [B, n]
        spk = spike(mem - self.threshold, self.slope, self.arctan)  # [B, n]
        return syn, mem, spk


class LeakyReadout(nn.Module):
    """Non-spiking leaky integrator over the last layer's spikes; its membrane is the logits."""

    def __init__(self, cfg: SNNConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.d_model, cfg.d_output)
        beta = _decay_logit(cfg.readout_beta_init, cfg.d_output)
        if cfg.learn_decays:
            self.beta_logit = nn.Parameter(beta)
        else:
            self.register_buffer("beta_logit", beta)

    def forward(self, spk: Tensor, mem: Tensor) -> Tensor:
        return torch.sigmoid(self.beta_logit) * mem + self.proj(spk)  # [B, n_out]


# ---- the network ------------------------------------------------------------------------------


class SNNModel(StatefulModel):
    """Dense input projection -> n_layers recurrent LIF layers (spike-driven between them)
    -> leaky-integrator readout."""

    def __init__(self, config: SNNConfig):
        super().__init__()
        self.config = config
        self.input_kind = config.input_kind
        n, L = config.d_model, config.n_layers
        # current into layer 0: dense (InputEncoder) or driven by input spikes
        if config.input_encoding == "thermometer":
            self.encoder = ThermometerEncoder(config)
        else:
            self.encoder = InputEncoder(config)
        self.feedforward = nn.ModuleList(nn.Linear(n, n) for _ in range(L - 1))  # layer i -> i+1
        self.layers = nn.ModuleList(LIFLayer(config) for _ in range(L))
        self.readout = LeakyReadout(config)
        self.drop = nn.Dropout(config.dropout)  # on forward-going spikes, training only
        self._fused_weights = fused_weights(config)

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> State:
        n = self.config.d_model
        state: State = {}
        for i in range(self.config.n_layers):
            for part in ("syn", "mem", "spk"):
                state[f"layers.{i}.{part}"] = torch.zeros(batch, n, device=device, dtype=dtype)
        state["readout.mem"] = torch.zeros(batch, self.config.d_output, device=device, dtype=dtype)
        return state

    def _cell(self, x_t: Tensor, state: State) -> tuple[Tensor, State, dict[str, Tensor]]:
        """One step without input checks; shared by `step_with_activity` and `forward`.
        The input's current is computed once and held over the step's `substeps` updates."""
        if self.config.input_encoding == "thermometer":
            drive, input_spikes = self.encoder(x_t)  # [B, n], [B]
            synaptic_ops = input_spikes * self.config.d_model  # [B], accumulates into layer 0
        else:
            drive = self.encoder(x_t)  # [B, n], the dense drive of layer 0
            synaptic_ops = drive.new_zeros(drive.shape[0])  # [B]
        spikes = drive.new_zeros(drive.shape[0])  # [B]
        state = dict(state)
        for _ in range(self.config.substeps):
            current = drive
            for i, layer in enumerate(self.layers):
                syn, mem, spk = layer(
                    current,
                    state[f"layers.{i}.syn"],
                    state[f"layers.{i}.mem"],
                    state[f"layers.{i}.spk"],
                )  # [B, n] each
                state[f"layers.{i}.syn"], state[f"layers.{i}.mem"] = syn, mem
                state[f"layers.{i}.spk"] = spk
                layer_spikes = spk.sum(-1)  # [B]
                spikes = spikes + layer_spikes
                synaptic_ops = synaptic_ops + layer_spikes * self._fan_out(i)
                if i + 1 < len(self.layers):
                    current = self.feedforward[i](self.drop(spk))  # [B, n], spike-driven
            state["readout.mem"] = self.readout(self.drop(spk), state["readout.mem"])  # [B, C]
        neurons = torch.full_like(
            spikes, self.config.d_model * self.config.n_layers * self.config.substeps
        )
        activity = {"spikes": spikes, "neurons": neurons, "synaptic_ops": synaptic_ops}
        return state["readout.mem"], state, activity

    def _fan_out(self, layer: int) -> int:
        """Synapses each spike of `layer` drives: its recurrence plus the next layer or readout."""
        n = self.config.d_model
        return n + (n if layer + 1 < self.config.n_layers else self.config.d_output)

    def step_with_activity(
        self, x_t: Tensor, state: State
    ) -> tuple[Tensor, State, dict[str, Tensor]]:
        """activity: "spikes" (hidden spikes this step), "neurons" (hidden neurons) and
        "synaptic_ops" (accumulates those spikes drive), each [B]. The fused step
        (models/snn_fused.py) where it applies, else the reference."""
        if self._fused_weights is None or not fused_step_applies(self):
            return self.step_reference_with_activity(x_t, state)
        self.check_step_input(x_t)
        self.check_state(state, x_t.shape[0])
        return fused_snn_step(self, x_t, state)

    def step_reference_with_activity(
        self, x_t: Tensor, state: State
    ) -> tuple[Tensor, State, dict[str, Tensor]]:
        self.check_step_input(x_t)
        self.check_state(state, x_t.shape[0])
        return self._cell(x_t, state)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """x: [B, T, d_input] floats or [B, T] tokens -> logits [B, T, n_out], final state.
        Loops over time: a spike depends nonlinearly on the state it resets."""
        logits, state, _ = self.forward_with_activity(x, state)
        return logits, state

    def forward_with_activity(
        self, x: Tensor, state: State | None = None
    ) -> tuple[Tensor, State, dict[str, Tensor]]:
        """`forward` plus the activity counters summed over the sequence, each [B]; the spike
        count keeps its surrogate gradient, so training can penalise firing."""
        self.check_sequence_input(x)
        if state is None:
            state = self.init_state(
                x.shape[0], device=x.device, dtype=self.readout.proj.weight.dtype
            )
        self.check_state(state, x.shape[0])
        logits, totals = [], {}
        for x_t in x.unbind(1):
            logits_t, state, activity = self._cell(x_t, state)
            logits.append(logits_t)
            totals = {k: totals.get(k, 0) + v for k, v in activity.items()}  # [B] each
        return torch.stack(logits, dim=1), state, totals  # [B, T, n_out]

    def macs_per_step(self) -> dict[str, int]:
        """dense_macs: the dense input projection (analog inputs) plus every decay multiply
        (two per LIF neuron, one per readout unit, per substep; a neuron's bias adds ride on
        its decay MACs). synaptic_ops_max: accumulates if every input channel (thermometer
        inputs) and every neuron spiked."""
        cfg = self.config
        n, L, K = cfg.d_model, cfg.n_layers, cfg.substeps
        dense = K * (2 * n * L + cfg.d_output)
        spike_driven = K * n * sum(self._fan_out(i) for i in range(L))
        if cfg.input_encoding == "thermometer":
            spike_driven += self.encoder.n_channels * n
        else:
            dense += self.encoder.macs()
        return {"dense_macs": dense, "synaptic_ops_max": spike_driven}
