"""Validate a stateful ONNX step graph (see `models.onnx_step` for the naming convention) and
publish it as a model version.

Checks, each failing with `OnnxImportError` that names the tensor: the file loads and passes
`onnx.checker`; the inputs are `x` and `state.*` only; every `state.<name>` has a
`next_state.<name>` output of the same shape and dtype (float32) and vice versa; `logits` is
[batch, C]; activity counters, if any, include "spikes" and "neurons"; and test steps at
batch 1 and 3 run and give the declared shapes. Nothing is written before all of this passes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto

from models.architectures import config_to_dict
from models.imported import class_labels, imported_config
from models.onnx_step import (
    ACTIVITY_PREFIX,
    INPUT_NAME,
    LOGITS_NAME,
    STATE_IN_PREFIX,
    STATE_OUT_PREFIX,
    OnnxStepConfig,
    OnnxStepModel,
)
from models.repository import ModelCard, ModelRepository, check_model_name

CONVENTION = (
    "inputs 'x' [batch, F] and 'state.<name>'; outputs 'logits' [batch, C], "
    "'next_state.<name>' for every 'state.<name>', optionally 'activity.<counter>' [batch]"
)


class OnnxImportError(ValueError):
    """An ONNX file that does not follow the stateful step convention; names the tensor."""


def _shape_and_type(value: onnx.ValueInfoProto) -> tuple[list[Any], int]:
    tensor = value.type.tensor_type
    dims = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim
    ]
    return dims, tensor.elem_type


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


def read_onnx(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise OnnxImportError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:  # protobuf and the checker raise many types
        raise OnnxImportError(f"{path}: not a valid ONNX model ({error})") from error
    return model


def step_config(graph_model: onnx.ModelProto, size: int) -> OnnxStepConfig:
    """The model config the graph's interface declares (checked against the convention)."""
    graph = graph_model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = {v.name: _shape_and_type(v) for v in graph.input if v.name not in initializers}
    outputs = {v.name: _shape_and_type(v) for v in graph.output}
    if INPUT_NAME not in inputs:
        raise OnnxImportError(f"the graph has no input {INPUT_NAME!r}; expected {CONVENTION}")
    unknown = sorted(n for n in inputs if n != INPUT_NAME and not n.startswith(STATE_IN_PREFIX))
    if unknown:
        raise OnnxImportError(f"unexpected graph inputs {unknown}; expected {CONVENTION}")
    x_dims, x_type = inputs[INPUT_NAME]
    if len(x_dims) != 2 or not isinstance(x_dims[1], int) or x_dims[1] < 1:
        raise OnnxImportError(f"input 'x' must be [batch, F] with a fixed F, got {x_dims}")
    if x_type != TensorProto.FLOAT:
        raise OnnxImportError(f"input 'x' must be float32, got {_type_name(x_type)}")
    if LOGITS_NAME not in outputs:
        raise OnnxImportError(f"the graph has no output {LOGITS_NAME!r}; expected {CONVENTION}")
    state_in = {n.removeprefix(STATE_IN_PREFIX): v for n, v in inputs.items() if n != INPUT_NAME}
    state_out = {
        n.removeprefix(STATE_OUT_PREFIX): v
        for n, v in outputs.items()
        if n.startswith(STATE_OUT_PREFIX)
    }
    if not state_in:
        raise OnnxImportError(f"the graph has no 'state.<name>' inputs; expected {CONVENTION}")
    unpaired_in = sorted(set(state_in) - set(state_out))
    unpaired_out = sorted(set(state_out) - set(state_in))
    if unpaired_in or unpaired_out:
        raise OnnxImportError(
            "state inputs and outputs must pair up: "
            f"{[STATE_IN_PREFIX + n for n in unpaired_in]} have no next_state output, "
            f"{[STATE_OUT_PREFIX + n for n in unpaired_out]} have no state input"
        )
    state: dict[str, list[int]] = {}
    for name, (dims, elem_type) in state_in.items():
        out_dims, out_type = state_out[name]
        if elem_type != TensorProto.FLOAT or out_type != TensorProto.FLOAT:
            raise OnnxImportError(
                f"state {name!r}: state.{name} is {_type_name(elem_type)} and next_state.{name} "
                f"is {_type_name(out_type)}; both must be float32"
            )
        fixed = dims[1:]
        if not dims or any(not isinstance(d, int) or d < 1 for d in fixed):
            raise OnnxImportError(
                f"state {name!r}: state.{name} must be [batch, ...] with fixed sizes, got {dims}"
            )
        if out_dims[1:] != fixed and all(isinstance(d, int) for d in out_dims[1:]):
            raise OnnxImportError(
                f"state {name!r}: state.{name} is {dims} but next_state.{name} is {out_dims}"
            )
        state[name] = fixed
    activity = sorted(
        n.removeprefix(ACTIVITY_PREFIX) for n in outputs if n.startswith(ACTIVITY_PREFIX)
    )
    if activity and not {"spikes", "neurons"} <= set(activity):
        raise OnnxImportError(
            f"activity outputs {activity} must include 'spikes' and 'neurons' (per-sample counts)"
        )
    logits_dims, _ = outputs[LOGITS_NAME]
    d_output = logits_dims[1] if len(logits_dims) == 2 and isinstance(logits_dims[1], int) else 0
    weights = sum(math.prod(init.dims) for init in graph.initializer if len(init.dims) == 2)
    return OnnxStepConfig(
        d_input=x_dims[1],
        d_output=max(d_output, 1),
        d_model=sum(math.prod(shape) for shape in state.values()),
        state=state,
        activity=activity,
        graph_bytes=size,
        dense_macs=int(weights),
        opset=max(
            (op.version for op in graph_model.opset_import if op.domain in ("", "ai.onnx")),
            default=0,
        ),
    )


