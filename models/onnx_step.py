"""A stateful model given as an ONNX step graph, run by onnxruntime.

The graph follows the interface `neuroserve export-onnx` writes (batch is the dynamic first
axis of every tensor):

    inputs   x                     [B, F] float32 features
             state.<name>          one per state tensor, float32
    outputs  logits                [B, C] float32
             next_state.<name>     the state after this step, same shape and dtype as state.<name>
             activity.<counter>    optional per-sample counters [B] (spikes, neurons, synaptic_ops)

The graph's bytes are the model's one buffer (`graph`, uint8), so they live in
`weights.safetensors` under the repository's sha256 check like any weights; the config holds
the state names and shapes. `models.onnx_import` validates a file against this convention.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import onnxruntime
import torch
from torch import Tensor

from models.base import State, StepLoopModel, check_common_config

INPUT_NAME = "x"
LOGITS_NAME = "logits"
STATE_IN_PREFIX = "state."
STATE_OUT_PREFIX = "next_state."
ACTIVITY_PREFIX = "activity."


@dataclass
class OnnxStepConfig:
    d_input: int = 1
    vocab_size: int = 0
    input_kind: str = "features"
    d_output: int = 1
    d_model: int = 1  # state elements per sample (informative)
    n_layers: int = 1
    input_scale: float = 1.0  # fixed: the graph takes the features as given
    state: dict = field(default_factory=dict)  # name -> shape without the batch dim
    activity: list = field(default_factory=list)  # activity counter names, may be empty
    graph_bytes: int = 1  # size of the ONNX file
    dense_macs: int = 0  # weights in the graph's matrices: MACs of one sample's step
    opset: int = 0

    def __post_init__(self) -> None:
        check_common_config(self)
        if self.input_kind != "features" or self.input_scale != 1.0:
            raise ValueError("an ONNX step graph takes float features as given (input_scale 1)")
        if not self.state:
            raise ValueError("an ONNX step model needs at least one state tensor")
        if self.graph_bytes < 1:
            raise ValueError(f"graph_bytes must be >= 1, got {self.graph_bytes}")


class OnnxStepModel(StepLoopModel):
    """`step` is one onnxruntime call; `forward` loops it over time."""

    def __init__(self, config: OnnxStepConfig) -> None:
        super().__init__()
        self.config = config
        self.input_kind = "features"
        self.register_buffer("graph", torch.zeros(config.graph_bytes, dtype=torch.uint8))
        self.state_names = list(config.state)
        self._session: onnxruntime.InferenceSession | None = None
        self._session_lock = threading.Lock()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._session = None  # new graph bytes: a new session on the next step

    def __getstate__(self) -> dict:
        # Copies (backends deep-copy a model to run it their way) build their own session.
        state = dict(super().__getstate__())
        state["_session"], state["_session_lock"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._session_lock = threading.Lock()

    def graph_bytes(self) -> bytes:
        return self.graph.cpu().numpy().tobytes()

    def session(self) -> onnxruntime.InferenceSession:
        with self._session_lock:
            if self._session is None:
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = 1  # many sessions step in parallel
                self._session = onnxruntime.InferenceSession(
                    self.graph_bytes(), sess_options=options, providers=["CPUExecutionProvider"]
                )
            return self._session

    def output_names(self) -> list[str]:
        return [
            LOGITS_NAME,
            *(STATE_OUT_PREFIX + name for name in self.state_names),
            *(ACTIVITY_PREFIX + name for name in self.config.activity),
        ]

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> State:
        return {
            name: torch.zeros(batch, *shape, device=device, dtype=dtype)
            for name, shape in self.config.state.items()
        }

    def _cell(self, x_t: Tensor, state: State) -> tuple[Tensor, State, dict[str, Tensor]]:
        feeds = {INPUT_NAME: x_t.detach().cpu().to(torch.float32).contiguous().numpy()}
        for name in self.state_names:
            feeds[STATE_IN_PREFIX + name] = (
                state[name].detach().cpu().to(torch.float32).contiguous().numpy()
            )
        outputs = self.session().run(self.output_names(), feeds)
        home = x_t.device
        logits = torch.from_numpy(np.asarray(outputs[0])).to(home)  # [B, C]
        n = len(self.state_names)
        new_state = {
            name: torch.from_numpy(np.asarray(value)).to(home)
            for name, value in zip(self.state_names, outputs[1 : 1 + n], strict=True)
        }
        activity = {
            name: torch.from_numpy(np.asarray(value, dtype=np.float32)).to(home)
            for name, value in zip(self.config.activity, outputs[1 + n :], strict=True)
        }  # [B] each
        return logits, new_state, activity

    def macs_per_step(self) -> dict[str, int]:
        """dense_macs: the weights of the graph's matrices, counted at import (one MAC each)."""
        counts = {"dense_macs": int(self.config.dense_macs)}
        if "spikes" in self.config.activity:
            counts["synaptic_ops_max"] = 0
        return counts
