"""The tiled analog matmul: exact when ideal, fast path == slow path, periphery as specified."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hardware_backends.crossbar import (
    AnalogMatmul,
    CrossbarConfig,
    analog_units,
    dense_weight,
    exact_sum_grid,
    generator_noise,
    layout_for,
    program_crossbar,
    quantize,
    reference_tile_mvm,
    tile_mvm,
    weight_tiles,
)
from hardware_backends.noise_streams import KeyedNoise, StepStreams
from hardware_backends.pcm_model import PCMConfig

IDEAL_PCM = PCMConfig(prog_noise_scale=0.0, drift_scale=0.0, read_noise_scale=0.0)
IDEAL_XBAR = CrossbarConfig(inp_res=0.0, out_res=0.0, out_noise=0.0, bound_management="none")
YEAR = 365.0 * 86_400.0


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _matmul(weight, xbar, pcm=IDEAL_PCM, t=0.0, compensate=False, seed=0) -> AnalogMatmul:
    crossbar = program_crossbar(weight, xbar, pcm, _gen(seed))
    return AnalogMatmul(crossbar, xbar, pcm, t, compensate, _gen(seed + 1))


def test_ideal_crossbar_equals_float_linear_across_many_tiles() -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(21, 45), torch.randn(21)  # 3 x 3 tiles of 16 x 8, both padded
    x = torch.randn(5, 7, 45)
    xbar = CrossbarConfig(**{**IDEAL_XBAR.__dict__, "tile_rows": 16, "tile_cols": 8})
    for scaling in ("tile", "column"):
        cfg = CrossbarConfig(**{**xbar.__dict__, "weight_scaling": scaling})
        matmul = _matmul(weight, cfg)
        torch.testing.assert_close(matmul(x, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        assert matmul.macs == 5 * 7 * 45 * 21


def test_fast_tile_mvm_agrees_with_reference_loop() -> None:
    torch.manual_seed(1)
    weight = torch.randn(13, 37)
    # Small output bound so that bound management has to step in for many rows.
    cfg = CrossbarConfig(tile_rows=16, tile_cols=5, out_bound=1.5, out_noise=0.0)
    layout = layout_for(weight, cfg)
    blocks, _ = weight_tiles(weight, layout, cfg)
    x = layout.split_inputs(torch.randn(40, 37) * torch.rand(40, 1) * 3)
    for bm in ("iterative", "none"):
        bm_cfg = CrossbarConfig(**{**cfg.__dict__, "bound_management": bm})
        fast = tile_mvm(x, blocks, layout, bm_cfg, _gen())
        slow = reference_tile_mvm(x, blocks, layout, bm_cfg)
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6)


def test_iterative_bound_management_recovers_clipped_outputs() -> None:
    torch.manual_seed(2)
    weight = torch.rand(8, 64)  # all positive: outputs add up far beyond the bound
    x = torch.rand(32, 64)
    exact = F.linear(x, weight)
    errors = {}
    for bm in ("iterative", "none"):
        cfg = CrossbarConfig(out_noise=0.0, out_bound=4.0, bound_management=bm)
        errors[bm] = float((_matmul(weight, cfg)(x) - exact).abs().max() / exact.abs().max())
    assert errors["none"] > 0.5  # saturated at the bound
    assert errors["iterative"] < 0.05  # only quantisation error left


def test_dac_is_seven_bit_signed_and_adc_has_511_levels() -> None:
    cfg = CrossbarConfig()
    ramp = torch.linspace(-1.0, 1.0, 10_001)
    dac_levels = torch.unique(quantize(ramp, cfg.inp_res, cfg.inp_bound).clamp(-1, 1))
    assert dac_levels.numel() == 127  # -63..63 steps of 2/126
    big_ramp = torch.linspace(-20.0, 20.0, 100_001)
    adc = quantize(big_ramp, cfg.out_res, cfg.out_bound).clamp(-cfg.out_bound, cfg.out_bound)
    assert torch.unique(adc).numel() == 511  # -255..255 steps of 24/510


def test_output_noise_has_the_configured_std_in_real_units() -> None:
    # One tile, exact devices and converters: the only noise is out_noise, added in normalised
    # units, so in real units its std is out_noise * (input abs-max) * (weight scale).
    torch.manual_seed(3)
    weight = torch.randn(4, 16)
    cfg = CrossbarConfig(inp_res=0.0, out_res=0.0, out_noise=0.06, bound_management="none")
    matmul = _matmul(weight, cfg)
    n = 20_000
    x = torch.randn(n, 16)
    x = 2.5 * x / x.abs().amax(dim=1, keepdim=True)  # every row has abs-max 2.5
    residual = matmul(x) - F.linear(x, weight)  # [n, 4]
    expected = 0.06 * 2.5 * weight.abs().max()
    tolerance = 5.0 * expected / math.sqrt(2 * residual.numel())  # SE of a sample std
    assert abs(float(residual.std()) - float(expected)) <= tolerance
    assert abs(float(residual.mean())) <= 5.0 * float(expected) / math.sqrt(residual.numel())


def test_column_scaling_normalises_each_column() -> None:
    weight = torch.tensor([[1.0, -4.0], [0.5, 0.25], [0.0, 0.0]])
    cfg = CrossbarConfig(weight_scaling="column")
    blocks, scale = weight_tiles(weight, layout_for(weight, cfg), cfg)
    torch.testing.assert_close(scale, torch.tensor([[4.0, 0.5, 1.0]]))
    torch.testing.assert_close(blocks[0], torch.tensor([[0.25, -1.0], [1.0, 0.5], [0.0, 0.0]]))
    tile_blocks, tile_scale = weight_tiles(
        weight, layout_for(weight, CrossbarConfig()), CrossbarConfig()
    )
    torch.testing.assert_close(tile_scale, torch.full((1, 3), 4.0))
    assert float(tile_blocks.abs().max()) == 1.0


def test_dense_weight_inverts_the_tiling() -> None:
    weight = torch.randn(11, 37, generator=_gen(9))
    for scaling in ("tile", "column"):
        cfg = CrossbarConfig(tile_rows=8, tile_cols=4, weight_scaling=scaling)
        layout = layout_for(weight, cfg)
        blocks, scale = weight_tiles(weight, layout, cfg)
        torch.testing.assert_close(dense_weight(blocks, scale, layout), weight)


def _mean_gain(matmul: AnalogMatmul, x: torch.Tensor, weight: torch.Tensor) -> float:
    """Least-squares gain of the analog output against the exact one."""
    y, exact = matmul(x), F.linear(x, weight)
    return float((y * exact).sum() / (exact * exact).sum())


def test_drift_compensation_restores_most_but_not_all_of_the_gain() -> None:
    torch.manual_seed(4)
    weight = torch.randn(64, 128) * 0.1
    x = torch.randn(256, 128)
    pcm = PCMConfig()
    plain = _matmul(weight, CrossbarConfig(), pcm, t=YEAR, compensate=False)
    compensated = _matmul(weight, CrossbarConfig(), pcm, t=YEAR, compensate=True)
    # The weights shrink by the drift factor; measure it on the devices themselves.
    crossbar = plain.crossbar
    programmed = (crossbar.positive.g_programmed - crossbar.negative.g_programmed).abs().mean()
    drift = plain.read_normalised.abs().mean() * pcm.g_max
    shrink = float(programmed / drift)
    assert shrink > 1.3  # a year of drift at ν ≈ 0.05..0.1
    gain_plain = _mean_gain(plain, x, weight)
    gain_compensated = _mean_gain(compensated, x, weight)
    assert gain_plain < 0.8
    assert 0.85 < gain_compensated < 1.0  # under-corrects: the noise floor does not drift
    assert float(compensated.alpha.mean()) < shrink


def test_same_seed_same_chip_and_reads() -> None:
    weight = torch.randn(6, 10, generator=_gen(5))
    x = torch.randn(3, 10, generator=_gen(6))
    a = _matmul(weight, CrossbarConfig(), PCMConfig(), t=3600.0, compensate=True, seed=11)
    b = _matmul(weight, CrossbarConfig(), PCMConfig(), t=3600.0, compensate=True, seed=11)
    c = _matmul(weight, CrossbarConfig(), PCMConfig(), t=3600.0, compensate=True, seed=12)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), c(x))
    # Output noise is fresh on every call; the read conductances are not.
    assert not torch.equal(a(x), a(x))
    assert torch.equal(a.weights, b.weights)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="inp_res"):
        CrossbarConfig(inp_res=2.0)
    with pytest.raises(ValueError, match="bound_management"):
        CrossbarConfig(bound_management="shift")
    with pytest.raises(ValueError, match="matrix"):
        program_crossbar(torch.ones(3), CrossbarConfig(), PCMConfig(), _gen())
    with pytest.raises(ValueError, match="non-finite"):
        program_crossbar(torch.tensor([[float("nan")]]), CrossbarConfig(), PCMConfig(), _gen())
    matmul = _matmul(torch.ones(2, 3), CrossbarConfig())
    with pytest.raises(ValueError, match="3 input features"):
        matmul(torch.ones(4, 5))


# ---- the fast forward against the general path --------------------------------------------


FAST_CASES = {
    "one tile": dict(),
    "row tiles": dict(tile_rows=16),
    "column tiles": dict(tile_cols=8),
    "row and column tiles": dict(tile_rows=16, tile_cols=8),
}


@pytest.mark.parametrize("case", sorted(FAST_CASES))
@pytest.mark.parametrize("bound_management", ["iterative", "none"])
def test_fast_forward_equals_the_reference_loop_without_output_noise(
    case: str, bound_management: str
) -> None:
    # A small output bound makes bound management rerun many rows (and tiles).
    torch.manual_seed(11)
    weight = torch.randn(21, 45)
    cfg = CrossbarConfig(
        **FAST_CASES[case], out_noise=0.0, out_bound=2.0, bound_management=bound_management
    )
    matmul = _matmul(weight, cfg, PCMConfig(), t=3600.0)
    assert matmul.fast
    x = torch.randn(64, 45) * torch.rand(64, 1) * 3
    x[3] = 0.0  # an all-zero row: noise management divides by 1
    layout = matmul.crossbar.layout
    partial = reference_tile_mvm(layout.split_inputs(x), matmul.weights, layout, cfg)
    slow = (partial * matmul.output_scale).sum(dim=1)  # [R, out]
    assert bool((partial.abs() >= cfg.out_bound).any()), "some first pass must clip"
    torch.testing.assert_close(matmul(x), slow, rtol=1e-5, atol=1e-5)
    one_by_one = torch.cat([matmul(x[i : i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(one_by_one, slow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(FAST_CASES))
def test_fast_forward_equals_the_general_path_with_the_same_noise(case: str) -> None:
    # With output noise, the general path (tile_mvm) given the same draws computes the same.
    torch.manual_seed(12)
    weight = torch.randn(21, 45)
    cfg = CrossbarConfig(**FAST_CASES[case])
    matmul = _matmul(weight, cfg, PCMConfig(), t=86_400.0, compensate=True)
    x = torch.randn(32, 45)
    layout = matmul.crossbar.layout
    shape = (32, layout.row_tiles, layout.out_features)
    fast = matmul._forward_one_tile if layout.row_tiles == 1 else matmul._forward_tiles
    y_fast = fast(x, generator_noise(_gen(5), shape, cfg))
    y_general = matmul.reference_forward(x, generator_noise(_gen(5), shape, cfg))
    # The two round the same sums in a different order: an output may land one ADC step
    # apart where its exact value sits on a rounding boundary; nothing else may differ.
    adc_step = cfg.out_res * 2.0 * cfg.out_bound
    nm = x.abs().amax(dim=1, keepdim=True)  # one ADC step in output units, per row/column
    one_step = adc_step * nm * matmul.output_scale.abs().amax(dim=0)
    difference = (y_fast - y_general).abs()
    assert bool((difference <= one_step * 1.001 + 1e-6).all())
    assert float((difference > 1e-5).float().mean()) < 0.01
    # The noise is there: other draws give other outputs.
    other = fast(x, generator_noise(_gen(6), shape, cfg))
    assert not torch.equal(other, y_fast)


@pytest.mark.parametrize("tile_size", [512, 4096])  # float32 sums, and float64 ones
def test_a_row_gives_the_same_bits_alone_and_in_any_batch(tile_size: int) -> None:
    # BLAS sums a one-row product in another order than a batch's; on the grid of exact
    # sums the order cannot matter, so no ADC step flips between the two.
    torch.manual_seed(13)
    weight = torch.randn(96, 700)
    cfg = CrossbarConfig(tile_rows=tile_size, tile_cols=tile_size, out_noise=0.0)
    matmul = _matmul(weight, cfg, PCMConfig(), t=3600.0)
    x = torch.randn(48, 700)
    batched = matmul(x)
    alone = torch.cat([matmul(x[i : i + 1]) for i in range(48)])
    assert torch.equal(alone, batched)
    assert torch.equal(matmul(x.flip(0)), batched.flip(0))
    # The grid is fine: the weights moved far less than the programming noise does.
    unsnapped = analog_units(matmul.read_normalised, matmul.crossbar.scale, cfg)
    moved = (matmul.weights - unsnapped).abs().max() / unsnapped.abs().max()
    assert float(moved) <= 2.0**-8


def test_exact_sum_grid_holds_every_sum_exactly() -> None:
    weights = torch.randn(1, 512, 64, generator=_gen(3)) * 0.37  # [K, rows, out]
    grid = exact_sum_grid(weights, rows=512, levels=63.0)
    assert grid.dtype == torch.float32
    x = torch.randint(-63, 64, (256, 512), generator=_gen(4)).double()
    exact = x @ grid[0].double()  # float64 holds these sums exactly
    assert torch.equal((x.float() @ grid[0]).double(), exact)
    assert exact_sum_grid(weights, rows=4096, levels=63.0).dtype == torch.float64


# ---- the one-row read (a session's step) against the batch path ---------------------------


def _keyed_matmul(weight: torch.Tensor, cfg: CrossbarConfig, streams: StepStreams) -> AnalogMatmul:
    crossbar = program_crossbar(weight, cfg, PCMConfig(), _gen(0))
    noise = KeyedNoise(streams, "layer")
    return AnalogMatmul(crossbar, cfg, PCMConfig(), 86_400.0, True, _gen(1), noise=noise)


@pytest.mark.parametrize("out_bound", [12.0, 2.0])  # 2.0: most rows clip and run again
@pytest.mark.parametrize("out_noise", [0.06, 0.0])
def test_a_row_read_alone_gives_its_bits_in_a_batch_with_keyed_noise(
    out_bound: float, out_noise: float
) -> None:
    torch.manual_seed(14)
    weight = torch.randn(40, 96)
    cfg = CrossbarConfig(out_bound=out_bound, out_noise=out_noise)
    streams = StepStreams()
    matmul = _keyed_matmul(weight, cfg, streams)
    assert matmul._row is not None, "one row must take the one-row read"
    x = torch.randn(24, 96) * torch.rand(24, 1) * 3
    x[5] = 0.0  # an all-zero row: noise management divides by 1
    x[6:12] = torch.randint(0, 17, (6, 96)).float()  # pixels: DAC inputs on rounding ties
    entry = torch.stack([torch.arange(24) * 7919 + 3, torch.full((24,), 2)], dim=1)  # [B, 2]

    def step(rows: torch.Tensor, streams_entry: torch.Tensor) -> torch.Tensor:
        streams.begin(streams_entry)
        try:
            return matmul(rows)
        finally:
            streams.end()

    batched = step(x, entry)
    alone = torch.cat([step(x[i : i + 1], entry[i : i + 1]) for i in range(24)])
    assert torch.equal(alone, batched)
    # A row's noise is its own stream's: its neighbours in the batch change nothing.
    others = torch.cat([entry[:1], entry[1:] + torch.tensor([1, 0])])
    assert torch.equal(step(x, others)[0], batched[0])
    if out_noise > 0:
        assert not torch.equal(step(x[:1], entry[1:2]), batched[:1])  # another stream
    # The same read as [1, 1, in] with a bias: the same numbers, shaped and shifted.
    bias = torch.randn(40)
    streams.begin(entry[:1])
    try:
        y = matmul(x[:1].unsqueeze(0), bias)
    finally:
        streams.end()
    assert y.shape == (1, 1, 40)
    torch.testing.assert_close(y[0], batched[:1] + bias, rtol=0, atol=0)


def test_a_row_read_off_a_step_draws_as_the_batch_path_does() -> None:
    # Without a step's keys the noise comes from the generator in call order: the one-row
    # read then computes exactly what the batch path computes with the same draws.
    torch.manual_seed(15)
    weight = torch.randn(40, 96)
    cfg = CrossbarConfig(out_bound=4.0)
    matmul = _matmul(weight, cfg, PCMConfig(), t=3600.0)
    x = torch.randn(16, 96)
    state = matmul.generator.get_state()
    alone = torch.cat([matmul(x[i : i + 1]) for i in range(16)])
    matmul.generator.set_state(state)
    shape = (1, 1, 40)
    expected = torch.cat(
        [
            matmul._forward_one_tile(x[i : i + 1], generator_noise(matmul.generator, shape, cfg))
            for i in range(16)
        ]
    )
    assert torch.equal(alone, expected)


@pytest.mark.parametrize("out_bound", [12.0, 2.0])  # 2.0: most rows clip and run again
def test_a_few_rows_read_in_numpy_gives_the_torch_paths_bits(out_bound: float) -> None:
    torch.manual_seed(16)
    weight = torch.randn(40, 96)
    streams = StepStreams()
    matmul = _keyed_matmul(weight, CrossbarConfig(out_bound=out_bound), streams)
    x = torch.randn(16, 96) * torch.rand(16, 1) * 3
    x[1] = 0.0  # an all-zero row
    x[2:6] = torch.randint(0, 17, (4, 96)).float()  # pixels: DAC inputs on rounding ties
    entry = torch.stack([torch.arange(16) * 104_729 + 5, torch.full((16,), 4)], dim=1)
    for count in (2, 5, 16):
        streams.begin(entry[:count])
        try:
            few = matmul(x[:count])  # the numpy path
        finally:
            streams.end()
        streams.begin(entry[:count])
        try:
            general = matmul._forward_one_tile(x[:count], matmul._noise_draw(count))
        finally:
            streams.end()
        assert torch.equal(few, general)
    # Off a step (noise from the generator in call order) as well.
    state = matmul.generator.get_state()
    few = matmul(x[:5])
    matmul.generator.set_state(state)
    assert torch.equal(few, matmul._forward_one_tile(x[:5], matmul._noise_draw(5)))
