"""Export a stateful model's `step` to ONNX, with the recurrent state as named graph inputs
and outputs, and cache the export per model version.

Graph interface (batch is a dynamic axis on every tensor):
    inputs   x                     [B, F] float32 features, or [B] int64 tokens
             state.<name>          one per state tensor, as `model.init_state` names them
    outputs  logits                [B, C]
             next_state.<name>     the state after this step, same names and shapes
             activity.<counter>    per-sample counters of this step (spiking models only)

Complex states (LRU) are already real/imaginary pairs, so the graph is plain float32.

We use the TorchScript-based exporter (`dynamo=False`): the torch.export-based one needs the
`onnxscript` package. It lacks two operators our architectures use, `expm1` and `rms_norm`;
their ONNX translations are registered below (opset 17); `expm1` keeps its precision for small
arguments (no exp(x) - 1 cancellation).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import torch
from torch import Tensor, nn
from torch.onnx import symbolic_helper

from models.files import staging_directory

# The graph interface is one convention for exported and imported step graphs alike.
from models.onnx_step import (
    ACTIVITY_PREFIX,
    INPUT_NAME,
    LOGITS_NAME,
    STATE_IN_PREFIX,
    STATE_OUT_PREFIX,
    OnnxStepModel,
)

if TYPE_CHECKING:
    from models.base import StatefulModel

OPSET = 17
CACHE_DIR_ENV = "NEUROSERVE_ONNX_CACHE_DIR"
GRAPH_FILE = "step.onnx"
SPEC_FILE = "spec.json"
# Part of every export's hash: bump it when a translation below changes what a graph holds
# (2: exact expm1), so a cached graph from an older exporter is never reused.
EXPORTER_REVISION = 2


# ---- translations for operators the TorchScript exporter lacks --------------------------------


def _expm1(g: Any, x: Any) -> Any:
    # ONNX has no Expm1, and exp(x) - 1 cancels for small |x| (the LRU's sqrt(-expm1(-2·decay))
    # for slow decays). Exactly: expm1(x) = 2·tanh(x/2) / (1 - tanh(x/2)), with no
    # cancellation for |x| < 1; exp(x) - 1 elsewhere, where it has none either.
    def constant(value: float) -> Any:
        return g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32))

    half_tanh = g.op("Tanh", g.op("Mul", x, constant(0.5)))
    small = g.op(
        "Div", g.op("Mul", half_tanh, constant(2.0)), g.op("Sub", constant(1.0), half_tanh)
    )
    large = g.op("Sub", g.op("Exp", x), constant(1.0))
    return g.op("Where", g.op("Less", g.op("Abs", x), constant(1.0)), small, large)


def _rms_norm(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
    # x / sqrt(mean(x², over the normalised dims) + eps) * weight, as torch.nn.RMSNorm.
    dims = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
    axes = list(range(-len(dims), 0))
    eps_value = (
        torch.finfo(torch.float32).eps
        if symbolic_helper._is_none(eps)
        else symbolic_helper._get_const(eps, "f", "eps")
    )
    mean_square = g.op("ReduceMean", g.op("Mul", x, x), axes_i=axes, keepdims_i=1)
    eps_tensor = g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32))
    normalised = g.op("Div", x, g.op("Sqrt", g.op("Add", mean_square, eps_tensor)))
    if symbolic_helper._is_none(weight):
        return normalised
    return g.op("Mul", normalised, weight)


_registered = False
_register_lock = threading.Lock()


def _register_missing_operators() -> None:
    global _registered
    with _register_lock:
        if not _registered:
            torch.onnx.register_custom_op_symbolic("aten::expm1", _expm1, OPSET)
            torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, OPSET)
            _registered = True


# ---- the exported graph -------------------------------------------------------------------------


@dataclass(frozen=True)
class OnnxStepSpec:
    """How to call an exported step graph; stored as spec.json beside step.onnx."""

    input_kind: str  # "features" or "tokens"
    d_input: int | None  # F for features
    state_names: list[str]
    state_shapes: dict[str, list[int]]  # without the batch dim
    activity_names: list[str]
    opset: int
    weights_hash: str

    def input_names(self) -> list[str]:
        return [INPUT_NAME, *(STATE_IN_PREFIX + n for n in self.state_names)]

    def output_names(self) -> list[str]:
        return [
            LOGITS_NAME,
            *(STATE_OUT_PREFIX + n for n in self.state_names),
            *(ACTIVITY_PREFIX + n for n in self.activity_names),
        ]


class _FlatStep(nn.Module):
    """`model.step_with_activity` over positional tensors, as the exporter needs them."""

    def __init__(self, model: StatefulModel, state_names: list[str], activity_names: list[str]):
        super().__init__()
        self.model = model
        self.state_names = state_names
        self.activity_names = activity_names

    def forward(self, x_t: Tensor, *state_tensors: Tensor) -> tuple[Tensor, ...]:
        state = dict(zip(self.state_names, state_tensors, strict=True))
        logits, new_state, activity = self.model.step_with_activity(x_t, state)  # [B, C]
        next_state = [new_state[name] for name in self.state_names]
        counters = [activity[name].to(torch.float32) for name in self.activity_names]  # [B]
        return (logits, *next_state, *counters)


def weights_hash(model: StatefulModel) -> str:
    """sha256 over the architecture, its config, every parameter and buffer, and the exporter.

    It names one export: any change to the weights or to what the graph would contain gives a
    new hash, so a stale file is never reused.
    """
    digest = hashlib.sha256()
    config = model.config
    config_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else vars(config)
    header = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": config_dict,
        "torch": torch.__version__,
        "opset": OPSET,
        "exporter": EXPORTER_REVISION,
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_onnx(model: StatefulModel, path: str | os.PathLike) -> OnnxStepSpec:
    """Export `model.step` to the ONNX file `path` (checked with onnx.checker) and return how
    to call it. The model is exported in eval mode on CPU; the caller's model is not changed.
    An imported ONNX step model already is such a graph: its own bytes are written."""
    path = Path(path)
    if isinstance(model, OnnxStepModel):
        return _write_imported_graph(model, path)
    _register_missing_operators()
    cpu_model = model if _on_cpu(model) else _cpu_copy(model)
    batch = 2  # not 1, so the tracer cannot fold the batch dimension into a broadcast
    example_state = cpu_model.init_state(batch)
    x = cpu_model.example_step_input(batch)
    was_training = cpu_model.training
    cpu_model.eval()
    try:
        with torch.no_grad():
            _, _, activity = cpu_model.step_with_activity(x, example_state)
        state_names = list(example_state)
        spec = OnnxStepSpec(
            input_kind=cpu_model.input_kind,
            d_input=None if cpu_model.input_kind == "tokens" else int(cpu_model.config.d_input),
            state_names=state_names,
            state_shapes={n: list(t.shape[1:]) for n, t in example_state.items()},
            activity_names=sorted(activity),
            opset=OPSET,
            weights_hash=weights_hash(cpu_model),
        )
        flat = _FlatStep(cpu_model, state_names, spec.activity_names)
        dynamic_axes = {name: {0: "batch"} for name in spec.input_names() + spec.output_names()}
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter warns that it is deprecated and that the shape checks in
            # `step` are traced as constants; both are expected here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                flat,
                (x, *example_state.values()),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=spec.input_names(),
                output_names=spec.output_names(),
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    finally:
        cpu_model.train(was_training)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return spec


def _write_imported_graph(model: OnnxStepModel, path: Path) -> OnnxStepSpec:
    """An imported graph follows this module's interface (checked at import): write it as is."""
    path.write_bytes(model.graph_bytes())
    config = model.config
    return OnnxStepSpec(
        input_kind="features",
        d_input=int(config.d_input),
        state_names=list(config.state),
        state_shapes={name: list(shape) for name, shape in config.state.items()},
        activity_names=sorted(config.activity),
        opset=int(config.opset),
        weights_hash=weights_hash(model),
    )


