"""The stochastic backend: device stochasticity as a sampler, or arithmetic on bitstreams.

Two modes (option ``mode``):

- "sampling" (default): S noisy copies of the weights run as S parallel chains, so a step
  returns logits [S, B, C]. The copies are drawn once at `prepare` (each chain is one device
  instance) from either Gaussian weight noise with std ``relative_std`` times the matrix's
  abs-max ("gaussian"), or the PCM device model of `pcm_model` -- programming noise, drift to
  ``t_inference`` and one read, with an exact per-tile drift-compensation factor ("pcm").
  The chains are stacked on the batch dimension, each sequence's S chains next to each
  other (row b·S + s), so the state of a sampling runner has S rows per sequence and the
  states of separate sequences concatenate into a batch as usual.
  `predictive_probabilities`, `predictive_entropy`, `expected_entropy` and
  `mutual_information` turn [S, ..., C] logits into the predictive distribution and its
  total / aleatoric / epistemic uncertainty.
- "bitstream": every matrix product is computed by bipolar stochastic computing
  (`stochastic_computing`) with ``stream_length`` bits per number; one chain (S = 1).

Like analog_imc, the backend routes the model's ``F.linear`` weights; everything else of the
model stays digital. Usage prices sampled MACs as analog PCM MACs (they model stochastic
analog devices). No per-operation energy figure for stochastic computing is cited in
`energy.py`: bitstream MACs are priced with a placeholder, the FP32 MAC figure
(`energy.STOCHASTIC_BITSTREAM_PLACEHOLDER`), which is neither an upper nor a lower bound.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import pydantic
import torch
from torch import Tensor

from hardware_backends.base import BackendOptions, State, Usage, check_batch, parse_options
from hardware_backends.crossbar import (
    CrossbarConfig,
    dense_weight,
    program_crossbar,
    read_weights,
)
from hardware_backends.energy import ANALOG_PCM, STOCHASTIC_BITSTREAM_PLACEHOLDER
from hardware_backends.pcm_model import PCMConfig
from hardware_backends.routing import (
    RoutedRunner,
    derived_generator,
    eval_snapshot,
    find_linear_weights,
)
from hardware_backends.stochastic_computing import (
    MAX_STREAM_LENGTH,
    BitSource,
    StochasticMatmul,
    StreamConfig,
)

if TYPE_CHECKING:
    from models.base import StatefulModel

DEFAULT_SAMPLES = 16
DEFAULT_RELATIVE_STD = 0.05
DEFAULT_STREAM_LENGTH = 1024
SAMPLING_ONLY = ("samples", "noise", "relative_std", "t_inference", "drift_compensation")
BITSTREAM_ONLY = ("stream_length", "source", "accumulation")


# --- uncertainty from samples ------------------------------------------------------------------


def _check_sampled(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.dim() < 2:
        raise ValueError("sampled logits must be a tensor [S, ..., C] with a leading sample dim")


def _entropy(probabilities: Tensor) -> Tensor:
    return -(probabilities * torch.log(probabilities.clamp_min(1e-30))).sum(dim=-1)


def predictive_probabilities(logits: Tensor) -> Tensor:
    """Mean of the per-sample softmax: [S, ..., C] -> [..., C]."""
    _check_sampled(logits)
    return torch.softmax(logits.float(), dim=-1).mean(dim=0)


def predictive_entropy(logits: Tensor) -> Tensor:
    """Total uncertainty, the entropy of the predictive mean (nats): [S, ..., C] -> [...]."""
    return _entropy(predictive_probabilities(logits))


def expected_entropy(logits: Tensor) -> Tensor:
    """Aleatoric part, the mean entropy of the samples (nats): [S, ..., C] -> [...]."""
    _check_sampled(logits)
    return _entropy(torch.softmax(logits.float(), dim=-1)).mean(dim=0)


def mutual_information(logits: Tensor) -> Tensor:
    """Epistemic part: entropy of the mean minus mean entropy (nats, >= 0): [S, ..., C] -> [...]."""
    return (predictive_entropy(logits) - expected_entropy(logits)).clamp_min(0.0)


# --- sampled weights ---------------------------------------------------------------------------


class SampledMatmul:
    """``F.linear`` with S weight samples at once. The leading dimension of the input holds
    B sequences x S chains, chain-minor (row b·S + s), as the sampling runner lays them out."""

    def __init__(self, weights: Tensor) -> None:
        self.weights = weights  # [S, out, in]
        self.macs = 0

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        samples, out_features, in_features = self.weights.shape
        if x.dim() < 2 or x.shape[-1] != in_features or x.shape[0] % samples:
            raise ValueError(
                f"expected [B·{samples}, ..., {in_features}] inputs (B sequences x {samples} "
                f"chains), got shape {list(x.shape)}"
            )
        batch = x.shape[0] // samples
        rows = x.reshape(batch, samples, -1, in_features).transpose(0, 1)  # [S, B, M, in]
        rows = rows.reshape(samples, -1, in_features)  # [S, B·M, in]
        y = torch.bmm(rows, self.weights.transpose(1, 2))  # [S, B·M, out]
        self.macs += rows.shape[0] * rows.shape[1] * in_features * out_features
        if bias is not None:
            y = y + bias
        y = y.view(samples, batch, -1, out_features).transpose(0, 1)  # [B, S, M, out]
        return y.reshape(*x.shape[:-1], out_features)


def gaussian_weight_samples(
    weight: Tensor, samples: int, relative_std: float, generator: torch.Generator
) -> Tensor:
    """[S, out, in]: weight + N(0, (relative_std · max|W|)²) per entry and sample."""
    noise = torch.randn(samples, *weight.shape, generator=generator)
    return weight + relative_std * weight.abs().max() * noise


def pcm_weight_samples(
    weight: Tensor,
    samples: int,
    pcm: PCMConfig,
    t_inference: float,
    drift_compensation: bool,
    seed: int,
    name: str,
) -> Tensor:
    """[S, out, in]: S chips, each programmed, drifted to `t_inference` and read once.

    Drift compensation here uses the exact per-tile factor mean|W_programmed| / mean|W_read|
    (no periphery noise), unlike the analog backend's measured one."""
    crossbar_config = CrossbarConfig()
    out = []
    for s in range(samples):
        generator = derived_generator(seed, f"sample:{name}:{s}")
        chip = program_crossbar(weight, crossbar_config, pcm, generator, with_drift_reference=False)
        blocks = read_weights(chip, t_inference, pcm, generator)  # [K, out, rows]
        if drift_compensation:
            programmed = (chip.positive.g_programmed - chip.negative.g_programmed) / pcm.g_max
            ratio = programmed.abs().mean(dim=(1, 2)) / blocks.abs().mean(dim=(1, 2)).clamp_min(
                1e-12
            )
            blocks = blocks * ratio.view(-1, 1, 1)
        out.append(dense_weight(blocks, chip.scale, chip.layout))
    return torch.stack(out)  # [S, out, in]


