"""A tiled analog matrix-vector multiply on PCM crossbars, with DAC/ADC periphery.

A weight matrix W [out, in] is cut into tiles of at most ``tile_rows`` inputs x ``tile_cols``
outputs. Each tile stores its block as differential conductance pairs: the block is divided
by its abs-max (per tile, or per column of a tile) so that the largest weight sits at g_max,
the positive part of a weight goes on G+, the negative part on G-, the other device at 0.

What the analog multiply then computes in depends on the weight mapping (``weight_mapping``):

- "rescaled" (the default; aihwkit's ``mapping.weight_scaling_omega = 1``): the tile computes
  with the normalised weights w = (G+ - G-)/g_max in [-1, 1] and the abs-max is applied
  digitally after the ADC. Output noise and the ADC act on outputs of full-scale weights.
- "raw" (aihwkit's default, ``weight_scaling_omega = 0``): the tile computes with the weights
  in their own units, w = abs-max · (G+ - G-)/g_max, and nothing is rescaled digitally, so
  output noise and the ADC act in raw weight units (for small weights, much larger relative
  error).

One multiply then runs, per tile:

    input x --noise management (divide by abs-max)--> DAC (quantise, clip to ±inp_bound)
      --> crossbar (Ohm + Kirchhoff: y = W_read x)
      --> + output noise --> ADC (quantise, clip to ±out_bound)
      --> bound management (if any output clipped, halve the input and try again)
      --> digital: undo the input scaling, times the tile's digital scale and drift factor

and the partial results of the tiles along the input dimension are summed digitally.
W_read is the array as read at the inference time: drift and the accumulated 1/f read noise
are drawn once per (chip, inference time), as the device model has them; only the output
noise is drawn afresh on every multiply.
The periphery follows IBM aihwkit's inference defaults (``InferenceRPUConfig``): 7-bit signed
DAC (resolution 1/126 of the full range), ADC resolution 1/510 with bound 12, output noise
0.06, abs-max noise management, iterative bound management.

Global drift compensation follows aihwkit's ``GlobalDriftCompensation``: right after
programming, and again at the inference time, the tile is read through its full noisy forward
pass with one-hot probe inputs; the ratio of the mean absolute outputs rescales the tile's
output. Because the probe goes through output noise and the ADC, the ratio is slightly too
small when the weights have drifted (the noise floor does not drift), so it under-corrects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hardware_backends.pcm_model import (
    PCMConfig,
    ProgrammedDevices,
    program_devices,
    read_conductance,
)

WEIGHT_SCALINGS = ("tile", "column")
WEIGHT_MAPPINGS = ("rescaled", "raw")
NOISE_MANAGEMENTS = ("abs_max", "none")
BOUND_MANAGEMENTS = ("iterative", "none")


@dataclass(frozen=True)
class CrossbarConfig:
    """Array size and periphery; defaults are aihwkit's inference defaults."""

    tile_rows: int = 512  # inputs (word lines) per tile
    tile_cols: int = 512  # outputs (bit lines) per tile
    weight_scaling: str = "tile"  # one scale per tile, or one per column of a tile
    weight_mapping: str = "rescaled"  # analog units: normalised to max|w| = 1, or raw weights
    inp_res: float = 1.0 / 126.0  # DAC step as a fraction of the range 2·inp_bound; 0 = exact
    inp_bound: float = 1.0
    out_res: float = 1.0 / 510.0  # ADC step as a fraction of the range 2·out_bound; 0 = exact
    out_bound: float = 12.0  # normalised units (one input at full scale times one full weight)
    out_noise: float = 0.06  # std of additive output noise, normalised units
    noise_management: str = "abs_max"
    bound_management: str = "iterative"
    max_bm_factor: float = 1000.0  # bound management gives up beyond this input reduction ...
    max_bm_res: float = 0.25  # ... or when the reduced input falls below this many DAC steps

    def __post_init__(self) -> None:
        for name in ("tile_rows", "tile_cols"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"CrossbarConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("inp_res", "out_res"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(
                    f"CrossbarConfig.{name} is a step as a fraction of the range and must lie "
                    f"in [0, 1), got {value!r}"
                )
        for name in ("inp_bound", "out_bound", "max_bm_factor", "max_bm_res"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"CrossbarConfig.{name} must be a positive number, got {value!r}")
        if not (isinstance(self.out_noise, (int, float)) and self.out_noise >= 0):
            raise ValueError(f"CrossbarConfig.out_noise must be >= 0, got {self.out_noise!r}")
        choices = {
            "weight_scaling": WEIGHT_SCALINGS,
            "weight_mapping": WEIGHT_MAPPINGS,
            "noise_management": NOISE_MANAGEMENTS,
            "bound_management": BOUND_MANAGEMENTS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"CrossbarConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )


def quantize(x: Tensor, resolution: float, bound: float) -> Tensor:
    """Round to the nearest multiple of resolution·2·bound (no clipping); 0 = no rounding."""
    if resolution == 0:
        return x
    step = resolution * 2.0 * bound
    return torch.round(x / step) * step


# --- mapping weights onto tiles ----------------------------------------------------------------


@dataclass(frozen=True)
class TileLayout:
    """How an [out, in] matrix is cut: K row tiles of ``rows`` inputs, column tiles of ``cols``."""

    out_features: int
    in_features: int
    rows: int  # inputs per tile (the last tile is zero-padded)
    cols: int  # outputs per tile (the last tile may be narrower)

    @property
    def row_tiles(self) -> int:
        return math.ceil(self.in_features / self.rows)

    @property
    def col_tiles(self) -> int:
        return math.ceil(self.out_features / self.cols)

    def split_inputs(self, x: Tensor) -> Tensor:
        """[R, in] -> [R, K, rows], zero-padding the last row tile."""
        pad = self.row_tiles * self.rows - self.in_features
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        return x.view(x.shape[0], self.row_tiles, self.rows)

    def per_column(self, per_tile: Tensor) -> Tensor:
        """[K, col_tiles] -> [K, out]: each tile's value repeated over its columns."""
        if self.col_tiles == 1:
            return per_tile.expand(per_tile.shape[0], self.out_features)
        return per_tile.repeat_interleave(self.cols, dim=1)[:, : self.out_features]

    def tile_any(self, flags: Tensor) -> Tensor:
        """[..., out] booleans -> [..., col_tiles]: whether any column of a tile is set."""
        if self.col_tiles == 1:
            return flags.any(dim=-1, keepdim=True)
        pad = self.col_tiles * self.cols - self.out_features
        if pad:
            flags = torch.nn.functional.pad(flags, (0, pad))
        return flags.view(*flags.shape[:-1], self.col_tiles, self.cols).any(dim=-1)


def layout_for(weight: Tensor, config: CrossbarConfig) -> TileLayout:
    out_features, in_features = weight.shape
    return TileLayout(
        out_features, in_features, min(config.tile_rows, in_features), config.tile_cols
    )


def weight_tiles(
    weight: Tensor, layout: TileLayout, config: CrossbarConfig
) -> tuple[Tensor, Tensor]:
    """Normalised tile blocks [K, out, rows] in [-1, 1] and their digital scales [K, out]."""
    blocks = layout.split_inputs(weight).permute(1, 0, 2)  # [K, out, rows]
    abs_max = blocks.abs().amax(dim=2)  # [K, out], per column of each row tile
    if config.weight_scaling == "tile":
        per_tile = torch.stack(
            [part.amax(dim=1) for part in abs_max.split(layout.cols, dim=1)], dim=1
        )  # [K, col_tiles]
        abs_max = layout.per_column(per_tile)  # [K, out]
    scale = torch.where(abs_max > 0, abs_max, torch.ones_like(abs_max))  # [K, out]
    return blocks / scale.unsqueeze(-1), scale


def dense_weight(blocks: Tensor, scale: Tensor, layout: TileLayout) -> Tensor:
    """Inverse of `weight_tiles`: blocks [K, out, rows] and scales [K, out] -> [out, in]."""
    weight = (blocks * scale.unsqueeze(-1)).permute(1, 0, 2)  # [out, K, rows]
    return weight.reshape(layout.out_features, -1)[:, : layout.in_features]


# --- one analog pass through the periphery -----------------------------------------------------


def _analog_pass(
    x: Tensor,
    reduction: float,
    weights: Tensor,
    config: CrossbarConfig,
    generator: torch.Generator,
    overwrite_input: bool = False,
) -> tuple[Tensor, float, Tensor | None]:
    """DAC -> crossbar -> output noise -> ADC on the inputs x / reduction.

    x [R, K, rows] (noise-managed), weights [K, out, rows] -> (y [R, K, out] clipped to
    ±out_bound, in units of the returned float; which outputs clipped [R, K, out], or None
    when none did). The same arithmetic as quantise-then-multiply, counted in DAC and ADC
    steps so that each element is touched as few times as possible: W·(n·step) = step·(W·n)
    for integer n. The input is divided exactly as the reference does (an input at the
    bound halved lands on a rounding tie, so the order of operations matters); with
    `overwrite_input` x itself is turned into DAC steps.
    """
    if reduction != 1.0:
        x, overwrite_input = x / reduction, True
    dac_step = config.inp_res * 2.0 * config.inp_bound
    if dac_step > 0:
        levels = config.inp_bound / dac_step
        x_dac = x.div_(dac_step) if overwrite_input else x / dac_step
        x_dac = x_dac.round_().clamp_(-levels, levels)  # DAC steps
        unit = dac_step
    else:
        x_dac = x.clamp(-config.inp_bound, config.inp_bound)
        unit = 1.0
    if weights.shape[0] == 1:  # one row tile: a plain matmul, no batched transposes
        y = (x_dac[:, 0] @ weights[0].T).unsqueeze(1)  # [R, 1, out], in units of `unit`
    else:
        y = torch.bmm(x_dac.transpose(0, 1), weights.transpose(1, 2)).transpose(0, 1)
    if config.out_noise > 0:
        noise = torch.randn(y.shape, generator=generator, dtype=y.dtype)  # [R, K, out]
        y = y.add_(noise, alpha=config.out_noise / unit)
    adc_step = config.out_res * 2.0 * config.out_bound
    if adc_step > 0:
        y = y.mul_(unit / adc_step).round_()  # ADC steps
        unit = adc_step
    bound = config.out_bound / unit
    low, high = torch.aminmax(y)
    clipped = None
    if float(high) > bound or float(low) < -bound:
        clipped = y.abs() > bound  # [R, K, out]
        y = y.clamp_(-bound, bound)
    return y, unit, clipped


def _largest_input_reduction(config: CrossbarConfig) -> float:
    """Bound management stops once the input has been divided by more than this."""
    dac_step = config.inp_res * 2.0 * config.inp_bound
    if dac_step > 0:
        return min(config.max_bm_factor, config.max_bm_res / dac_step)
    return config.max_bm_factor


def tile_mvm(
    x: Tensor,
    weights: Tensor,
    layout: TileLayout,
    config: CrossbarConfig,
    generator: torch.Generator,
) -> Tensor:
    """Per-tile analog products with noise and bound management, in the units of x.

    x [R, K, rows] (inputs split over row tiles), weights [K, out, rows] (in analog units)
    -> [R, K, out]: each row tile's partial product, before the digital weight scale.
    """
    if config.noise_management == "abs_max":
        nm = x.abs().amax(dim=-1, keepdim=True)  # [R, K, 1]
        nm = torch.where(nm > 0, nm, torch.ones_like(nm))
    else:
        nm = torch.ones_like(x[..., :1])

    # The first pass may overwrite its managed input: it is rebuilt if bound management
    # needs it again.
    y, unit, clipped = _analog_pass(x / nm, 1.0, weights, config, generator, True)
    if config.bound_management == "none" or clipped is None:
        return y.mul_(nm * unit)

    # Iterative bound management (aihwkit): the inputs of a tile whose ADC clipped are
    # halved and run again, until they fit or would sink below max_bm_res DAC steps. Only
    # the rows with a pending tile are run again, as the chip reruns only those vectors.
    give_up_above = _largest_input_reduction(config)
    result = y.mul_(unit)  # [R, K, out]; the clipped tiles are replaced below
    if give_up_above < 1.0:  # not even one halving allowed: keep the clipped outputs
        return result.mul_(nm)
    x_managed = x / nm  # [R, K, rows]
    pending = layout.tile_any(clipped)  # [R, K, col_tiles]
    reduction = 1.0
    while True:
        rows = pending.flatten(1).any(dim=1).nonzero().squeeze(1)  # [P] rows still pending
        if rows.numel() == 0:
            return result.mul_(nm)
        reduction *= 2.0
        y, unit, clipped = _analog_pass(x_managed[rows], reduction, weights, config, generator)
        waiting = pending[rows]  # [P, K, col_tiles]
        if reduction > give_up_above or clipped is None:
            accept = waiting
        else:
            accept = waiting & ~layout.tile_any(clipped)
        accept_cols = layout.per_column(accept.flatten(0, 1)).view_as(y)  # [P, K, out]
        result[rows] = torch.where(accept_cols, y.mul_(unit * reduction), result[rows])
        pending[rows] = waiting & ~accept


def reference_tile_mvm(
    x: Tensor, weights: Tensor, layout: TileLayout, config: CrossbarConfig
) -> Tensor:
    """The slow, obvious version of `tile_mvm` without output noise: one input row and one
    tile at a time, bound management as a plain loop. Same shapes as `tile_mvm`."""
    if config.out_noise != 0:
        raise ValueError("reference_tile_mvm is deterministic; set out_noise=0")
    give_up_above = _largest_input_reduction(config)
    rows, tiles, _ = x.shape
    out = torch.zeros(rows, tiles, layout.out_features, dtype=x.dtype)
    for r in range(rows):
        for k in range(tiles):
            xi = x[r, k]  # [rows]
            nm = float(xi.abs().max()) if config.noise_management == "abs_max" else 1.0
            nm = nm if nm > 0 else 1.0
            for c in range(layout.col_tiles):
                cols = slice(c * layout.cols, min((c + 1) * layout.cols, layout.out_features))
                w = weights[k, cols]  # [tile cols, rows]
                reduction = 1.0
                while True:
                    x_dac = quantize(xi / nm / reduction, config.inp_res, config.inp_bound)
                    x_dac = x_dac.clamp(-config.inp_bound, config.inp_bound)
                    y = quantize(w @ x_dac, config.out_res, config.out_bound)
                    fits = bool((y.abs() <= config.out_bound).all())
                    done = config.bound_management == "none" or fits or reduction > give_up_above
                    if done:
                        out[r, k, cols] = (
                            y.clamp(-config.out_bound, config.out_bound) * reduction * nm
                        )
                        break
                    reduction *= 2.0
    return out


# --- a programmed crossbar and its reads -------------------------------------------------------


@dataclass(frozen=True)
class ProgrammedCrossbar:
    """One weight matrix written to PCM tiles: fixed once programmed (the chip is written once)."""

    layout: TileLayout
    scale: Tensor  # [K, out] abs-max of each block (normalised weight -> real weight)
    positive: ProgrammedDevices  # G+ devices, [K, out, rows] µS
    negative: ProgrammedDevices  # G- devices, [K, out, rows] µS
    reference_readout: Tensor | None  # [K, col_tiles] drift-compensation baseline, or None


def analog_units(normalised: Tensor, scale: Tensor, config: CrossbarConfig) -> Tensor:
    """Normalised tile weights [K, out, rows] in the units the tile computes in."""
    if config.weight_mapping == "raw":
        return normalised * scale.unsqueeze(-1)
    return normalised


def digital_scale(scale: Tensor, config: CrossbarConfig) -> Tensor:
    """The digital factor [K, out] applied after the ADC: the abs-max when rescaled, else 1."""
    if config.weight_mapping == "raw":
        return torch.ones_like(scale)
    return scale


def program_crossbar(
    weight: Tensor,
    config: CrossbarConfig,
    pcm: PCMConfig,
    generator: torch.Generator,
    with_drift_reference: bool = True,
) -> ProgrammedCrossbar:
    """Map ``weight [out, in]`` to conductance pairs and program them (noise drawn here, once)."""
    if weight.dim() != 2:
        raise ValueError(f"a crossbar holds a matrix [out, in], got shape {list(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("cannot program non-finite weights onto a crossbar")
    weight = weight.detach().float()
    layout = layout_for(weight, config)
    normalised, scale = weight_tiles(weight, layout, config)  # [K, out, rows], [K, out]
    g_plus = normalised.clamp(min=0.0) * pcm.g_max  # [K, out, rows] µS
    g_minus = (-normalised).clamp(min=0.0) * pcm.g_max
    positive = program_devices(g_plus, pcm, generator)
    negative = program_devices(g_minus, pcm, generator)
    reference = None
    if with_drift_reference:
        programmed = (positive.g_programmed - negative.g_programmed) / pcm.g_max
        reference = probe_readout(
            analog_units(programmed, scale, config), layout, config, generator
        )
    return ProgrammedCrossbar(layout, scale, positive, negative, reference)


def read_weights(
    crossbar: ProgrammedCrossbar, t_inference: float, pcm: PCMConfig, generator: torch.Generator
) -> Tensor:
    """The normalised weights as read at ``t_inference`` (one draw of the accumulated read
    noise): [K, out, rows]."""
    g_plus = read_conductance(crossbar.positive, t_inference, pcm, generator)
    g_minus = read_conductance(crossbar.negative, t_inference, pcm, generator)
    return (g_plus - g_minus) / pcm.g_max


def probe_readout(
    weights: Tensor, layout: TileLayout, config: CrossbarConfig, generator: torch.Generator
) -> Tensor:
    """Mean |output| of each tile for one-hot probes through the noisy forward: [K, col_tiles]."""
    k_tiles = layout.row_tiles
    probe = torch.eye(layout.rows).unsqueeze(1).expand(layout.rows, k_tiles, layout.rows)
    y = tile_mvm(probe.contiguous(), weights, layout, config, generator).abs()  # [rows, K, out]
    # Only probe rows that exist in each tile (the last one is padded).
    valid_rows = torch.arange(layout.rows).unsqueeze(1) + layout.rows * torch.arange(k_tiles)
    y = y * (valid_rows < layout.in_features).unsqueeze(-1)  # [rows, K, out]
    sums, counts = [], []
    for c in range(layout.col_tiles):
        cols = slice(c * layout.cols, min((c + 1) * layout.cols, layout.out_features))
        sums.append(y[:, :, cols].sum(dim=(0, 2)))  # [K]
        n_rows = (valid_rows < layout.in_features).sum(dim=0)  # [K]
        counts.append(n_rows * (cols.stop - cols.start))
    mean_abs = torch.stack(sums, dim=1) / torch.stack(counts, dim=1)  # [K, col_tiles]
    return mean_abs.clamp(min=1e-4)


class AnalogMatmul:
    """``F.linear`` on a programmed crossbar at a fixed time since programming.

    The chip is read at ``t_inference`` once, here: drift and the accumulated 1/f read noise
    belong to (chip, inference time), as in the device model, so every call multiplies with
    the same conductances and a row's result never depends on the other rows of its batch
    or on the calls before it, except through the output noise, which is drawn afresh per
    call from ``generator``. The drift-compensation factor is measured once here too, as the
    chip would after waking up (its probe's output noise from ``probe_generator`` when given,
    else from ``generator``). Counts the multiply-accumulates it executed in ``macs``.
    """

    def __init__(
        self,
        crossbar: ProgrammedCrossbar,
        config: CrossbarConfig,
        pcm: PCMConfig,
        t_inference: float,
        drift_compensation: bool,
        generator: torch.Generator,
        read_generator: torch.Generator | None = None,
        probe_generator: torch.Generator | None = None,
    ) -> None:
        self.crossbar, self.config, self.pcm = crossbar, config, pcm
        self.t_inference = float(t_inference)
        self.generator = generator
        self.macs = 0
        layout = crossbar.layout
        read = read_weights(crossbar, self.t_inference, pcm, read_generator or generator)
        self.read_normalised = read  # [K, out, rows], the array as read at t_inference
        self.weights = analog_units(read, crossbar.scale, config)  # [K, out, rows]
        alpha = torch.ones(layout.row_tiles, layout.col_tiles)  # [K, col_tiles]
        if drift_compensation:
            if crossbar.reference_readout is None:
                raise ValueError("drift compensation needs a crossbar programmed with a reference")
            now = probe_readout(self.weights, layout, config, probe_generator or generator)
            alpha = crossbar.reference_readout / now
        self.alpha = alpha
        digital = digital_scale(crossbar.scale, config)  # [K, out]
        self.output_scale = digital * layout.per_column(alpha)  # [K, out]

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        layout = self.crossbar.layout
        if x.shape[-1] != layout.in_features:
            raise ValueError(
                f"crossbar expects {layout.in_features} input features, got {x.shape[-1]}"
            )
        lead = x.shape[:-1]
        rows = x.reshape(-1, layout.in_features).float()  # [R, in]
        partial = tile_mvm(
            layout.split_inputs(rows), self.weights, layout, self.config, self.generator
        )  # [R, K, out]
        if layout.row_tiles == 1:
            y = partial[:, 0] * self.output_scale[0]  # [R, out]
        else:
            y = (partial * self.output_scale).sum(dim=1)  # [R, out], digital sum over row tiles
        self.macs += rows.shape[0] * layout.in_features * layout.out_features
        if bias is not None:
            y = y + bias
        return y.to(x.dtype).view(*lead, layout.out_features)
