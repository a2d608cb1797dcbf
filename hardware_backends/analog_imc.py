"""The analog_imc backend: every matrix product of a model runs on simulated PCM crossbars.

`prepare` finds the weight matrices the model feeds to ``F.linear`` (every ``nn.Linear`` and
explicit parameter matmuls such as the LRU's B and C), programs each onto crossbar tiles once
per (model, seed, device config) -- programming noise and drift exponents are drawn then, as
when a chip is written -- and returns a runner that evaluates the model at ``t_inference``
seconds after programming. While the runner executes, a torch-function mode routes those
``F.linear`` calls to the crossbars; recurrences, norms, nonlinearities, convolutions and
embedding lookups stay digital. Each crossbar call draws fresh read and output noise from the
runner's seeded generator, so a runner replays the same numbers for the same calls.

Usage prices the crossbar MACs with the PCM chip's figure (`energy.ANALOG_PCM`) and the
remaining digital work of the step with the FP32 figure.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from hardware_backends.base import BackendOptions, State, Usage, parse_options, run_by_steps
from hardware_backends.crossbar import (
    AnalogMatmul,
    CrossbarConfig,
    ProgrammedCrossbar,
    program_crossbar,
)
from hardware_backends.energy import ANALOG_PCM, DIGITAL_FP32, EnergyModel, usage_of_steps
from hardware_backends.pcm_model import PCMConfig

if TYPE_CHECKING:
    from models.base import StatefulModel

PROGRAMMED_CHIP_CACHE_SIZE = 8


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


def example_step_input(model: StatefulModel) -> Tensor:
    """A one-sample step input of the right kind (features [1, F] or tokens [1])."""
    if model.input_kind == "tokens":
        return torch.zeros(1, dtype=torch.long)
    return torch.zeros(1, model.config.d_input)


def find_linear_weights(model: StatefulModel) -> dict[str, nn.Parameter]:
    """The parameters `model` uses as ``F.linear`` weights in `step` and `forward`, by name.

    Found by running one step and a two-step sequence and watching ``F.linear``, so explicit
    parameter matmuls count as well as ``nn.Linear`` modules, and 2-D parameters used
    elementwise (Mamba's A_log) or for lookups (embeddings) do not.
    """
    recorder = _LinearWeightRecorder()
    x_t = example_step_input(model)
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


def check_batch(batch: int) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")


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


# --- configuration and request options ---------------------------------------------------------


@dataclass(frozen=True)
class AnalogIMCConfig:
    """Every knob of the simulated chip; defaults are the published ones."""

    crossbar: CrossbarConfig = field(default_factory=CrossbarConfig)
    pcm: PCMConfig = field(default_factory=PCMConfig)
    t_inference: float = 0.0  # seconds since programming finished
    drift_compensation: bool = True  # global drift compensation per tile
    seed: int = 0  # picks the chip: programming noise, drift exponents and read noise stream

    def __post_init__(self) -> None:
        if not (math.isfinite(self.t_inference) and self.t_inference >= 0):
            raise ValueError(f"t_inference must be finite seconds >= 0, got {self.t_inference}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


_NonNegative = pydantic.confloat(ge=0.0, allow_inf_nan=False)
_Fraction = pydantic.confloat(ge=0.0, le=1.0)


class AnalogIMCOptions(BackendOptions):
    """Request/session options; device knobs left out keep the backend's configured values."""

    t_inference: _NonNegative = 0.0
    drift_compensation: bool = True
    seed: pydantic.conint(ge=0, le=2**31 - 1) = 0
    prog_noise_scale: _NonNegative | None = None
    read_noise_scale: _NonNegative | None = None
    drift_scale: _NonNegative | None = None
    stuck_at_zero_fraction: _Fraction | None = None
    stuck_at_gmax_fraction: _Fraction | None = None
    out_noise: _NonNegative | None = None
    inp_res: pydantic.confloat(ge=0.0, lt=1.0) | None = None
    out_res: pydantic.confloat(ge=0.0, lt=1.0) | None = None
    weight_scaling: Literal["tile", "column"] | None = None
    tile_size: pydantic.conint(ge=1, le=4096) | None = None


def config_from_options(base: AnalogIMCConfig, options: AnalogIMCOptions) -> AnalogIMCConfig:
    """`base` with the options applied; raises ValueError for inconsistent values."""
    given = options.model_dump(exclude_none=True)
    pcm_fields = {f.name for f in dataclasses.fields(PCMConfig)}
    crossbar_fields = {f.name for f in dataclasses.fields(CrossbarConfig)}
    pcm = dataclasses.replace(base.pcm, **{k: v for k, v in given.items() if k in pcm_fields})
    crossbar_changes = {k: v for k, v in given.items() if k in crossbar_fields}
    if "tile_size" in given:
        crossbar_changes |= {"tile_rows": given["tile_size"], "tile_cols": given["tile_size"]}
    crossbar = dataclasses.replace(base.crossbar, **crossbar_changes)
    return AnalogIMCConfig(
        crossbar=crossbar,
        pcm=pcm,
        t_inference=float(options.t_inference),
        drift_compensation=options.drift_compensation,
        seed=options.seed,
    )


# --- programming a model onto a chip -----------------------------------------------------------


def program_model(
    weights: dict[str, Tensor], config: AnalogIMCConfig
) -> dict[str, ProgrammedCrossbar]:
    """Program every weight matrix; each gets its own stream from (seed, name)."""
    return {
        name: program_crossbar(
            weight, config.crossbar, config.pcm, derived_generator(config.seed, f"program:{name}")
        )
        for name, weight in sorted(weights.items())
    }


def weights_fingerprint(weights: dict[str, Tensor]) -> str:
    """SHA-256 over names, shapes and values: a chip is reused only for the very same weights
    (a model_key alone could be reused by a caller for a different model)."""
    digest = hashlib.sha256()
    for name, weight in sorted(weights.items()):
        digest.update(f"{name}{list(weight.shape)}".encode())
        digest.update(weight.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _ProgrammedChipCache:
    """Programmed chips keyed by (model_key, seed, device config): each chip is written once
    and then read at any number of inference times."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._chips: OrderedDict[Hashable, dict[str, ProgrammedCrossbar]] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, key: Hashable, program: Callable[[], dict[str, ProgrammedCrossbar]]
    ) -> dict[str, ProgrammedCrossbar]:
        with self._lock:
            if key in self._chips:
                self._chips.move_to_end(key)
                return self._chips[key]
        chip = program()
        with self._lock:
            self._chips[key] = chip
            while len(self._chips) > self.maxsize:
                self._chips.popitem(last=False)
        return chip


# --- the runner and the backend ----------------------------------------------------------------


class RoutedRunner:
    """Runs a model snapshot with some of its ``F.linear`` weights routed to engines.

    Shared by the analog and stochastic backends; `engine_energy` prices the engines' work.
    Engines that draw fresh noise on every call (`noisy_engines`) run a sequence step by
    step, so that a step sees the same noise whether it comes alone, in a chunk or in a
    whole sequence: the draws follow the runner's stream in step order. Deterministic
    engines use the model's (parallel) `forward`. Calls are serialised by a lock: engines
    keep counters and a random stream.
    """

    backend = "routed"
    samples = 1

    def __init__(
        self,
        model: StatefulModel,
        engines: dict[str, MatmulEngine],
        engine_energy: EnergyModel,
        noisy_engines: bool,
    ) -> None:
        self.model = model
        self.engines = engines
        self.engine_energy = engine_energy
        self.op_counts = model.macs_per_step()
        # Spiking models report their activity only from step_with_activity.
        self.by_steps = noisy_engines or "synaptic_ops_max" in self.op_counts
        parameters = dict(model.named_parameters())
        self._router = LinearRouter({id(parameters[name]): e for name, e in engines.items()})
        self._lock = threading.Lock()

    def _engine_macs(self) -> int:
        return sum(engine.macs for engine in self.engines.values())

    def init_state(self, batch: int) -> State:
        check_batch(batch)
        return self.model.init_state(batch)

    def step(self, x_t: Tensor, state: State) -> tuple[Tensor, State, Usage]:
        self.model.check_step_input(x_t)
        with self._lock, torch.inference_mode(), self._router:
            before = self._engine_macs()
            logits, new_state, activity = self.model.step_with_activity(x_t, state)  # [B, C]
            engine_macs = self._engine_macs() - before
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


class AnalogIMCRunner(RoutedRunner):
    backend = "analog_imc"

    def __init__(
        self, model: StatefulModel, engines: dict[str, AnalogMatmul], config: AnalogIMCConfig
    ) -> None:
        super().__init__(model, engines, ANALOG_PCM, noisy_engines=True)
        self.config = config


def eval_snapshot(model: StatefulModel) -> StatefulModel:
    """A frozen eval-mode copy, so later changes to the caller's model never leak in."""
    snapshot = copy.deepcopy(model).cpu().eval()
    for parameter in snapshot.parameters():
        parameter.requires_grad_(False)
    return snapshot


class AnalogIMCBackend:
    name = "analog_imc"

    def __init__(self, config: AnalogIMCConfig | None = None) -> None:
        self.config = config or AnalogIMCConfig()
        self._chips = _ProgrammedChipCache(PROGRAMMED_CHIP_CACHE_SIZE)

    def availability(self) -> str | None:
        return None  # a pure-torch simulation runs wherever torch does

    def prepare(
        self, model: StatefulModel, *, model_key: str, options: dict | None = None
    ) -> AnalogIMCRunner:
        config = config_from_options(
            self.config, parse_options(self.name, AnalogIMCOptions, options)
        )
        snapshot = eval_snapshot(model)
        weights = find_linear_weights(snapshot)
        key = (model_key, weights_fingerprint(weights), config.seed, config.crossbar, config.pcm)
        chip = self._chips.get(key, lambda: program_model(weights, config))
        read_stream = derived_generator(config.seed, f"read:{config.t_inference!r}")
        engines = {
            name: AnalogMatmul(
                chip[name],
                config.crossbar,
                config.pcm,
                config.t_inference,
                config.drift_compensation,
                read_stream,
            )
            for name in sorted(weights)
        }
        return AnalogIMCRunner(snapshot, engines, config)
