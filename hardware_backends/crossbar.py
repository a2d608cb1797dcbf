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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hardware_backends.noise_streams import WINDOW_PAD, KeyedNoise
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
    noise: Tensor | None,
    overwrite_input: bool = False,
) -> tuple[Tensor, float, Tensor | None]:
    """DAC -> crossbar -> output noise -> ADC on the inputs x / reduction.

    x [R, K, rows] (noise-managed), weights [K, out, rows], noise [R, K·out] standard
    normals (or None: none drawn) -> (y [R, K, out] clipped to ±out_bound, in units of the
    returned float; which outputs clipped [R, K, out], or None when none did). The same
    arithmetic as quantise-then-multiply, counted in DAC and ADC steps so that each element
    is touched as few times as possible: W·(n·step) = step·(W·n) for integer n. The input
    is divided exactly as the reference does (an input at the bound halved lands on a
    rounding tie, so the order of operations matters); with `overwrite_input` x itself is
    turned into DAC steps.
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
    if config.out_noise > 0 and noise is not None:
        y = y.add_(noise.view_as(y), alpha=config.out_noise / unit)
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


# Output noise for pass `pass_` (0: the first, then each bound-management rerun) of the rows
# `rows` (None: all), times `scale` (default 1): normals of std `scale` [P, K·out], or None
# when the periphery has none. The fast paths draw it in ADC steps and add it as it is.
NoiseDraw = Callable[..., "Tensor | None"]  # (pass_, rows, scale=1.0)


def _no_noise(pass_: int, rows: Tensor | None, scale: float = 1.0) -> None:
    return None


def generator_noise(
    generator: torch.Generator, shape: tuple[int, int, int], config: CrossbarConfig
) -> NoiseDraw:
    """Draws for a read of `shape` [R, K, out] from one sequential stream."""

    def draw(pass_: int, rows: Tensor | None, scale: float = 1.0) -> Tensor | None:
        if config.out_noise <= 0:
            return None
        count = shape[0] if rows is None else rows.numel()
        drawn = torch.randn((count, shape[1] * shape[2]), generator=generator)
        return drawn if scale == 1.0 else drawn.mul_(scale)

    return draw


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
    noise: NoiseDraw | None = None,
) -> Tensor:
    """Per-tile analog products with noise and bound management, in the units of x.

    x [R, K, rows] (inputs split over row tiles), weights [K, out, rows] (in analog units)
    -> [R, K, out]: each row tile's partial product, before the digital weight scale.
    Output noise comes from `noise`, or else from `generator` in call order.
    """
    if noise is None:
        noise = generator_noise(generator, (x.shape[0], *weights.shape[:2]), config)
    if config.noise_management == "abs_max":
        nm = x.abs().amax(dim=-1, keepdim=True)  # [R, K, 1]
        nm = torch.where(nm > 0, nm, torch.ones_like(nm))
    else:
        nm = torch.ones_like(x[..., :1])

    # The first pass may overwrite its managed input: it is rebuilt if bound management
    # needs it again.
    y, unit, clipped = _analog_pass(x / nm, 1.0, weights, config, noise(0, None), True)
    if config.bound_management == "none" or clipped is None:
        return y.mul_(nm * unit)
    result = manage_bounds(y.mul_(unit), clipped, x / nm, weights, layout, config, noise)
    return result.mul_(nm)


def manage_bounds(
    result: Tensor,
    clipped: Tensor,
    x_managed: Tensor,
    weights: Tensor,
    layout: TileLayout,
    config: CrossbarConfig,
    noise: NoiseDraw,
) -> Tensor:
    """Iterative bound management (aihwkit) after a first pass that clipped.

    result [R, K, out]: the first pass in the units of the managed input x_managed
    [R, K, rows], overwritten in place where a rerun is accepted; clipped [R, K, out]. The
    inputs of a tile whose ADC clipped are halved and run again, until they fit or would
    sink below max_bm_res DAC steps. Only the rows with a pending tile are run again, as
    the chip reruns only those vectors.
    """
    give_up_above = _largest_input_reduction(config)
    if give_up_above < 1.0:  # not even one halving allowed: keep the clipped outputs
        return result
    pending = layout.tile_any(clipped)  # [R, K, col_tiles]
    reduction, pass_ = 1.0, 0
    while True:
        rows = pending.flatten(1).any(dim=1).nonzero().squeeze(1)  # [P] rows still pending
        if rows.numel() == 0:
            return result
        reduction, pass_ = reduction * 2.0, pass_ + 1
        y, unit, clipped = _analog_pass(
            x_managed[rows], reduction, weights, config, noise(pass_, rows)
        )
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


SCRATCH_SIZES = 4  # batch sizes whose scratch buffers a matmul keeps
FEW_ROWS = 16  # reads of up to this many rows run their elementwise ops in numpy
ONE_FLOAT32 = np.float32(1.0)  # the noise-management divisor of an all-zero row
_largest = np.maximum.reduce  # the largest element of a 1-d array, as a numpy scalar


class RowScratch:
    """The buffers of a read of one row (numpy [in] and [out]) or of a few (numpy [R, in] and
    [R, out]) on one row tile, as numpy arrays and, where torch computes on them too, as
    tensors on the same memory."""

    def __init__(self, in_features: int, out_features: int, count: int | None = None) -> None:
        rows = 1 if count is None else count
        x_dac = np.empty((rows, in_features), dtype=np.float32)  # DAC steps
        self.x_dac_tensor = torch.from_numpy(x_dac)  # [R, in]
        self.y_tensor = torch.empty(rows, out_features)  # [R, out], ADC steps
        self.noise_tensor = torch.empty(1, out_features)  # [1, out], output noise, ADC steps
        self.noise = self.noise_tensor.numpy()[0]  # [out]
        magnitudes = np.empty((rows, out_features), dtype=np.float32)
        self.table: np.ndarray | None = None  # the keyed noise's table in ADC steps, once used
        if count is None:  # one row: 1-d views, whose numpy calls are the cheapest
            self.x_dac, self.y, self.magnitudes = x_dac[0], self.y_tensor.numpy()[0], magnitudes[0]
        else:
            self.x_dac, self.y, self.magnitudes = x_dac, self.y_tensor.numpy(), magnitudes


EXACT_GRID_MIN_BITS = 8  # the finest a float32 grid must be; coarser needs float64


def exact_sum_grid(weights: Tensor, rows: int, levels: float) -> Tensor:
    """`weights` [K, rows, out] (ADC steps per DAC step) rounded onto a grid of a power of
    two, fine enough to lose nothing the device would notice and coarse enough that every
    sum of `rows` products with integer DAC steps (|n| <= levels) is exact in float32 --
    or in float64 when float32 could only hold a grid coarser than 2^-8 of the largest
    weight. Exact sums do not depend on the order a BLAS kernel adds them in, which differs
    with the number of rows of a batch: a row's result is then the same alone or batched,
    bit for bit. Returns contiguous float32 or float64 [K, rows, out].

    The grid is at most 2^-9 of the largest weight for 512-row tiles with aihwkit's 7-bit
    DAC (a rounding error of about 0.1% of g_max rms, an order of magnitude below the
    programming noise)."""
    largest = float(weights.abs().max())
    if largest == 0:
        return weights.contiguous()
    top = math.ceil(math.log2(largest))  # |weight| <= 2^top
    products = rows * math.ceil(levels)  # |sum| <= products · 2^top
    dtype, mantissa = torch.float32, 24
    bits = math.floor(math.log2(2.0**mantissa / products))
    if bits < EXACT_GRID_MIN_BITS:
        dtype, mantissa = torch.float64, 53
        bits = min(30, math.floor(math.log2(2.0**mantissa / products)))
    unit = 2.0 ** (top - bits)
    return (weights.double() / unit).round_().mul_(unit).to(dtype).contiguous()


class AnalogMatmul:
    """``F.linear`` on a programmed crossbar at a fixed time since programming.

    The chip is read at ``t_inference`` once, here: drift and the accumulated 1/f read noise
    belong to (chip, inference time), as in the device model, so every call multiplies with
    the same conductances. Only the output noise is drawn per call: per sequence from
    `noise` while a runner's step has set its sequences' keys (so a row's result never
    depends on the other rows of its batch), else from ``generator`` in call order. The
    drift-compensation factor is measured once here too, as the chip would after waking up
    (its probe's output noise from ``probe_generator`` when given, else from ``generator``).
    Counts the multiply-accumulates it executed in ``macs``.

    Everything a read needs is prepared here, so that a call is a few whole-batch tensor
    operations: noise management, DAC, one matmul over all tiles (the tiles' weights in ADC
    steps per DAC step, on the grid of exact sums, `exact_sum_grid`), output noise, ADC, one
    clip check, the digital scale. The output noise is drawn in ADC steps (the keyed noise
    from its table scaled once, `gaussian_table(scale)`) and added as it is, no multiply per
    read. One row (a session's step) takes `_forward_one_row`, up to FEW_ROWS rows
    `_forward_few_rows`: the same arithmetic on numpy views of reused buffers. Bound
    management, when an output clipped, reruns only the rows concerned. Configurations
    without abs-max noise management, a DAC and an ADC take the general path, `tile_mvm`,
    which is also the reference the fast path is tested against. One caller at a time (a
    runner's lock): a call keeps no state between calls but the MAC counter and the
    generator (and scratch buffers it overwrites).
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
        noise: KeyedNoise | None = None,
        probe_generator: torch.Generator | None = None,
    ) -> None:
        self.crossbar, self.config, self.pcm = crossbar, config, pcm
        self.t_inference = float(t_inference)
        self.generator = generator
        self.noise = noise
        self.macs = 0
        layout = crossbar.layout
        read = read_weights(crossbar, self.t_inference, pcm, read_generator or generator)
        self.read_normalised = read  # [K, out, rows], the array as read at t_inference
        self.weights = analog_units(read, crossbar.scale, config)  # [K, out, rows]
        self._tiles = layout.row_tiles
        self._col_tiles = layout.col_tiles
        self._macs_per_row = layout.in_features * layout.out_features
        self._one_row_shape = torch.Size([1, layout.in_features])
        self._prepare_fast_path()  # puts self.weights on the grid of exact sums
        alpha = torch.ones(layout.row_tiles, layout.col_tiles)  # [K, col_tiles]
        if drift_compensation:
            if crossbar.reference_readout is None:
                raise ValueError("drift compensation needs a crossbar programmed with a reference")
            now = probe_readout(self.weights, layout, config, probe_generator or generator)
            alpha = crossbar.reference_readout / now
        self.alpha = alpha
        digital = digital_scale(crossbar.scale, config)  # [K, out]
        self.output_scale = digital * layout.per_column(alpha)  # [K, out]
        if self.fast:
            adc_step = config.out_res * 2.0 * config.out_bound
            self._scale_per_step = self.output_scale * adc_step  # [K, out]
            self._scale_one_tile = self._scale_per_step[0]  # [out]
        self._row: RowScratch | None = None
        self._few_rows: dict[int, RowScratch] = {}  # batch size -> scratch
        one_row = self.fast and self._tiles == 1 and layout.out_features <= WINDOW_PAD
        if one_row and self._weights_one_tile.dtype == torch.float32:
            self._row = RowScratch(layout.in_features, layout.out_features)

    def _prepare_fast_path(self) -> None:
        config = self.config
        dac_step = config.inp_res * 2.0 * config.inp_bound
        adc_step = config.out_res * 2.0 * config.out_bound
        self.fast = config.noise_management == "abs_max" and dac_step > 0 and adc_step > 0
        if not self.fast:
            return
        # Scalars as 0-dim tensors: an in-place op with a Python float wraps it anew per call.
        self._dac_step = torch.tensor(dac_step)
        self._dac_step_float32 = np.float32(dac_step)  # the same value, for numpy
        self._noisy = config.out_noise > 0
        self._dac_levels = config.inp_bound / dac_step
        # |x / abs-max| <= 1 never needs the DAC clip when the range reaches 1.
        self._dac_clips = config.inp_bound < 1.0
        self._adc_bound = config.out_bound / adc_step  # the ADC's range in ADC steps
        self._noise_in_steps = config.out_noise / adc_step
        # [K, rows, out]: one DAC step of input times a weight, in ADC steps, on the grid of
        # exact sums; every path computes with these weights (the reference, the probes).
        in_steps = (self.weights * (dac_step / adc_step)).transpose(1, 2)
        self._weights_in_steps = exact_sum_grid(
            in_steps, self.crossbar.layout.rows, self._dac_levels
        )
        self.weights = (self._weights_in_steps.double() * (adc_step / dac_step)).float()
        self.weights = self.weights.transpose(1, 2).contiguous()  # [K, out, rows]
        self._weights_one_tile = self._weights_in_steps[0]  # [in, out]
        self._one = torch.ones(1, 1)
        self._buffers: dict[int, tuple[Tensor, Tensor]] = {}  # batch size -> scratch

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        # One row [1, in], a session's step: the checks kept short.
        one_row = x.shape == self._one_row_shape and x.dtype is torch.float32
        if one_row and self._row is not None and not x.requires_grad:
            self.macs += self._macs_per_row
            y = self._forward_one_row(x)  # [1, out]
            return y if bias is None else y + bias
        layout = self.crossbar.layout
        if x.shape[-1] != layout.in_features:
            raise ValueError(
                f"crossbar expects {layout.in_features} input features, got {x.shape[-1]}"
            )
        plain = x.dim() == 2 and x.dtype == torch.float32
        rows = x if plain else x.reshape(-1, layout.in_features).float()  # [R, in]
        count = rows.shape[0]
        self.macs += count * self._macs_per_row
        if count == 1 and self._row is not None and not rows.requires_grad:
            y = self._forward_one_row(rows)  # [1, out]
            if bias is not None:
                y = y + bias
            return y if plain else y.to(x.dtype).view(*x.shape[:-1], layout.out_features)
        noise = self._noise_draw(count)
        if not self.fast:
            y = self.reference_forward(rows, noise)
        elif self._tiles == 1:
            if count <= FEW_ROWS and self._row is not None and not rows.requires_grad:
                y = self._forward_few_rows(rows, noise)  # [R, out]
            else:
                y = self._forward_one_tile(rows, noise)  # [R, out]
        else:
            y = self._forward_tiles(rows, noise)
        if bias is not None:
            y = y + bias
        if plain:
            return y
        return y.to(x.dtype).view(*x.shape[:-1], layout.out_features)

    def _noise_draw(self, rows: int, call: int | None = None) -> NoiseDraw:
        """This call's output noise: keyed per sequence inside a step (read `call` of the
        matrix in the step, None: the next), else the generator."""
        layout = self.crossbar.layout
        shape = (rows, self._tiles, layout.out_features)
        if self.noise is None or not self.noise.active:
            return generator_noise(self.generator, shape, self.config)
        if self.config.out_noise <= 0:
            return _no_noise
        keyed, length = self.noise, self._tiles * layout.out_features
        if call is None:
            call = keyed.next_call()

        def draw(pass_: int, selected: Tensor | None, scale: float = 1.0) -> Tensor:
            drawn = keyed.draw(rows, length, call, pass_, scale)  # [R, K·out], [K·out] if R = 1
            return drawn if selected is None else drawn.view(rows, length)[selected]

        return draw

    def reference_forward(self, rows: Tensor, noise: NoiseDraw) -> Tensor:
        """The general path: `tile_mvm` per tile, then the digital scale and tile sum."""
        layout = self.crossbar.layout
        partial = tile_mvm(
            layout.split_inputs(rows), self.weights, layout, self.config, self.generator, noise
        )  # [R, K, out]
        if layout.row_tiles == 1:
            return partial[:, 0] * self.output_scale[0]  # [R, out]
        return (partial * self.output_scale).sum(dim=1)  # [R, out], digital sum over row tiles

    def _managed(self, amax: Tensor) -> Tensor:
        """The noise-management divisor: the abs-max, or 1 for an all-zero input."""
        return torch.where(amax > 0, amax, self._one)

    def _forward_one_tile(self, rows: Tensor, noise: NoiseDraw) -> Tensor:
        """rows [R, in] on one row tile -> [R, out]: the arithmetic of `reference_forward`
        in a few whole-batch operations."""
        count = rows.shape[0]
        weights = self._weights_one_tile  # [in, out]
        x_dac, y = self._scratch(count)  # [R, in], [R, out] reused between calls, or None
        if count == 1:  # one row: a whole-tensor max and a Python test are cheaper
            amax = torch.linalg.vector_norm(rows, math.inf)  # [], the same value as the row's
            nm = amax if float(amax) > 0 else self._one
        else:
            amax = torch.abs(rows, out=x_dac).amax(dim=1, keepdim=True)  # [R, 1]
            nm = self._managed(amax)
        x_dac = torch.div(rows, nm, out=x_dac).div_(self._dac_step).round_()  # DAC steps
        if self._dac_clips:
            x_dac.clamp_(-self._dac_levels, self._dac_levels)
        drawn = noise(0, None, self._noise_in_steps)  # [R, out] ([out] for one row), or None
        y = torch.mm(x_dac.to(weights.dtype), weights, out=y)  # [R, out], exact
        if drawn is not None:
            y = y.add_(drawn)  # output noise in ADC steps
        y = y.round_().float()  # [R, out], ADC steps
        low, high = torch.aminmax(y)
        if float(high) > self._adc_bound or float(low) < -self._adc_bound:
            y = self._clipped_one_tile(y, rows / nm, noise)
        return torch.mul(y.mul_(nm), self._scale_one_tile)  # a fresh [R, out] for the caller

    def _clipped_one_tile(self, y: Tensor, x_managed: Tensor, noise: NoiseDraw) -> Tensor:
        """A first pass on one row tile, y [R, out] in ADC steps, that clipped: clipped, and
        rerun as bound management has it. x_managed [R, in]. Returns ADC steps [R, out]."""
        if self._col_tiles == 1:
            return self._rerun_one_tile(y, x_managed, noise)
        return self._manage_bounds(y.unsqueeze(1), x_managed.unsqueeze(1), noise)[:, 0]

    def _forward_one_row(self, row: Tensor) -> Tensor:
        """row [1, in] (float32) on one row tile -> a fresh [1, out]: `_forward_one_tile`'s
        arithmetic op for op, so bit for bit, with the output noise drawn as `_noise_draw`
        draws it. On one row every op costs its dispatch more than its arithmetic, so the
        elementwise ops run on numpy views of reused buffers (a fraction of a tensor op's
        fixed cost); the matmul stays torch's."""
        scratch, keyed = self._row, self.noise
        if keyed is not None and keyed.streams.key is not None:  # a step of one sequence
            call = keyed.next_call()
            if self._noisy:
                table = self._row_table() if scratch.table is None else scratch.table
                keyed.draw_one_row(scratch.noise, call, table)
        else:
            call = self._draw_one_row(scratch)  # the noise into scratch.noise, if noisy
        # numpy ufuncs with the output as the last positional argument (a keyword costs more)
        x = row.numpy()[0]  # [in]
        x_dac = scratch.x_dac  # [in]
        nm = _largest(np.abs(x, x_dac))  # float32 abs-max
        if not nm > 0:
            nm = ONE_FLOAT32
        np.divide(x, nm, x_dac)
        np.divide(x_dac, self._dac_step_float32, x_dac)
        np.rint(x_dac, x_dac)  # DAC steps (rint rounds half to even, as torch.round)
        if self._dac_clips:
            np.clip(x_dac, -self._dac_levels, self._dac_levels, out=x_dac)
        y_tensor = scratch.y_tensor  # [1, out]
        torch.mm(scratch.x_dac_tensor, self._weights_one_tile, out=y_tensor)  # exact
        y = scratch.y  # [out], y_tensor's memory
        if self._noisy:
            np.add(y, scratch.noise, y)  # output noise, in ADC steps
        np.rint(y, y)  # ADC steps
        if _largest(np.abs(y, scratch.magnitudes)) > self._adc_bound:
            noise = self._noise_draw(1, call)  # reruns draw passes 1, 2, ... of this read
            y = self._clipped_one_tile(y_tensor.clone(), row / float(nm), noise)
            return torch.mul(y.mul_(float(nm)), self._scale_one_tile)
        np.multiply(y, nm, y)
        return torch.mul(y_tensor, self._scale_one_tile)  # a fresh [1, out]

    def _forward_few_rows(self, rows: Tensor, noise: NoiseDraw) -> Tensor:
        """rows [R, in] (float32, R <= FEW_ROWS) on one row tile -> a fresh [R, out]:
        `_forward_one_tile`'s arithmetic op for op, so bit for bit, its elementwise ops on
        numpy views of reused buffers, as `_forward_one_row` does for one row."""
        scratch = self._few_rows_scratch(rows.shape[0])
        x, x_dac = rows.numpy(), scratch.x_dac  # [R, in], [R, in]
        nm = _largest(np.abs(x, x_dac), axis=1, keepdims=True)  # [R, 1] float32 abs-max
        nm[~(nm > 0)] = 1.0  # an all-zero row: divide by 1
        np.divide(x, nm, x_dac)
        np.divide(x_dac, self._dac_step_float32, x_dac)
        np.rint(x_dac, x_dac)  # DAC steps
        if self._dac_clips:
            np.clip(x_dac, -self._dac_levels, self._dac_levels, out=x_dac)
        drawn = noise(0, None, self._noise_in_steps)  # [R, out] in ADC steps, or None
        y_tensor = scratch.y_tensor  # [R, out]
        torch.mm(scratch.x_dac_tensor, self._weights_one_tile, out=y_tensor)  # exact
        y = scratch.y  # [R, out], y_tensor's memory
        if drawn is not None:
            np.add(y, drawn.numpy(), y)
        np.rint(y, y)  # ADC steps
        if _largest(np.abs(y, scratch.magnitudes), axis=None) > self._adc_bound:
            nm_tensor = torch.from_numpy(nm)  # [R, 1]
            y = self._clipped_one_tile(y_tensor.clone(), rows / nm_tensor, noise)
            return torch.mul(y.mul_(nm_tensor), self._scale_one_tile)
        np.multiply(y, nm, y)
        return torch.mul(y_tensor, self._scale_one_tile)  # a fresh [R, out]

    def _few_rows_scratch(self, count: int) -> RowScratch:
        """`RowScratch` for reads of `count` rows, kept for SCRATCH_SIZES batch sizes."""
        scratch = self._few_rows.get(count)
        if scratch is None:
            if len(self._few_rows) >= SCRATCH_SIZES:
                self._few_rows.pop(next(iter(self._few_rows)))
            layout = self.crossbar.layout
            scratch = RowScratch(layout.in_features, layout.out_features, count)
            self._few_rows[count] = scratch
        return scratch

    def _draw_one_row(self, scratch: RowScratch) -> int | None:
        """The first pass's output noise of a one-row read, in ADC steps, into scratch.noise
        (when the periphery has any), as `_noise_draw` draws it: keyed inside a step, else
        from the generator. Returns the read's call index in the step (None off a step)."""
        keyed, scale = self.noise, self._noise_in_steps
        if keyed is None or not keyed.active:
            if self._noisy:
                noise = scratch.noise_tensor
                torch.randn(noise.shape, generator=self.generator, out=noise).mul_(scale)
            return None
        call = keyed.next_call()
        if self._noisy and not keyed.draw_one_row(scratch.noise, call, self._row_table()):
            length = scratch.noise.shape[0]  # a step of several sequences: the general draw
            scratch.noise_tensor.copy_(keyed.draw(1, length, call, 0, scale).view(1, length))
        return call

    def _row_table(self) -> np.ndarray:
        """The keyed noise's table in ADC steps, as numpy, kept in the one-row scratch."""
        self._row.table = self.noise.table_array(self._noise_in_steps)
        return self._row.table

    def _scratch(self, count: int) -> tuple[Tensor | None, Tensor | None]:
        """Buffers for a read of `count` rows, [R, in] float32 and [R, out] in the weights'
        dtype, reused between calls of the same size (a fresh 0.5 MiB tensor per call costs
        more than the arithmetic on it); (None, None) for one row (nothing large to reuse)."""
        if count == 1:
            return None, None
        buffers = self._buffers.get(count)
        if buffers is None:
            layout, dtype = self.crossbar.layout, self._weights_one_tile.dtype
            buffers = (
                torch.empty(count, layout.in_features),
                torch.empty(count, layout.out_features, dtype=dtype),
            )
            if len(self._buffers) >= SCRATCH_SIZES:
                self._buffers.pop(next(iter(self._buffers)))
            self._buffers[count] = buffers
        return buffers

    def _rerun_one_tile(self, y: Tensor, x_managed: Tensor, noise: NoiseDraw) -> Tensor:
        """`manage_bounds` for a matrix on one tile: y [R, out] (ADC steps) of a first pass
        that clipped, x_managed [R, in]. Rows that clipped run again with their input halved
        until they fit or would sink below max_bm_res DAC steps. Returns ADC steps [R, out]
        (a rerun's outputs times its input reduction)."""
        bound = self._adc_bound
        pending = (y.abs() > bound).any(dim=1)  # [R]
        y = y.clamp_(-bound, bound)
        give_up_above = _largest_input_reduction(self.config)
        if self.config.bound_management == "none" or give_up_above < 1.0:
            return y
        reduction, pass_ = 1.0, 0
        while True:
            rows = pending.nonzero().squeeze(1)  # [P]
            if rows.numel() == 0:
                return y
            reduction, pass_ = reduction * 2.0, pass_ + 1
            x_dac = (x_managed[rows] / reduction).div_(self._dac_step).round_()  # [P, in]
            if self._dac_clips:
                x_dac.clamp_(-self._dac_levels, self._dac_levels)
            drawn = noise(pass_, rows, self._noise_in_steps)  # [P, out], ADC steps
            rerun = torch.mm(x_dac.to(self._weights_one_tile.dtype), self._weights_one_tile)
            if drawn is not None:
                rerun = rerun.add_(drawn)
            rerun = rerun.round_().float()  # [P, out], ADC steps
            if reduction > give_up_above:
                accept = torch.ones_like(rows, dtype=torch.bool)  # give up: keep it clipped
            else:
                accept = ~(rerun.abs() > bound).any(dim=1)  # [P]
            accepted = rows[accept]
            y[accepted] = rerun[accept].clamp_(-bound, bound).mul_(reduction)
            pending[accepted] = False

    def _forward_tiles(self, rows: Tensor, noise: NoiseDraw) -> Tensor:
        """rows [R, in] over K row tiles -> [R, out]: one batched matmul for all tiles."""
        x = self.crossbar.layout.split_inputs(rows)  # [R, K, rows]
        nm = self._managed(x.abs().amax(dim=2, keepdim=True))  # [R, K, 1]
        x_dac = (x / nm).div_(self._dac_step).round_()  # [R, K, rows], DAC steps
        if self._dac_clips:
            x_dac.clamp_(-self._dac_levels, self._dac_levels)
        weights = self._weights_in_steps  # [K, rows, out]
        y = torch.bmm(x_dac.transpose(0, 1).to(weights.dtype), weights).transpose(0, 1)  # exact
        drawn = noise(0, None, self._noise_in_steps)  # [R, K·out], ADC steps
        if drawn is not None:
            y = y.add_(drawn.view_as(y))
        y = y.round_().float()  # [R, K, out], ADC steps
        low, high = torch.aminmax(y)
        if float(high) > self._adc_bound or float(low) < -self._adc_bound:
            y = self._manage_bounds(y, x / nm, noise)
        return (y.mul_(nm) * self._scale_per_step).sum(dim=1)  # [R, out], digital tile sum

    def _manage_bounds(self, y: Tensor, x_managed: Tensor, noise: NoiseDraw) -> Tensor:
        """A first pass in ADC steps [R, K, out] that clipped: clip it, and with iterative
        bound management rerun the clipped tiles' rows. Returns ADC steps [R, K, out]."""
        clipped = y.abs() > self._adc_bound  # [R, K, out]
        y = y.clamp_(-self._adc_bound, self._adc_bound)
        if self.config.bound_management == "none":
            return y
        adc_step = self.config.out_res * 2.0 * self.config.out_bound
        layout = self.crossbar.layout
        units = manage_bounds(
            y.mul_(adc_step), clipped, x_managed, self.weights, layout, self.config, noise
        )  # [R, K, out] in the units of x_managed
        return units.div_(adc_step)