def _on_cpu(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


def _cpu_copy(model: StatefulModel) -> StatefulModel:
    return copy.deepcopy(model).cpu()


# ---- the export cache ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedStep:
    path: Path  # the .onnx file
    spec: OnnxStepSpec


def default_cache_dir() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neuroserve" / "onnx"


def _key_dir(cache_dir: Path, model_key: str, digest: str) -> Path:
    safe_key = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_key)
    return cache_dir / safe_key / digest[:24]


class ExportCache:
    """Exports kept on disk (<cache_dir>/<model_key>/<weights hash>/) and, bounded, in memory.

    A new version or new weights hash to a new directory, so nothing is ever overwritten; a
    directory is published by an atomic rename once its graph has passed the checker.
    """

    def __init__(self, max_in_memory: int = 64) -> None:
        self.max_in_memory = max_in_memory
        self.exports_done = 0
        self._memory: OrderedDict[tuple[str, str, str], ExportedStep] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, model: StatefulModel, model_key: str, cache_dir: str | os.PathLike | None = None
    ) -> ExportedStep:
        if not model_key:
            raise ValueError("model_key must be a non-empty string")
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        digest = weights_hash(model)
        memory_key = (str(root), model_key, digest)
        with self._lock:
            if memory_key in self._memory:
                self._memory.move_to_end(memory_key)
                return self._memory[memory_key]
            exported = self._load_from_disk(_key_dir(root, model_key, digest), digest)
            if exported is None:
                exported = self._export_to_disk(model, _key_dir(root, model_key, digest))
            self._memory[memory_key] = exported
            while len(self._memory) > self.max_in_memory:
                self._memory.popitem(last=False)
            return exported

    @staticmethod
    def _load_from_disk(directory: Path, digest: str) -> ExportedStep | None:
        graph, spec_file = directory / GRAPH_FILE, directory / SPEC_FILE
        if not (graph.is_file() and spec_file.is_file()):
            return None
        spec = OnnxStepSpec(**json.loads(spec_file.read_text()))
        if spec.weights_hash != digest:  # a truncated-hash collision; never reuse it
            return None
        return ExportedStep(path=graph, spec=spec)

    def _export_to_disk(self, model: StatefulModel, directory: Path) -> ExportedStep:
        # Readable by all (the cache is shared by replicas); renamed into place whole.
        with staging_directory(directory.parent, ".export-") as staging:
            spec = export_onnx(model, staging / GRAPH_FILE)
            (staging / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(spec), indent=2))
            try:
                staging.rename(directory)
            except OSError:
                if not (directory / SPEC_FILE).is_file():  # not another process's export
                    raise
        self.exports_done += 1
        return ExportedStep(path=directory / GRAPH_FILE, spec=spec)


export_cache = ExportCache()
