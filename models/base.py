"""The stateful-model contract shared by every architecture.

A stateful model runs one time step at a time with a constant-size recurrent state that
lives outside the module (so a server can keep it per session, in Redis, and hand it to
any replica). `State` maps names to tensors whose leading dimension is the batch.

Subclasses implement `init_state`, `step_with_activity`, `forward` and `macs_per_step`;
`forward` must agree with repeated `step`. An architecture whose `step_with_activity` takes a
fused path (models/fused.py) keeps its plain step as `step_reference_with_activity`, and the
two must agree. This module also holds the two pieces every
architecture shares: common config validation and the input encoder (a scaled linear
projection for float features, an embedding for tokens).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

State = dict[str, Tensor]

INPUT_KINDS = ("features", "tokens")


def check_common_config(cfg: Any) -> None:
    """Validate the fields every architecture config shares; raise ValueError on bad values."""
    if cfg.input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {cfg.input_kind!r}")
    if cfg.input_kind == "features" and cfg.d_input < 1:
        raise ValueError(f"input_kind 'features' needs d_input >= 1, got {cfg.d_input}")
    if cfg.input_kind == "tokens" and cfg.vocab_size < 1:
        raise ValueError(f"input_kind 'tokens' needs vocab_size >= 1, got {cfg.vocab_size}")
    for name in ("d_output", "d_model", "n_layers"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not math.isfinite(cfg.input_scale) or cfg.input_scale == 0.0:
        raise ValueError(f"input_scale must be finite and non-zero, got {cfg.input_scale}")


class InputEncoder(nn.Module):
    """Raw input -> d_model vectors: `Linear(x * input_scale)` for features, an embedding for
    tokens. Works on one step ([B, F] or [B]) and on sequences ([B, T, F] or [B, T])."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.input_kind = cfg.input_kind
        self.input_scale = float(cfg.input_scale)
        if cfg.input_kind == "tokens":
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        else:
            self.proj = nn.Linear(cfg.d_input, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_kind == "tokens":
            return self.embed(x)  # [..., D]
        return self.proj(x * self.input_scale)  # [..., D]

    def macs(self) -> int:
        """Per-sample MACs of one step (an embedding lookup does no arithmetic)."""
        if self.input_kind == "tokens":
            return 0
        return self.proj.in_features * self.proj.out_features


class StatefulModel(nn.Module, ABC):
    """Abstract base of every architecture: explicit state, one `step` at a time, and a
    whole-sequence `forward` that must agree with repeated `step`."""

    config: Any
    input_kind: str

    # ---- to implement -------------------------------------------------------------------
    @abstractmethod
    def init_state(
        self, batch: int, device: torch.device | str | None = None, dtype=torch.float32
    ) -> State:
        """The zero state for `batch` sequences."""

    @abstractmethod
    def step_with_activity(
        self, x_t: Tensor, state: State
    ) -> tuple[Tensor, State, dict[str, Tensor]]:
        """One step: (logits [B, n_out], new state, per-sample activity counters of this step).
        Never mutates `state`."""

    @abstractmethod
    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """A whole sequence: (logits [B, T, n_out], final state)."""

    @abstractmethod
    def macs_per_step(self) -> dict[str, int]:
        """Static per-sample operation counts of one step, e.g. {"dense_macs": ...}."""

    # ---- shared -------------------------------------------------------------------------
    def pop_auxiliary_loss(self) -> Tensor | None:
        """A loss term the last training-mode `forward` asks training to add to the task loss
        (e.g. routed experts' load balance), handed over once; None when there is none."""
        return None

    def step(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        """One step: (logits [B, n_out], new state). Never mutates `state`."""
        logits, new_state, _ = self.step_with_activity(x_t, state)
        return logits, new_state

    def step_reference_with_activity(
        self, x_t: Tensor, state: State
    ) -> tuple[Tensor, State, dict[str, Tensor]]:
        """The plain, obvious step that a fused `step_with_activity` must agree with (an
        architecture with a fused step overrides this with its reference)."""
        return self.step_with_activity(x_t, state)

    def step_reference(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        """`step` through the reference path, never the fused one."""
        logits, new_state, _ = self.step_reference_with_activity(x_t, state)
        return logits, new_state

    def state_schema(self) -> dict[str, tuple[list[int], str]]:
        """Name -> (shape without the batch dim, dtype name),
        e.g. {"layers.0.h_re": ([64], "float32")}. Fixed by the config, so computed once:
        every step checks its state against it."""
        schema = self.__dict__.get("_state_schema")
        if schema is None:
            state = self.init_state(1)
            schema = {
                name: (list(t.shape[1:]), str(t.dtype).removeprefix("torch."))
                for name, t in state.items()
            }
            self.__dict__["_state_schema"] = schema
        return {name: (list(shape), dtype) for name, (shape, dtype) in schema.items()}

    def example_step_input(self, batch: int = 1, seed: int = 0) -> Tensor:
        """A seeded input of one step: [B, F] float features or [B] int64 tokens."""
        generator = torch.Generator().manual_seed(seed)
        if self.input_kind == "tokens":
            return torch.randint(0, self.config.vocab_size, (batch,), generator=generator)
        return torch.rand(batch, self.config.d_input, generator=generator)  # [B, F]

    def warm_up(self) -> None:
        """One inference step at batch 1, so that what a fused step compiles on first use
        (models/kernels.py: seconds in a fresh install) is ready before a request."""
        with torch.inference_mode():
            self.step(self.example_step_input(), self.init_state(1))

    def check_step_input(self, x_t: Tensor) -> None:
        """Raise ValueError unless x_t is one step: float [B, d_input] or integer tokens [B]."""
        self._check_input(x_t, sequence=False)

    def check_sequence_input(self, x: Tensor) -> None:
        """Raise ValueError unless x is a sequence: float [B, T, d_input] or tokens [B, T]."""
        self._check_input(x, sequence=True)

    def check_state(self, state: State, batch: int) -> None:
        """Raise ValueError unless `state` has exactly this model's names and shapes for `batch`."""
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict of tensors, got {type(state).__name__}")
        schema = self.__dict__.get("_state_schema") or self.state_schema()
        if state.keys() != schema.keys():  # checked on every step: the sets only on a mismatch
            missing = sorted(set(schema) - set(state))
            unknown = sorted(set(state) - set(schema))
            raise ValueError(f"state names do not match: missing {missing}, unknown {unknown}")
        for name, (shape, _) in schema.items():
            tensor = state[name]
            if not isinstance(tensor, Tensor):
                raise ValueError(f"state[{name!r}] must be a tensor, got {type(tensor).__name__}")
            if list(tensor.shape) != [batch, *shape]:
                raise ValueError(
                    f"state[{name!r}] has shape {list(tensor.shape)}, expected {[batch, *shape]}"
                )

    def _check_input(self, x: Tensor, sequence: bool) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"input must be a torch.Tensor, got {type(x).__name__}")
        what = "sequence" if sequence else "step"
        if self.input_kind == "tokens":
            expected_dims = 2 if sequence else 1
            layout = "[B, T]" if sequence else "[B]"
            if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
                raise ValueError(f"token input must be an integer tensor, got {x.dtype}")
            if x.dim() != expected_dims:
                raise ValueError(f"token {what} must be {layout}, got shape {list(x.shape)}")
            vocab = self.config.vocab_size
            # Reading values back would break graph capture (ONNX export), so only check eagerly.
            eager = not (torch.jit.is_tracing() or torch.compiler.is_compiling())
            if eager and x.numel():
                low, high = (int(v) for v in torch.aminmax(x))  # one pass, checked every step
                if low < 0 or high >= vocab:
                    raise ValueError(f"token ids must lie in [0, {vocab}), got [{low}, {high}]")
        else:
            expected_dims = 3 if sequence else 2
            d_input = self.config.d_input
            layout = f"[B, T, {d_input}]" if sequence else f"[B, {d_input}]"
            if not x.dtype.is_floating_point:
                raise ValueError(f"feature input must be a float tensor, got {x.dtype}")
            if x.dim() != expected_dims or x.shape[-1] != d_input:
                raise ValueError(f"feature {what} must be {layout}, got shape {list(x.shape)}")
        if x.shape[0] < 1 or (sequence and x.shape[1] < 1):
            raise ValueError(
                f"input {what} must have batch >= 1 and length >= 1, got {list(x.shape)}"
            )


class StepLoopModel(StatefulModel):
    """A model given by its one-step cell alone (imported graphs): `step` is the cell, and
    `forward` runs it over time, so the two agree by construction."""

    @abstractmethod
    def _cell(self, x_t: Tensor, state: State) -> tuple[Tensor, State, dict[str, Tensor]]:
        """One step on checked inputs: (logits [B, n_out], new state, activity)."""

    def step_with_activity(
        self, x_t: Tensor, state: State
    ) -> tuple[Tensor, State, dict[str, Tensor]]:
        self.check_step_input(x_t)
        self.check_state(state, x_t.shape[0])
        return self._cell(x_t, state)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """x: [B, T, d_input] -> logits [B, T, n_out], final state: the cell in a loop."""
        self.check_sequence_input(x)
        if state is None:
            dtype = x.dtype if x.dtype.is_floating_point else torch.float32
            state = self.init_state(x.shape[0], device=x.device, dtype=dtype)
        self.check_state(state, x.shape[0])
        logits = []
        for x_t in x.unbind(1):
            logits_t, state, _ = self._cell(x_t, state)
            logits.append(logits_t)
        return torch.stack(logits, dim=1), state  # [B, T, C]
