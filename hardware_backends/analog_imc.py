"""The analog_imc backend: every matrix product of a model runs on simulated PCM crossbars.

`prepare` finds the weight matrices the model feeds to ``F.linear`` (every ``nn.Linear`` and
explicit parameter matmuls such as the LRU's B and C), programs each onto crossbar tiles once
per (model, seed, device config) -- programming noise and drift exponents are drawn then, as
when a chip is written -- and returns a runner that evaluates the model at ``t_inference``
seconds after programming. While the runner executes, a torch-function mode routes those
``F.linear`` calls to the crossbars; recurrences, norms, nonlinearities, convolutions and
embedding lookups stay digital.

The chip is read once per inference time: drift and the accumulated 1/f read noise are one
draw per (chip seed, t_inference, matrix), so every runner at that time multiplies with the
same conductances. Only the output noise of the periphery is drawn per crossbar read, and
per sequence: each sequence carries a noise stream in its state (`noise_streams`), so its
answers do not depend on what else shares its batch or in which order. `init_state` hands
out fresh streams counting from a start fixed by (seed, t_inference), so a fresh runner
replays the same numbers; a server seeds a session's stream from the session's id.

The weight mapping (option ``weight_mapping``) is "rescaled" by default: each tile computes
with its weights normalised to max |w| = 1 (aihwkit's ``weight_scaling_omega = 1``, not
aihwkit's default); "raw" computes in the weights' own units as aihwkit does by default
(``weight_scaling_omega = 0``), where output noise and the ADC weigh far more. Rescaled is
the default because it is how a chip is used well: a tile uses its whole conductance range
and its ADC range for whatever the weights' scale (4x less error at a year on a 128x512
layer, docs/BENCHMARKS.md). A runner names its mapping (`weight_mapping`), and answers
carry it.

Usage prices the crossbar MACs with the PCM chip's figure (`energy.ANALOG_PCM`) and the
remaining digital work of the step with the FP32 figure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import pydantic
import torch
from torch import Tensor

from hardware_backends.base import BackendOptions, parse_options
from hardware_backends.crossbar import (
    AnalogMatmul,
    CrossbarConfig,
    ProgrammedCrossbar,
    program_crossbar,
)
from hardware_backends.energy import ANALOG_PCM
from hardware_backends.noise_streams import KeyedNoise, StepStreams, stream_of
from hardware_backends.pcm_model import PCMConfig
from hardware_backends.routing import (
    RoutedRunner,
    derived_generator,
    eval_snapshot,
    find_linear_weights,
)

if TYPE_CHECKING:
    from models.base import StatefulModel

PROGRAMMED_CHIP_CACHE_SIZE = 8


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
    """Request/session options. t_inference, drift_compensation, seed and weight_mapping
    always apply (their defaults when left out); the device knobs left out (None) keep the
    backend's configured values."""

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
    # The units the tiles compute in. "rescaled" (the default): each tile's weights normalised
    # to max |w| = 1 and the abs-max applied digitally (aihwkit weight_scaling_omega = 1, not
    # aihwkit's default); "raw": the weights' own units (aihwkit's default omega = 0).
    weight_mapping: Literal["rescaled", "raw"] = "rescaled"
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


class AnalogIMCRunner(RoutedRunner):
    backend = "analog_imc"

    def __init__(
        self,
        model: StatefulModel,
        engines: dict[str, AnalogMatmul],
        config: AnalogIMCConfig,
        streams: StepStreams,
    ) -> None:
        first_stream = stream_of(f"analog_imc:{config.seed}:{config.t_inference!r}")
        super().__init__(model, engines, ANALOG_PCM, True, streams, first_stream)
        self.config = config

    @property
    def weight_mapping(self) -> str:
        """The units the tiles compute in: "rescaled" (default) or "raw"."""
        return self.config.crossbar.weight_mapping

    @property
    def notes(self) -> dict[str, str]:
        """Carried by every answer beside its usage (`base.runner_notes`)."""
        return {"weight_mapping": self.weight_mapping}


class AnalogIMCBackend:
    name = "analog_imc"

    def __init__(self, config: AnalogIMCConfig | None = None) -> None:
        self.config = config or AnalogIMCConfig()
        self._chips = _ProgrammedChipCache(PROGRAMMED_CHIP_CACHE_SIZE)

    def availability(self) -> str | None:
        return None  # a pure-torch simulation runs wherever torch does

    @property
    def defaults(self) -> dict[str, str]:
        """What runs when the options leave it open (`base.backend_defaults`)."""
        return {"weight_mapping": self.config.crossbar.weight_mapping}

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
        return chip_runner(snapshot, chip, config)

    def config_for(self, options: dict | None) -> AnalogIMCConfig:
        """The chip configuration that `options` ask for (validated)."""
        return config_from_options(self.config, parse_options(self.name, AnalogIMCOptions, options))


def output_stream(config: AnalogIMCConfig) -> torch.Generator:
    """The chip's output-noise stream at its inference time (one per runner)."""
    return derived_generator(config.seed, f"output:{config.t_inference!r}")


def chip_engine(
    name: str,
    crossbar: ProgrammedCrossbar,
    config: AnalogIMCConfig,
    stream: torch.Generator,
    probe_stream: torch.Generator | None = None,
    *,
    streams: StepStreams,
) -> AnalogMatmul:
    """Matrix `name` of a chip read at `config.t_inference`: drift and read noise are one
    draw per (chip, t, matrix); output noise per sequence and step from the keys a runner
    sets in `streams` (outside a step from `stream`, as the drift compensation's probe does
    unless `probe_stream` is given)."""
    return AnalogMatmul(
        crossbar,
        config.crossbar,
        config.pcm,
        config.t_inference,
        config.drift_compensation,
        stream,
        read_generator=derived_generator(config.seed, f"read:{name}:{config.t_inference!r}"),
        noise=KeyedNoise(streams, f"{config.seed}:{name}"),
        probe_generator=probe_stream,
    )


def chip_runner(
    model: StatefulModel, chip: dict[str, ProgrammedCrossbar], config: AnalogIMCConfig
) -> AnalogIMCRunner:
    """`model` with each programmed weight read from `chip` at `config.t_inference`. The
    model is used as it is, not copied: the caller decides whether it is a snapshot (serving)
    or the live weights (chip-in-the-loop tuning)."""
    # Read noise: one draw per (chip, t, matrix). Output noise: per sequence and step from
    # the keys the runner sets (`streams`); outside a step, from one stream per runner.
    stream, streams = output_stream(config), StepStreams()
    engines = {
        name: chip_engine(name, chip[name], config, stream, streams=streams)
        for name in sorted(chip)
    }
    return AnalogIMCRunner(model, engines, config, streams)
