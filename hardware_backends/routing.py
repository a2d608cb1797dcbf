"""Routing a model's ``F.linear`` calls to other matmul engines.

The analog and stochastic backends share this machinery: `find_linear_weights` records which
weights a model feeds to ``F.linear`` (every ``nn.Linear`` and explicit parameter matmuls
such as the LRU's B and C), `LinearRouter` (a torch-function mode) sends those calls to
engines while a `RoutedRunner` executes, and `usage_with_engines` prices the engines' work
beside the digital remainder. Everything else (recurrences, norms, nonlinearities,
convolutions, embedding lookups) stays digital.
"""

from __future__ import annotations

import copy
import threading
import zlib
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from hardware_backends.base import State, Usage, check_batch, run_by_steps
from hardware_backends.energy import DIGITAL_FP32, EnergyModel, usage_of_steps
from hardware_backends.noise_streams import NOISE_STREAM, StepStreams

if TYPE_CHECKING:
    from models.base import StatefulModel


# --- routing a model's F.linear calls to other engines -----------------------------------------


class MatmulEngine(Protocol):
    """Computes ``F.linear(x, W, bias)`` for one fixed weight W, its own way."""

    macs: int  # multiply-accumulates executed so far

    def __call__(self, x: Tensor, bias: Tensor | None) -> Tensor: ...


def _linear_arguments(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None]:
    merged = dict(zip(("input", "weight", "bias"), args, strict=False)) | kwargs
    return merged["input"], merged["weight"], merged.get("bias")


