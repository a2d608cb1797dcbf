"""ONNX Runtime backend: the model's exported `step` graph run by onnxruntime on the CPU.

The export is cached per model version (see `onnx_export.ExportCache`). Thread counts come
from the options, else from NEUROSERVE_ORT_INTRA_OP_THREADS / NEUROSERVE_ORT_INTER_OP_THREADS,
else onnxruntime's defaults (0). A sequence runs as a loop over the step graph, with the state
kept as numpy arrays between steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydantic
import torch
from torch import Tensor

from hardware_backends.base import (
    BackendOptions,
    State,
    Usage,
    check_batch,
    parse_options,
    run_by_steps,
)
from hardware_backends.energy import DIGITAL_FP32, EnergyModel, usage_of_steps
from hardware_backends.onnx_export import (
    ACTIVITY_PREFIX,
    INPUT_NAME,
    STATE_IN_PREFIX,
    ExportCache,
    ExportedStep,
    export_cache,
)

if TYPE_CHECKING:
    import onnxruntime

    from models.base import StatefulModel

INTRA_OP_THREADS_ENV = "NEUROSERVE_ORT_INTRA_OP_THREADS"
INTER_OP_THREADS_ENV = "NEUROSERVE_ORT_INTER_OP_THREADS"
MAX_THREADS = max(os.cpu_count() or 1, 1)


def _threads_from_env(variable: str) -> int:
    raw = os.environ.get(variable, "0")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{variable} must be an integer, got {raw!r}") from None


class OnnxRuntimeOptions(BackendOptions):
    # 0 lets onnxruntime choose; more threads than cores only slows a shared server down.
    intra_op_threads: int = pydantic.Field(
        default_factory=lambda: _threads_from_env(INTRA_OP_THREADS_ENV), ge=0, le=MAX_THREADS
    )
    inter_op_threads: int = pydantic.Field(
        default_factory=lambda: _threads_from_env(INTER_OP_THREADS_ENV), ge=0, le=MAX_THREADS
    )


def make_session(
    path: Path, intra_op_threads: int, inter_op_threads: int
) -> onnxruntime.InferenceSession:
    import onnxruntime  # lazy: the module loads, and reports why, without onnxruntime

    session_options = onnxruntime.SessionOptions()
    session_options.intra_op_num_threads = intra_op_threads
    session_options.inter_op_num_threads = inter_op_threads
    session_options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(
        str(path), sess_options=session_options, providers=["CPUExecutionProvider"]
    )


class OnnxRuntimeRunner:
    backend = "onnxruntime"
    samples = 1

    def __init__(
        self,
        model: StatefulModel,
        exported: ExportedStep,
        session: onnxruntime.InferenceSession,
        energy: EnergyModel = DIGITAL_FP32,
    ) -> None:
        self.model = model  # for its input checks, state layout and operation counts
        self.exported = exported
        self.session = session
        self.energy = energy
        self.op_counts = model.macs_per_step()
        spec = exported.spec
        self._state_names = spec.state_names
        self._output_names = spec.output_names()
        self._input_dtype = np.int64 if spec.input_kind == "tokens" else np.float32

    def init_state(self, batch: int) -> State:
        check_batch(batch)
        return self.model.init_state(batch)

    def _run_graph(
        self, x_t: np.ndarray, state: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Tensor]]:
        feeds = {INPUT_NAME: x_t}
        feeds |= {STATE_IN_PREFIX + name: state[name] for name in self._state_names}
        outputs = self.session.run(self._output_names, feeds)
        n_state = len(self._state_names)
        new_state = dict(zip(self._state_names, outputs[1 : 1 + n_state], strict=True))
        activity_names = self._output_names[1 + n_state :]
        activity = {
            name.removeprefix(ACTIVITY_PREFIX): torch.from_numpy(value)
            for name, value in zip(activity_names, outputs[1 + n_state :], strict=True)
        }  # [B] each
        return outputs[0], new_state, activity  # logits [B, C]

    def _state_to_numpy(self, state: State, batch: int) -> dict[str, np.ndarray]:
        self.model.check_state(state, batch)
        return {
            name: state[name].detach().to("cpu", torch.float32).contiguous().numpy()
            for name in self._state_names
        }

    def step(self, x_t: Tensor, state: State) -> tuple[Tensor, State, Usage]:
        self.model.check_step_input(x_t)
        batch = x_t.shape[0]
        x_np = x_t.detach().cpu().numpy().astype(self._input_dtype, copy=False)
        logits, new_state, activity = self._run_graph(x_np, self._state_to_numpy(state, batch))
        usage = usage_of_steps(self.op_counts, batch, 1, activity, self.energy)
        home = x_t.device
        next_state = {name: torch.from_numpy(v).to(home) for name, v in new_state.items()}
        return torch.from_numpy(logits).to(home), next_state, usage

    def run(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Usage]:
        """The step graph in a loop, converting to and from torch only at the ends."""
        self.model.check_sequence_input(x)
        batch, steps = x.shape[0], x.shape[1]
        if state is None:
            state = self.init_state(batch)
        x_np = x.detach().cpu().numpy().astype(self._input_dtype, copy=False)
        state_np = self._state_to_numpy(state, batch)
        outputs, usage = [], Usage()
        for t in range(steps):
            logits, state_np, activity = self._run_graph(np.ascontiguousarray(x_np[:, t]), state_np)
            outputs.append(logits)  # [B, C]
            usage = usage + usage_of_steps(self.op_counts, batch, 1, activity, self.energy)
        home = x.device
        logits_all = torch.from_numpy(np.stack(outputs, axis=1)).to(home)  # [B, T, C]
        return logits_all, {n: torch.from_numpy(v).to(home) for n, v in state_np.items()}, usage

    def run_by_steps(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Usage]:
        """The reference path: `run` as repeated `step`."""
        self.model.check_sequence_input(x)
        return run_by_steps(self.step, self.init_state, x, state)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self, cache_dir: str | os.PathLike | None = None, exports: ExportCache | None = None
    ) -> None:
        self.cache_dir = cache_dir  # None: $NEUROSERVE_ONNX_CACHE_DIR or ~/.cache/neuroserve/onnx
        self.exports = exports if exports is not None else export_cache

    def availability(self) -> str | None:
        try:
            import onnxruntime  # lazy: availability() reports it missing
        except ImportError as error:
            return f"onnxruntime is not installed ({error})"
        if "CPUExecutionProvider" not in onnxruntime.get_available_providers():
            return "onnxruntime has no CPUExecutionProvider"
        return None

    def prepare(
        self, model: StatefulModel, *, model_key: str, options: dict | None = None
    ) -> OnnxRuntimeRunner:
        parsed = parse_options(self.name, OnnxRuntimeOptions, options)
        exported = self.exports.get(model, model_key, self.cache_dir)
        session = make_session(exported.path, parsed.intra_op_threads, parsed.inter_op_threads)
        return OnnxRuntimeRunner(model, exported, session)
