"""One module per NIR node kind, each stepping one time step with its state kept outside.

A node takes the sum of the values on its incoming edges (`current`, [B, *in_shape]) and
returns its output value ([B, *out_shape]) and its new state. Only neuron nodes have state.

Discretisation (forward Euler with step `dt`, as snnTorch's and Norse's NIR round trips do;
see docs/BRING_YOUR_OWN_MODEL.md). For NIR's continuous-time

    LIF      τ dv/dt = (v_leak − v) + R I,   spike when v > v_th, then v ← v_reset
    CubaLIF  τ_syn dI/dt = −I + w_in x,   τ_mem dv/dt = (v_leak − v) + R I,   same spike/reset
    LI       τ dv/dt = (v_leak − v) + R I     (output v, no spikes)

one step is

    I ← I + dt/τ_syn (−I + w_in x)         (CubaLIF; the membrane reads the *new* current)
    v ← v + dt/τ (v_leak − v + R I)
    s = H(v − v_th);  v ← (1 − s) v + s v_reset      (reset at once, in the same step)

With snnTorch's export (dt = 1e-4, τ = dt/(1 − β), R = τ/dt) this is exactly snnTorch's
`v ← β v + I` with reset to zero; with Norse's (dt = 1e-3, R = 1) it is Norse's LIFBox/LIBox
step. IF and Integrator have no time constant: one step adds R I (Norse's IAF does the same).
Threshold is H(x − θ). A spike is 1.0 where the membrane is strictly above threshold.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

State = dict[str, Tensor]

NEURON_KINDS = ("LIF", "CubaLIF", "LI", "IF", "Integrator")
SPIKING_KINDS = ("LIF", "CubaLIF", "IF", "Threshold")
# The tensors each node kind keeps as parameters (weights) or buffers (neuron constants).
NODE_TENSORS: dict[str, tuple[str, ...]] = {
    "Input": (),
    "Output": (),
    "Identity": (),
    "Flatten": (),
    "Affine": ("weight", "bias"),
    "Linear": ("weight",),
    "Conv1d": ("weight", "bias"),
    "Conv2d": ("weight", "bias"),
    "Scale": ("scale",),
    "Threshold": ("threshold",),
    "LIF": ("tau", "r", "v_leak", "v_threshold", "v_reset"),
    "CubaLIF": ("tau_syn", "tau_mem", "r", "v_leak", "v_threshold", "v_reset", "w_in"),
    "LI": ("tau", "r", "v_leak"),
    "IF": ("r", "v_threshold", "v_reset"),
    "Integrator": ("r",),
}
SUPPORTED_KINDS = tuple(NODE_TENSORS)


class GraphNode(nn.Module):
    """Base: a stateless node whose output is its summed input."""

    kind = "Identity"

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.node_name = spec["name"]
        self.in_shape = list(spec["in_shape"])
        self.out_shape = list(spec["out_shape"])

    def state_parts(self) -> tuple[str, ...]:
        return ()

    def forward(self, current: Tensor, state: State) -> tuple[Tensor, State]:
        return current, {}


class FlattenNode(GraphNode):
    kind = "Flatten"

    def forward(self, current: Tensor, state: State) -> tuple[Tensor, State]:
        return current.reshape(current.shape[0], *self.out_shape), {}  # [B, *out_shape]


class AffineNode(GraphNode):
    """Affine (W x + b) and Linear (W x): an `nn.Linear`, so the analog and stochastic
    backends find its weight."""

    def __init__(self, spec: dict, bias: bool) -> None:
        super().__init__(spec)
        self.kind = "Affine" if bias else "Linear"
        n_out, n_in = spec["weight_shape"]
        self.linear = nn.Linear(n_in, n_out, bias=bias)

    def forward(self, current: Tensor, state: State) -> tuple[Tensor, State]:
        return self.linear(current), {}  # [B, n_out]


class ConvNode(GraphNode):
    def __init__(self, spec: dict, dims: int) -> None:
        super().__init__(spec)
        self.kind = f"Conv{dims}d"
        out_ch, in_per_group, *kernel = spec["weight_shape"]
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        padding = spec["padding"]
        self.conv = conv(
            in_per_group * spec["groups"],
            out_ch,
            kernel_size=tuple(kernel),
            stride=tuple(spec["stride"]),
            padding=padding if isinstance(padding, str) else tuple(padding),
            dilation=tuple(spec["dilation"]),
            groups=spec["groups"],
        )

    def forward(self, current: Tensor, state: State) -> tuple[Tensor, State]:
        return self.conv(current), {}  # [B, C_out, *spatial]


class ScaleNode(GraphNode):
    kind = "Scale"

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        self.register_buffer("scale", torch.zeros(self.in_shape))

    def forward(self, current: Tensor, state: State) -> tuple[Tensor, State]:
        return current * self.scale, {}


class ThresholdNode(GraphNode):
    kind = "Threshold"

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        self.register_buffer("threshold", torch.zeros(self.in_shape))

    def forward(self, current: Tensor, state: State) -> tuple[Tensor, State]:
        return (current > self.threshold).to(current.dtype), {}


class NeuronNode(GraphNode):
    """A neuron population; its constants are buffers broadcast to the population's shape."""

    def __init__(self, spec: dict, kind: str, dt: float) -> None:
        super().__init__(spec)
        self.kind = kind
        self.dt = dt
        for tensor_name in NODE_TENSORS[kind]:
            self.register_buffer(tensor_name, torch.zeros(self.out_shape))

    def state_parts(self) -> tuple[str, ...]:
        return ("v", "i_syn") if self.kind == "CubaLIF" else ("v",)

    def forward(self, current: Tensor, state: State) -> tuple[Tensor, State]:
        v = state["v"]  # [B, *shape]
        new: State = {}
        if self.kind in ("IF", "Integrator"):
            v = v + self.r * current
        else:
            if self.kind == "CubaLIF":
                i_syn = state["i_syn"] + self.dt / self.tau_syn * (
                    self.w_in * current - state["i_syn"]
                )
                new["i_syn"] = i_syn
                drive, tau = i_syn, self.tau_mem
            else:
                drive, tau = current, self.tau
            v = v + self.dt / tau * (self.v_leak - v + self.r * drive)
        if self.kind in ("LI", "Integrator"):
            new["v"] = v
            return v, new
        spikes = (v > self.v_threshold).to(v.dtype)  # [B, *shape]
        new["v"] = (1 - spikes) * v + spikes * self.v_reset
        return spikes, new