class _LinearWeightRecorder(TorchFunctionMode):
    """Records the identity of every tensor passed to ``F.linear`` as the weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight_ids: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            self.weight_ids.add(id(_linear_arguments(args, kwargs)[1]))
        return func(*args, **kwargs)


def find_linear_weights(model: StatefulModel) -> dict[str, nn.Parameter]:
    """The parameters `model` uses as ``F.linear`` weights in `step` and `forward`, by name.

    Found by running one step and a two-step sequence and watching ``F.linear``, so explicit
    parameter matmuls count as well as ``nn.Linear`` modules, and 2-D parameters used
    elementwise (Mamba's A_log) or for lookups (embeddings) do not.
    """
    recorder = _LinearWeightRecorder()
    x_t = model.example_step_input()
    with torch.no_grad(), recorder:
        model.step(x_t, model.init_state(1))
        model(torch.stack([x_t, x_t], dim=1))
    return {
        name: parameter
        for name, parameter in model.named_parameters()
        if id(parameter) in recorder.weight_ids
    }


class LinearRouter(TorchFunctionMode):
    """While active, ``F.linear`` with a routed weight runs on that weight's engine."""

    def __init__(self, engines: dict[int, MatmulEngine]) -> None:
        super().__init__()
        self.engines = engines  # id(weight parameter) -> engine

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_arguments(args, kwargs)
            engine = self.engines.get(id(weight))
            if engine is not None:
                return engine(x, bias)
        return func(*args, **kwargs)


def derived_generator(seed: int, purpose: str) -> torch.Generator:
    """An independent, reproducible random stream for (seed, purpose)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(purpose.encode()))


def usage_with_engines(
    op_counts: dict[str, int],
    batch: int,
    steps: int,
    activity: dict[str, Tensor],
    engine_macs: int,
    engine_energy: EnergyModel,
) -> Usage:
    """Usage of `steps` steps of `batch` sequences when `engine_macs` MACs ran on engines.

    The model's counts (`energy.usage_of_steps`) are priced with `engine_energy`: spike-driven
    synaptic operations run on the engines too (one spike row read per accumulate). Engine
    MACs beyond the spike-fed maximum (``synaptic_ops_max``) are the dense work the engines
    did; the rest of the dense work (recurrences, gates, decays) ran digitally and is
    re-priced with the FP32 figure, in the estimate and in its dense equivalent alike.
    """
    usage = usage_of_steps(op_counts, batch, steps, activity, engine_energy)
    dense_macs = int(op_counts["dense_macs"]) * batch * steps
    spike_fed_macs = int(op_counts.get("synaptic_ops_max", 0)) * batch * steps
    digital_macs = max(dense_macs - max(engine_macs - spike_fed_macs, 0), 0)
    extra = digital_macs * (DIGITAL_FP32.mac_joules - engine_energy.mac_joules)
    usage.energy_joules += extra
    usage.dense_equivalent_energy_joules += extra
    return usage


class RoutedRunner:
    """Runs a model snapshot with some of its ``F.linear`` weights routed to engines.

    Shared by the analog and stochastic backends; `engine_energy` prices the engines' work.
    Engines that draw fresh noise on every call (`noisy_engines`) run a sequence step by
    step, so that a step sees the same noise whether it comes alone, in a chunk or in a
    whole sequence. With `streams`, each sequence carries its own noise stream in its state
    (`noise_streams.NOISE_STREAM`: stream id, steps taken), the engines draw every row's
    noise from its sequence's key, and a sequence's result does not depend on the other
    sequences of its batch. `init_state` hands out fresh stream ids, counting from
    `first_stream` (a caller that wants a given stream, a session say, sets it with
    `noise_streams.seed_streams`). Calls are serialised by a lock: engines keep counters and
    a random stream.
    """

    backend = "routed"
    samples = 1

    def __init__(
        self,
        model: StatefulModel,
        engines: dict[str, MatmulEngine],
        engine_energy: EnergyModel,
        noisy_engines: bool,
        streams: StepStreams | None = None,
        first_stream: int = 0,
    ) -> None:
        self.model = model
        self.engines = engines
        self.engine_energy = engine_energy
        self.op_counts = model.macs_per_step()
        # Spiking models report their activity only from step_with_activity.
        self.by_steps = noisy_engines or streams is not None or "synaptic_ops_max" in self.op_counts
        parameters = dict(model.named_parameters())
        self._router = LinearRouter({id(parameters[name]): e for name, e in engines.items()})
        self._lock = threading.Lock()
        self.streams = streams
        self._next_stream = first_stream

    def _engine_macs(self) -> int:
        return sum(engine.macs for engine in self.engines.values())

    def init_state(self, batch: int) -> State:
        check_batch(batch)
        state = self.model.init_state(batch)
        if self.streams is not None:
            with self._lock:  # ids count upwards, wrapping within int64
                first = self._next_stream
                self._next_stream = (first + batch) % (1 << 63)
            streams = torch.zeros(batch, 2, dtype=torch.int64)  # [B, 2] (stream, steps)
            streams[:, 0] = torch.arange(batch, dtype=torch.int64).add_(first)
            state[NOISE_STREAM] = streams
        return state

    def _split_streams(self, state: State, batch: int) -> tuple[State, Tensor | None]:
        """The model's part of `state` and the noise streams [B, 2] (None without streams)."""
        if self.streams is None:
            return state, None
        streams = state.get(NOISE_STREAM)
        if (
            not isinstance(streams, Tensor)
            or streams.dtype != torch.int64
            or list(streams.shape) != [batch, 2]
        ):
            raise ValueError(
                f"state needs {NOISE_STREAM!r}: int64 [{batch}, 2] (stream id, steps taken), "
                f"as init_state makes it"
            )
        return {name: t for name, t in state.items() if name != NOISE_STREAM}, streams

    def step(self, x_t: Tensor, state: State) -> tuple[Tensor, State, Usage]:
        self.model.check_step_input(x_t)
        state, streams = self._split_streams(state, x_t.shape[0])
        with self._lock, torch.inference_mode(), self._router:
            if streams is not None:
                self.streams.begin(streams)  # type: ignore[union-attr]
            try:
                before = self._engine_macs()
                logits, new_state, activity = self.model.step_with_activity(x_t, state)  # [B, C]
                engine_macs = self._engine_macs() - before
            finally:
                if streams is not None:
                    self.streams.end()  # type: ignore[union-attr]
        if streams is not None:
            new_state = {**new_state, NOISE_STREAM: streams + _ONE_STEP}
        usage = usage_with_engines(
            self.op_counts, x_t.shape[0], 1, activity, engine_macs, self.engine_energy
        )
        return logits, new_state, usage

    def run(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Usage]:
        if self.by_steps:
            return self.run_by_steps(x, state)
        self.model.check_sequence_input(x)
        if state is None:
            state = self.init_state(x.shape[0])
        with self._lock, torch.inference_mode(), self._router:
            before = self._engine_macs()
            logits, new_state = self.model(x, state)  # [B, T, C]
            engine_macs = self._engine_macs() - before
        usage = usage_with_engines(
            self.op_counts, x.shape[0], x.shape[1], {}, engine_macs, self.engine_energy
        )
        return logits, new_state, usage

    def run_by_steps(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Usage]:
        """The reference path: `run` as repeated `step`."""
        self.model.check_sequence_input(x)
        return run_by_steps(self.step, self.init_state, x, state)


_ONE_STEP = torch.tensor([0, 1], dtype=torch.int64)  # added to a stream entry per step


def eval_snapshot(model: StatefulModel) -> StatefulModel:
    """A frozen eval-mode copy, so later changes to the caller's model never leak in."""
    snapshot = copy.deepcopy(model).cpu().eval()
    for parameter in snapshot.parameters():
        parameter.requires_grad_(False)
    return snapshot