# --- options -----------------------------------------------------------------------------------


class StochasticOptions(BackendOptions):
    mode: Literal["sampling", "bitstream"] = "sampling"
    seed: pydantic.conint(ge=0, le=2**31 - 1) = 0
    # sampling mode
    samples: pydantic.conint(ge=1, le=1024) | None = None
    noise: Literal["gaussian", "pcm"] | None = None
    relative_std: pydantic.confloat(ge=0.0, allow_inf_nan=False) | None = None
    t_inference: pydantic.confloat(ge=0.0, allow_inf_nan=False) | None = None
    drift_compensation: bool | None = None
    # bitstream mode
    stream_length: pydantic.conint(ge=1, le=MAX_STREAM_LENGTH) | None = None
    source: Literal["random", "sobol"] | None = None
    accumulation: Literal["count", "mux"] | None = None

    @pydantic.model_validator(mode="after")
    def _options_match_the_mode(self) -> StochasticOptions:
        other = BITSTREAM_ONLY if self.mode == "sampling" else SAMPLING_ONLY
        stray = [name for name in other if getattr(self, name) is not None]
        if self.mode == "bitstream" and self.samples == 1:
            stray.remove("samples")
        if stray:
            raise ValueError(f"{', '.join(stray)} do not apply to mode {self.mode!r}")
        noise = self.noise or "gaussian"
        if noise == "gaussian" and (
            self.t_inference is not None or self.drift_compensation is not None
        ):
            raise ValueError("t_inference and drift_compensation apply to noise 'pcm' only")
        if noise == "pcm" and self.relative_std is not None:
            raise ValueError("relative_std applies to noise 'gaussian' only")
        return self


