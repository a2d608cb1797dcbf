"""Read a NIR file (`nir.read`) into a `NIRGraphModel` and publish it as a model version.

Steps: inline nested graphs (snnTorch writes RLeaky/RSynaptic as subgraphs on some paths),
check every node kind, find the edges that close cycles (delayed by one step, see
`models.nir_graph`), order the nodes, infer every node's shapes from the Input node, and
broadcast scalar neuron parameters to their population (exporters write either). Anything the
model could not step exactly raises `NIRImportError` naming the node, before anything is
written to the repository.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import nir
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.architectures import config_to_dict
from models.imported import class_labels, imported_config
from models.nir_graph import NIRGraphConfig, NIRGraphModel
from models.nir_nodes import NEURON_KINDS, NODE_TENSORS, SUPPORTED_KINDS
from models.repository import ModelCard, ModelRepository, check_model_name

# NIR class name -> our node kind.
_KIND_OF = {
    "Input": "Input",
    "Output": "Output",
    "Affine": "Affine",
    "Linear": "Linear",
    "Scale": "Scale",
    "Threshold": "Threshold",
    "Flatten": "Flatten",
    "Conv1d": "Conv1d",
    "Conv2d": "Conv2d",
    "LIF": "LIF",
    "CubaLIF": "CubaLIF",
    "LI": "LI",
    "IF": "IF",
    "I": "Integrator",
}
STATEFUL_KINDS = NEURON_KINDS


class NIRImportError(ValueError):
    """A NIR file or graph this server cannot step exactly; the message names the node."""


# ---- reading and flattening -----------------------------------------------------------------


def read_nir(path: Path) -> nir.NIRGraph:
    if not path.is_file():
        raise NIRImportError(f"{path}: no such file")
    try:
        graph = nir.read(str(path), type_check=False)  # our own checks name the node
    except Exception as error:  # h5py and nir raise many types for a damaged file
        raise NIRImportError(f"{path}: not a readable NIR file ({error})") from error
    if not isinstance(graph, nir.NIRGraph):
        raise NIRImportError(f"{path}: holds a single {type(graph).__name__} node, not a graph")
    return graph


def flatten_graph(graph: nir.NIRGraph, prefix: str = "") -> tuple[dict, list]:
    """(name -> node, edges) with nested graphs inlined as `<subgraph>.<node>`; a subgraph's
    Input and Output become pass-through nodes that its outer edges connect to."""
    nodes: dict[str, Any] = {}
    edges: list[tuple[str, str]] = []
    entry: dict[str, str] = {}  # subgraph name -> its input node, for edges into it
    exit_: dict[str, str] = {}  # subgraph name -> its output node, for edges out of it
    for name, node in graph.nodes.items():
        full = f"{prefix}{name}"
        if isinstance(node, nir.NIRGraph):
            inner_nodes, inner_edges = flatten_graph(node, f"{full}.")
            inputs = [n for n, v in node.nodes.items() if isinstance(v, nir.Input)]
            outputs = [n for n, v in node.nodes.items() if isinstance(v, nir.Output)]
            if len(inputs) != 1 or len(outputs) != 1:
                raise NIRImportError(
                    f"subgraph {full!r}: needs exactly one Input and one Output node, "
                    f"found {len(inputs)} and {len(outputs)}"
                )
            for inner_name in (f"{full}.{inputs[0]}", f"{full}.{outputs[0]}"):
                inner_nodes[inner_name] = "Identity"
            entry[name], exit_[name] = f"{full}.{inputs[0]}", f"{full}.{outputs[0]}"
            nodes.update(inner_nodes)
            edges.extend(inner_edges)
        else:
            nodes[full] = node
    for src, dst in graph.edges:
        src = exit_.get(src, src)
        dst = entry.get(dst, dst)
        for end in (src, dst):
            if f"{prefix}{end}" not in nodes:
                raise NIRImportError(f"edge ({src!r}, {dst!r}) names an unknown node {end!r}")
        edges.append((f"{prefix}{src}", f"{prefix}{dst}"))
    return nodes, edges


def _kind(name: str, node: Any) -> str:
    if node == "Identity":
        return "Identity"
    kind = _KIND_OF.get(type(node).__name__)
    if kind is None:
        raise NIRImportError(
            f"node {name!r}: unsupported NIR node type {type(node).__name__}; supported: "
            f"{', '.join(sorted(_KIND_OF))} (and nested graphs)"
        )
    return kind


# ---- order, cycles and shapes ---------------------------------------------------------------


def order_graph(
    kinds: dict[str, str], edges: list[tuple[str, str]]
) -> tuple[list[str], set[tuple[str, str]]]:
    """(evaluation order, delayed edges). Each cycle is cut on the edge that leaves its last
    neuron (on the path from the Input node), so the loop reads that neuron's output of the
    previous step, zero before the first: snnTorch's RLeaky `lif → w_rec → lif` becomes
    `w_rec(spikes of the last step)`, bias included from the first step, as snnTorch runs it.
    The rest is ordered topologically."""
    inputs = [n for n, k in kinds.items() if k == "Input"]
    outputs = [n for n, k in kinds.items() if k == "Output"]
    if len(inputs) != 1 or len(outputs) != 1:
        raise NIRImportError(
            f"the graph needs exactly one Input and one Output node, found inputs {inputs} "
            f"and outputs {outputs}"
        )
    successors: dict[str, list[str]] = {n: [] for n in kinds}
    for src, dst in edges:
        successors[src].append(dst)
    delayed: set[tuple[str, str]] = set()
    for _ in range(len(edges) + 1):
        cycle = _find_cycle(inputs[0], successors, delayed)
        if cycle is None:
            break
        neurons = [i for i, node in enumerate(cycle) if kinds[node] in STATEFUL_KINDS]
        if not neurons:
            raise NIRImportError(
                f"nodes {cycle} form a cycle without a neuron: a loop of stateless maps is an "
                "equation no step can solve; a recurrent loop must pass through a neuron node "
                "(LIF, CubaLIF, LI, IF, I)"
            )
        last = neurons[-1]
        delayed.add((cycle[last], cycle[(last + 1) % len(cycle)]))
    reached = _reachable(inputs[0], successors)
    unreachable = sorted(set(kinds) - reached)
    if unreachable:
        raise NIRImportError(f"nodes {unreachable} cannot be reached from the Input node")
    indegree = dict.fromkeys(kinds, 0)
    for src, dst in edges:
        if (src, dst) not in delayed:
            indegree[dst] += 1
    # Nodes fed only by delayed edges (a recurrent weight) start from the last step's values.
    ready = [inputs[0]] + [n for n in kinds if indegree[n] == 0 and n != inputs[0]]
    order: list[str] = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for dst in successors[node]:
            if (node, dst) not in delayed:
                indegree[dst] -= 1
                if indegree[dst] == 0:
                    ready.append(dst)
    return order, delayed


def _find_cycle(start: str, successors: dict, delayed: set) -> list[str] | None:
    """The nodes of one cycle reachable from `start` (in path order), ignoring delayed
    edges; None when there is none."""
    on_path: dict[str, int] = {start: 0}
    path, done = [start], set()
    stack = [iter(successors[start])]
    while stack:
        child = next(stack[-1], None)
        node = path[-1]
        if child is None:
            stack.pop()
            done.add(path.pop())
            on_path.pop(node)
        elif (node, child) in delayed or child in done:
            continue
        elif child in on_path:
            return path[on_path[child] :]
        else:
            on_path[child] = len(path)
            path.append(child)
            stack.append(iter(successors[child]))
    return None


def _reachable(start: str, successors: dict) -> set[str]:
    seen, frontier = {start}, [start]
    while frontier:
        for child in successors[frontier.pop()]:
            if child not in seen:
                seen.add(child)
                frontier.append(child)
    return seen


def _array(name: str, node: Any, attribute: str) -> np.ndarray:
    value = getattr(node, attribute, None)
    if value is None:
        raise NIRImportError(f"node {name!r}: {type(node).__name__} lacks {attribute!r}")
    array = np.asarray(value, dtype=np.float64)
    if not np.isfinite(array).all():
        raise NIRImportError(f"node {name!r}: {attribute} has non-finite values")
    return array


def _tuple(value: Any, dims: int) -> list[int]:
    array = np.atleast_1d(np.asarray(value)).astype(int).tolist()
    return array * dims if len(array) == 1 else array


def _node_spec(name: str, kind: str, node: Any, in_shape: list[int]) -> tuple[dict, dict]:
    """(JSON spec with shapes and static attributes, tensors by NODE_TENSORS name)."""
    spec: dict[str, Any] = {"name": name, "type": kind, "in_shape": in_shape}
    tensors: dict[str, np.ndarray] = {}
    if kind in ("Affine", "Linear"):
        weight = _array(name, node, "weight")
        if weight.ndim != 2 or in_shape != [weight.shape[1]]:
            raise NIRImportError(
                f"node {name!r}: {kind} weight {list(weight.shape)} does not take input of "
                f"shape {in_shape} (expected [out, {math.prod(in_shape)}] on a flat input)"
            )
        spec["weight_shape"] = list(weight.shape)
        spec["out_shape"] = [weight.shape[0]]
        tensors["weight"] = weight
        if kind == "Affine":
            tensors["bias"] = np.broadcast_to(_array(name, node, "bias"), (weight.shape[0],))
    elif kind in ("Conv1d", "Conv2d"):
        dims = 1 if kind == "Conv1d" else 2
        weight = _array(name, node, "weight")
        padding = node.padding if isinstance(node.padding, str) else _tuple(node.padding, dims)
        spec.update(
            weight_shape=list(weight.shape),
            stride=_tuple(node.stride, dims),
            padding=padding,
            dilation=_tuple(node.dilation, dims),
            groups=int(node.groups),
        )
        bias = getattr(node, "bias", None)
        tensors["weight"] = weight
        tensors["bias"] = (
            np.zeros(weight.shape[0])
            if bias is None
            else np.broadcast_to(_array(name, node, "bias"), (weight.shape[0],))
        )
        conv = F.conv1d if dims == 1 else F.conv2d
        try:
            out = conv(
                torch.zeros(1, *in_shape),
                torch.zeros(*weight.shape),
                stride=spec["stride"],
                padding=padding,
                dilation=spec["dilation"],
                groups=spec["groups"],
            )
        except RuntimeError as error:
            raise NIRImportError(
                f"node {name!r}: {kind} cannot take input of shape {in_shape} ({error})"
            ) from error
        spec["out_shape"] = list(out.shape[1:])
    elif kind == "Flatten":
        start, end = int(node.start_dim), int(node.end_dim)
        flat = torch.zeros(1, *in_shape).flatten(
            start + 1 if start >= 0 else start, end + 1 if end >= 0 else end
        )
        spec["out_shape"] = list(flat.shape[1:])
    else:
        spec["out_shape"] = in_shape
        for attribute in NODE_TENSORS[kind]:
            if attribute == "v_reset" and getattr(node, "v_reset", None) is None:
                tensors[attribute] = np.zeros(in_shape)  # NIR's default reset potential
                continue
            value = _array(name, node, attribute)
            try:
                tensors[attribute] = np.broadcast_to(value, in_shape)
            except ValueError as error:
                raise NIRImportError(
                    f"node {name!r}: {attribute} of shape {list(value.shape)} does not fit the "
                    f"population of shape {in_shape}"
                ) from error
    for attribute in ("tau", "tau_mem", "tau_syn"):
        if attribute in tensors and not (tensors[attribute] > 0).all():
            raise NIRImportError(f"node {name!r}: {attribute} must be > 0 seconds")
    return spec, tensors


def _input_shape(name: str, node: Any) -> list[int]:
    types = getattr(node, "input_type", None) or {}
    shapes = [np.atleast_1d(np.asarray(v)).astype(int).tolist() for v in types.values()]
    if len(shapes) != 1 or not shapes[0] or min(shapes[0]) < 1:
        raise NIRImportError(f"Input node {name!r}: needs one input shape, got {types}")
    return shapes[0]


def _own_input_shape(name: str, kind: str, node: Any) -> list[int]:
    """The input shape of a node fed only by delayed edges, from its own weight."""
    if kind in ("Affine", "Linear"):
        return [int(np.shape(node.weight)[1])]
    raise NIRImportError(
        f"node {name!r}: a {kind} fed only by a recurrent edge; its input shape cannot be "
        "inferred (put an Affine or Linear weight on the recurrent edge)"
    )


def graph_spec(graph: nir.NIRGraph) -> tuple[dict, dict[str, Tensor]]:
    """(the JSON graph of `NIRGraphConfig.graph`, tensors keyed `<node>/<name>`)."""
    nodes, edges = flatten_graph(graph)
    kinds = {name: _kind(name, node) for name, node in nodes.items()}
    order, delayed = order_graph(kinds, edges)
    specs: dict[str, dict] = {}
    tensors: dict[str, Tensor] = {}
    for name in order:
        kind = kinds[name]
        if kind == "Input":
            in_shape = _input_shape(name, nodes[name])
        else:
            shapes = [
                specs[src]["out_shape"]
                for src, dst in edges
                if dst == name and (src, dst) not in delayed
            ]
            if any(shape != shapes[0] for shape in shapes):
                raise NIRImportError(f"node {name!r}: its inputs have different shapes {shapes}")
            in_shape = shapes[0] if shapes else _own_input_shape(name, kind, nodes[name])
        spec, arrays = _node_spec(name, kind, nodes[name], in_shape)
        specs[name] = spec
        for attribute, array in arrays.items():
            tensors[f"{name}/{attribute}"] = torch.tensor(np.array(array), dtype=torch.float32)
    for src, dst in delayed:
        if specs[src]["out_shape"] != specs[dst]["in_shape"]:
            raise NIRImportError(
                f"recurrent edge ({src!r}, {dst!r}): {src!r} gives {specs[src]['out_shape']} "
                f"but {dst!r} takes {specs[dst]['in_shape']}"
            )
    spec = {
        "nodes": [specs[name] for name in order],
        "edges": [list(edge) for edge in edges],
        "delayed": sorted(list(edge) for edge in delayed),
    }
    return spec, tensors


# ---- building and publishing ------------------------------------------------------------------


def build_nir_model(
    graph: nir.NIRGraph, dt: float, readout: str = "value", input_scale: float = 1.0
) -> NIRGraphModel:
    """The steppable model of `graph`, its tensors loaded, in eval mode."""
    spec, tensors = graph_spec(graph)
    nodes = spec["nodes"]
    d_input = math.prod(nodes[0]["out_shape"])
    d_output = math.prod(next(n for n in nodes if n["type"] == "Output")["out_shape"])
    neurons = [n for n in nodes if n["type"] in NEURON_KINDS]
    config = NIRGraphConfig(
        d_input=d_input,
        d_output=d_output,
        d_model=max(sum(math.prod(n["out_shape"]) for n in neurons), 1),
        n_layers=max(len(neurons), 1),
        input_scale=input_scale,
        dt=dt,
        readout=readout,
        graph=spec,
    )
    model = NIRGraphModel(config)
    index = {name: i for i, name in enumerate(model.names)}
    state_dict = {}
    for key, value in tensors.items():
        node_name, attribute = key.rsplit("/", 1)
        node = model.nodes[index[node_name]]
        holder = {"Affine": "linear.", "Linear": "linear.", "Conv1d": "conv.", "Conv2d": "conv."}
        state_dict[f"nodes.{index[node_name]}.{holder.get(node.kind, '')}{attribute}"] = value
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def import_nir(
    repository: ModelRepository,
    path: Path,
    name: str,
    *,
    dt: float = 1e-4,
    readout: str = "value",
    input_scale: float = 1.0,
    labels: list[str] | None = None,
    command: str = "",
) -> ModelCard:
    """Read, check and publish `path` as the next version of `name`. Nothing is written
    unless the whole graph imports and one step runs."""
    check_model_name(name)
    if readout not in ("value", "sum"):
        raise NIRImportError(f"readout must be 'value' or 'sum', got {readout!r}")
    graph = read_nir(path)
    try:
        model = build_nir_model(graph, dt, readout, input_scale)
    except NIRImportError:
        raise  # already names the node
    except (ValueError, RuntimeError, KeyError, TypeError) as error:  # e.g. a bad conv setting
        raise NIRImportError(f"{path}: cannot build a steppable model ({error})") from error
    with torch.no_grad():  # a test step: the graph must run before it is published
        model.step(torch.zeros(2, model.config.d_input), model.init_state(2))
    config = imported_config(
        source_format="nir",
        path=path,
        architecture="nir",
        model_config=config_to_dict(model.config),
        labels=class_labels(labels, model.config.d_output),
        d_input=model.config.d_input,
        command=command,
        details={"dt": dt, "readout": readout, "nir_version": nir.version},
    )
    return repository.publish(name, config, model.state_dict())


__all__ = ["NIRImportError", "SUPPORTED_KINDS", "build_nir_model", "import_nir", "read_nir"]
