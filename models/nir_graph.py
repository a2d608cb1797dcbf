"""A NIR graph as a stateful model: `init_state / step / forward` over an imported graph.

The graph lives in the config as JSON (`NIRGraphConfig.graph`): its nodes in evaluation order,
each with its kind, input and output shapes and static attributes, and its edges; the node
tensors (weights, time constants, thresholds) are the model's parameters and buffers, named
`nodes.<index>.…`. `models.nir_import` builds both from a `.nir` file.

One step evaluates the nodes in order. A node's input is the sum of the values on its incoming
edges. A *delayed* edge closes a cycle (a recurrent connection, e.g. snnTorch's RLeaky exports
`lif → w_rec → lif`): its destination reads the value its source produced on the previous
step, kept in the state as `<source>.out`. So the state is every neuron's membrane (and
synaptic current), every delayed edge's last value, and, with the "sum" readout, the running
sum of the output.

The logits of a step are the Output node's value flattened ("value"), or its sum over the
steps so far ("sum": spike counts, the rate-coded decision snnTorch users take).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from models.base import State, StepLoopModel, check_common_config
from models.nir_nodes import SPIKING_KINDS, build_node, node_macs, synapses_per_input

READOUTS = ("value", "sum")


@dataclass
class NIRGraphConfig:
    d_input: int = 1
    vocab_size: int = 0
    input_kind: str = "features"
    d_output: int = 1
    d_model: int = 1  # neurons in the graph (informative)
    n_layers: int = 1  # neuron nodes in the graph (informative)
    input_scale: float = 1.0  # raw features are multiplied by this before the Input node
    dt: float = 1e-4  # seconds per step of the forward-Euler discretisation
    readout: str = "value"
    # {"nodes": [{"name", "type", "in_shape", "out_shape", ...}], "edges": [[src, dst]],
    #  "delayed": [[src, dst]]}; nodes in evaluation order, Input first.
    graph: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_common_config(self)
        if self.input_kind != "features":
            raise ValueError("a NIR graph takes float features")
        if not (math.isfinite(self.dt) and self.dt > 0):
            raise ValueError(f"dt must be a positive number of seconds, got {self.dt}")
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        nodes = self.graph.get("nodes")
        if not isinstance(nodes, list) or not nodes:
            raise ValueError("graph.nodes must be a non-empty list")
        for key in ("edges", "delayed"):
            if not isinstance(self.graph.get(key), list):
                raise ValueError(f"graph.{key} must be a list of [source, destination] pairs")


class NIRGraphModel(StepLoopModel):
    """The nodes of a NIR graph stepped in order, with delayed edges for recurrence."""

    def __init__(self, config: NIRGraphConfig) -> None:
        super().__init__()
        self.config = config
        self.input_kind = "features"
        specs = config.graph["nodes"]
        self.names = [spec["name"] for spec in specs]
        self.nodes = nn.ModuleList(build_node(spec, config.dt) for spec in specs)
        index = {name: i for i, name in enumerate(self.names)}
        delayed = {tuple(edge) for edge in config.graph["delayed"]}
        # For each node: the indices whose current value it sums, and whose delayed value.
        self.sources: list[list[int]] = [[] for _ in specs]
        self.delayed_sources: list[list[int]] = [[] for _ in specs]
        for src, dst in config.graph["edges"]:
            target = self.delayed_sources if (src, dst) in delayed else self.sources
            target[index[dst]].append(index[src])
        self.delayed_nodes = sorted({i for srcs in self.delayed_sources for i in srcs})
        self.output_index = next(i for i, s in enumerate(specs) if s["type"] == "Output")
        self.spiking = [i for i, node in enumerate(self.nodes) if node.kind in SPIKING_KINDS]
        self.n_spiking = sum(math.prod(self.nodes[i].out_shape) for i in self.spiking)
        self._fan_out = {i: self._synapses_driven_by(i) for i in self.spiking}

    # ---- state ----------------------------------------------------------------------------
    def _state_shapes(self) -> dict[str, list[int]]:
        shapes: dict[str, list[int]] = {}
        for name, node in zip(self.names, self.nodes, strict=True):
            for part in node.state_parts():
                shapes[f"{name}.{part}"] = node.out_shape
        for i in self.delayed_nodes:
            shapes[f"{self.names[i]}.out"] = self.nodes[i].out_shape
        if self.config.readout == "sum":
            shapes["readout.sum"] = [self.config.d_output]
        return shapes

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> State:
        return {
            name: torch.zeros(batch, *shape, device=device, dtype=dtype)
            for name, shape in self._state_shapes().items()
        }

    # ---- one step -------------------------------------------------------------------------
    def _cell(self, x_t: Tensor, state: State) -> tuple[Tensor, State, dict[str, Tensor]]:
        """activity (graphs with spiking nodes): "spikes", "neurons", "synaptic_ops", each [B]."""
        batch = x_t.shape[0]
        values: list[Tensor | None] = [None] * len(self.nodes)
        new_state: State = {}
        for i, (name, node) in enumerate(zip(self.names, self.nodes, strict=True)):
            if node.kind == "Input":
                current = (x_t * self.config.input_scale).reshape(batch, *node.out_shape)
            else:
                parts = [values[j] for j in self.sources[i]]
                parts += [state[f"{self.names[j]}.out"] for j in self.delayed_sources[i]]
                current = parts[0]
                for part in parts[1:]:
                    current = current + part  # [B, *in_shape]
            node_state = {part: state[f"{name}.{part}"] for part in node.state_parts()}
            values[i], updates = node(current, node_state)
            new_state.update({f"{name}.{part}": value for part, value in updates.items()})
        for i in self.delayed_nodes:
            new_state[f"{self.names[i]}.out"] = values[i]
        logits = values[self.output_index].reshape(batch, -1)  # [B, C]
        if self.config.readout == "sum":
            logits = state["readout.sum"] + logits
            new_state["readout.sum"] = logits
        return logits, new_state, self._activity(values, batch, x_t)

    def _activity(self, values: list, batch: int, x_t: Tensor) -> dict[str, Tensor]:
        if not self.spiking:
            return {}
        spikes = x_t.new_zeros(batch)  # [B]
        synaptic_ops = x_t.new_zeros(batch)  # [B]
        for i in self.spiking:
            count = values[i].reshape(batch, -1).sum(-1)  # [B]
            spikes = spikes + count
            synaptic_ops = synaptic_ops + count * self._fan_out[i]
        neurons = torch.full_like(spikes, self.n_spiking)
        return {"spikes": spikes, "neurons": neurons, "synaptic_ops": synaptic_ops}

    def _synapses_driven_by(self, index: int) -> int:
        """Synapses one spike of node `index` drives: the fan-out of every node it feeds."""
        total = 0
        for j in range(len(self.nodes)):
            feeds = self.sources[j].count(index) + self.delayed_sources[j].count(index)
            total += feeds * synapses_per_input(self.nodes[j])
        return total

    def macs_per_step(self) -> dict[str, int]:
        """dense_macs: nodes fed by anything but spikes (the input layer, decays);
        synaptic_ops_max: the accumulates if every spiking neuron fired."""
        spiking = set(self.spiking)
        dense = 0
        for i, node in enumerate(self.nodes):
            inputs = self.sources[i] + self.delayed_sources[i]
            spike_driven = bool(inputs) and all(j in spiking for j in inputs)
            if not spike_driven or node.kind not in ("Affine", "Linear", "Conv1d", "Conv2d"):
                dense += node_macs(node)
        synaptic_max = sum(
            math.prod(self.nodes[i].out_shape) * self._fan_out[i] for i in self.spiking
        )
        counts = {"dense_macs": dense}
        if self.spiking:
            counts["synaptic_ops_max"] = synaptic_max
        return counts