def build_node(spec: dict, dt: float) -> GraphNode:
    """The module of one node description (see `models.nir_graph`)."""
    kind = spec["type"]
    if kind in NEURON_KINDS:
        return NeuronNode(spec, kind, dt)
    builders = {
        "Input": GraphNode,
        "Output": GraphNode,
        "Identity": GraphNode,
        "Flatten": FlattenNode,
        "Affine": lambda s: AffineNode(s, bias=True),
        "Linear": lambda s: AffineNode(s, bias=False),
        "Conv1d": lambda s: ConvNode(s, 1),
        "Conv2d": lambda s: ConvNode(s, 2),
        "Scale": ScaleNode,
        "Threshold": ThresholdNode,
    }
    if kind not in builders:
        raise ValueError(f"node {spec['name']!r}: unsupported kind {kind!r}")
    node = builders[kind](spec)
    node.kind = kind
    return node


def node_macs(node: GraphNode) -> int:
    """Per-sample multiply-accumulates of one dense evaluation of `node`."""
    if isinstance(node, AffineNode):
        return node.linear.weight.numel()
    if isinstance(node, ConvNode):
        per_output = node.conv.weight[0].numel()  # C_in/groups × kernel
        return per_output * math.prod(node.out_shape)
    if isinstance(node, NeuronNode):
        return 2 * math.prod(node.out_shape)  # a decay and an input scaling per neuron
    if isinstance(node, ScaleNode):
        return math.prod(node.out_shape)
    return 0


def synapses_per_input(node: GraphNode) -> int:
    """How many synapses one input element of `node` drives (its fan-out into it)."""
    if isinstance(node, AffineNode):
        return node.linear.out_features
    if isinstance(node, ConvNode):
        weight = node.conv.weight  # [C_out, C_in/groups, *k]
        return int(weight.numel() // max(weight.shape[1] * node.conv.groups, 1))
    return 1