# --- runners and the backend -------------------------------------------------------------------


class SamplingRunner(RoutedRunner):
    """S chains with sampled weights: logits carry a leading [S] dim; the state has S rows per
    sequence (row b·S + s), so `init_state(B)` returns B·S rows."""

    backend = "stochastic"

    def __init__(
        self, model: StatefulModel, engines: dict[str, SampledMatmul], samples: int
    ) -> None:
        super().__init__(model, engines, ANALOG_PCM, noisy_engines=False)
        self.samples = samples

    def init_state(self, batch: int) -> State:
        check_batch(batch)
        return self.model.init_state(self.samples * batch)

    def _repeat(self, x: Tensor) -> Tensor:
        return x.repeat_interleave(self.samples, dim=0)  # [B·S, ...], row b·S + s

    def _samples_first(self, logits: Tensor) -> Tensor:
        """[B·S, ...] -> [S, B, ...]."""
        return logits.view(-1, self.samples, *logits.shape[1:]).transpose(0, 1)

    def step(self, x_t: Tensor, state: State) -> tuple[Tensor, State, Usage]:
        self.model.check_step_input(x_t)
        logits, new_state, usage = super().step(self._repeat(x_t), state)  # [B·S, C]
        return self._samples_first(logits), new_state, usage

    def run(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Usage]:
        self.model.check_sequence_input(x)
        if self.by_steps:
            return self.run_by_steps(x, state)
        if state is None:
            state = self.init_state(x.shape[0])
        logits, new_state, usage = super().run(self._repeat(x), state)  # [B·S, T, C]
        return self._samples_first(logits), new_state, usage


class BitstreamRunner(RoutedRunner):
    backend = "stochastic"


class StochasticBackend:
    name = "stochastic"

    def __init__(self, pcm: PCMConfig | None = None) -> None:
        self.pcm = pcm or PCMConfig()

    def availability(self) -> str | None:
        return None  # pure torch

    def prepare(
        self, model: StatefulModel, *, model_key: str, options: dict | None = None
    ) -> RoutedRunner:
        parsed = parse_options(self.name, StochasticOptions, options)
        snapshot = eval_snapshot(model)
        weights = find_linear_weights(snapshot)
        if parsed.mode == "bitstream":
            config = StreamConfig(
                length=parsed.stream_length or DEFAULT_STREAM_LENGTH,
                source=parsed.source or "random",
                accumulation=parsed.accumulation or "count",
            )
            source = BitSource(config.source, config.length, parsed.seed)
            engines = {
                name: StochasticMatmul(w, config, source) for name, w in sorted(weights.items())
            }
            return BitstreamRunner(
                snapshot, engines, STOCHASTIC_BITSTREAM_PLACEHOLDER, noisy_engines=True
            )

        samples = parsed.samples or DEFAULT_SAMPLES
        engines = {}
        for name, weight in sorted(weights.items()):
            if (parsed.noise or "gaussian") == "gaussian":
                std = DEFAULT_RELATIVE_STD if parsed.relative_std is None else parsed.relative_std
                generator = derived_generator(parsed.seed, f"gaussian:{name}")
                sampled = gaussian_weight_samples(weight, samples, std, generator)
            else:
                sampled = pcm_weight_samples(
                    weight,
                    samples,
                    self.pcm,
                    parsed.t_inference or 0.0,
                    parsed.drift_compensation is not False,
                    parsed.seed,
                    name,
                )
            engines[name] = SampledMatmul(sampled)
        return SamplingRunner(snapshot, engines, samples)