def _test_steps(model: OnnxStepModel) -> int:
    """Run steps at batch 1 and 3 (a fixed batch axis fails here) and return C."""
    n_out = None
    for batch in (1, 3):
        x = torch.rand(batch, model.config.d_input, generator=torch.Generator().manual_seed(0))
        try:
            logits, state, activity = model._cell(x, model.init_state(batch))
        except Exception as error:  # onnxruntime raises its own error types
            raise OnnxImportError(f"a test step at batch {batch} failed ({error})") from error
        if logits.dim() != 2 or logits.shape[0] != batch:
            raise OnnxImportError(
                f"logits must be [batch, C]; a step at batch {batch} gave {list(logits.shape)}"
            )
        for name, shape in model.config.state.items():
            if list(state[name].shape) != [batch, *shape]:
                raise OnnxImportError(
                    f"state {name!r}: next_state.{name} came out {list(state[name].shape)}, "
                    f"state.{name} is {[batch, *shape]}"
                )
        for name, counter in activity.items():
            if list(counter.shape) != [batch]:
                raise OnnxImportError(f"activity.{name} must be [batch], got {list(counter.shape)}")
        if not torch.isfinite(logits).all():
            raise OnnxImportError(f"a test step at batch {batch} gave non-finite logits")
        n_out = logits.shape[1]
    return int(n_out)


def build_onnx_model(path: Path) -> OnnxStepModel:
    """The validated step model of the ONNX file at `path` (raises OnnxImportError)."""
    data = path.read_bytes() if path.is_file() else b""
    graph_model = read_onnx(path)
    config = step_config(graph_model, len(data))
    model = OnnxStepModel(config)
    model.load_state_dict({"graph": torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())})
    n_out = _test_steps(model)
    if n_out != config.d_output:
        config.d_output = n_out  # a symbolic class axis, sized by the test step
    return model.eval()


def import_onnx(
    repository: ModelRepository,
    path: Path,
    name: str,
    *,
    labels: list[str] | None = None,
    command: str = "",
) -> ModelCard:
    """Validate and publish `path` as the next version of `name`; nothing is written unless
    every check passes."""
    check_model_name(name)
    model = build_onnx_model(path)
    config = imported_config(
        source_format="onnx",
        path=path,
        architecture="onnx-step",
        model_config=config_to_dict(model.config),
        labels=class_labels(labels, model.config.d_output),
        d_input=model.config.d_input,
        command=command,
        details={"opset": model.config.opset, "state": model.config.state},
    )
    return repository.publish(name, config, model.state_dict())
