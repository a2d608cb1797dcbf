"""The analog_imc backend on real models: routing, exactness in the ideal limit, drift, usage."""

from __future__ import annotations

import pytest
import torch

from hardware_backends.analog_imc import AnalogIMCBackend, AnalogIMCConfig
from hardware_backends.base import Runner
from hardware_backends.crossbar import CrossbarConfig
from hardware_backends.energy import ANALOG_PCM, DIGITAL_FP32
from hardware_backends.noise_streams import NOISE_STREAM, seed_streams, stream_of
from hardware_backends.pcm_model import PCMConfig
from hardware_backends.routing import find_linear_weights
from models.lru import LRUConfig, LRUModel
from models.selective import SelectiveConfig, SelectiveModel
from models.snn import SNNConfig, SNNModel

YEAR = 365.0 * 86_400.0
IDEAL = AnalogIMCConfig(
    crossbar=CrossbarConfig(inp_res=0.0, out_res=0.0, out_noise=0.0, bound_management="none"),
    pcm=PCMConfig(prog_noise_scale=0.0, drift_scale=0.0, read_noise_scale=0.0),
)


def _lru(seed: int = 0) -> LRUModel:
    torch.manual_seed(seed)
    return LRUModel(LRUConfig(d_model=16, d_state=12, n_layers=2)).eval()


def _selective_tokens(seed: int = 0) -> SelectiveModel:
    torch.manual_seed(seed)
    cfg = SelectiveConfig(vocab_size=20, d_output=20, d_model=16, d_state=4, n_layers=1)
    return SelectiveModel(cfg).eval()


def _snn(seed: int = 0) -> SNNModel:
    torch.manual_seed(seed)
    return SNNModel(SNNConfig(d_model=24, n_layers=2)).eval()


def _digits_like(batch: int = 6, steps: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, steps, 8, generator=torch.Generator().manual_seed(seed)) * 16


def test_finds_every_linear_weight_and_only_those() -> None:
    lru = find_linear_weights(_lru())
    expected = {"encoder.proj.weight", "head.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.lru.{m}" for m in ("B_re", "B_im", "C_re", "C_im")}
        expected.add(f"layers.{i}.mixer.proj.weight")
    assert set(lru) == expected

    selective = find_linear_weights(_selective_tokens())
    assert set(selective) == {
        "encoder.embed.weight",  # as the tied head; its lookups stay digital
        "layers.0.mixer.in_proj.weight",
        "layers.0.mixer.x_proj.weight",
        "layers.0.mixer.dt_proj.weight",
        "layers.0.mixer.out_proj.weight",
    }  # A_log (2-D, elementwise) and the depthwise conv stay digital


@pytest.mark.parametrize(
    "factory", [_lru, _selective_tokens, _snn], ids=["lru", "selective", "snn"]
)
def test_ideal_chip_reproduces_the_float_model(factory) -> None:
    model = factory()
    x = _digits_like() if model.input_kind == "features" else torch.randint(0, 20, (6, 5))
    runner = AnalogIMCBackend(IDEAL).prepare(model, model_key="m/1")
    assert isinstance(runner, Runner)
    with torch.no_grad():
        expected, expected_state = model(x)
    logits, state, _ = runner.run(x)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    stepped, _, _ = runner.run_by_steps(x)  # the reference path agrees
    torch.testing.assert_close(stepped, expected, rtol=1e-4, atol=1e-4)
    for name in expected_state:
        torch.testing.assert_close(state[name], expected_state[name], rtol=1e-4, atol=1e-4)


def test_usage_prices_crossbar_and_digital_work_separately() -> None:
    model = _lru()
    runner = AnalogIMCBackend().prepare(model, model_key="lru/1")
    x = _digits_like(batch=3, steps=4)
    _, _, usage = runner.run(x)
    dense = model.macs_per_step()["dense_macs"] * 3 * 4
    cfg = model.config
    # Λ·h (complex), γ scaling and D·u stay digital in each LRU layer.
    digital = (6 * cfg.d_state + cfg.d_model) * cfg.n_layers * 3 * 4
    assert usage.macs == dense
    expected = (dense - digital) * ANALOG_PCM.mac_joules + digital * DIGITAL_FP32.mac_joules
    assert usage.energy_joules == pytest.approx(expected, rel=1e-9)
    _, _, step_usage = runner.step(x[:, 0], runner.init_state(3))
    assert step_usage.energy_joules == pytest.approx(expected / 4, rel=1e-9)


def test_spiking_usage_prices_spike_driven_and_digital_work() -> None:
    model = _snn()
    runner = AnalogIMCBackend().prepare(model, model_key="snn/1")
    x = _digits_like(batch=5, steps=8) * 4  # strong input: the random network spikes
    _, _, usage = runner.run(x)
    counts, rows = model.macs_per_step(), 5 * 8
    encoder = model.encoder.macs() * rows  # dense input projection, on the crossbar
    decays = counts["dense_macs"] * rows - encoder  # membrane and current decays, digital
    assert usage.macs == counts["dense_macs"] * rows
    assert 0 < usage.spikes <= usage.neuron_steps == rows * 2 * 24
    expected = (
        encoder * ANALOG_PCM.mac_joules
        + decays * DIGITAL_FP32.mac_joules
        + usage.accumulates * ANALOG_PCM.accumulate_joules  # one spike row read each
    )
    assert usage.energy_joules == pytest.approx(expected, rel=1e-9)
    dense_equivalent = (encoder + counts["synaptic_ops_max"] * rows) * ANALOG_PCM.mac_joules
    dense_equivalent += decays * DIGITAL_FP32.mac_joules
    assert usage.dense_equivalent_energy_joules == pytest.approx(dense_equivalent, rel=1e-9)


def _relative_error(runner, model, x) -> float:
    with torch.no_grad():
        exact, _ = model(x)
    logits, _, _ = runner.run(x)
    return float((logits - exact).norm() / exact.norm())


def test_drift_compensation_keeps_a_year_old_chip_closer_to_the_float_model() -> None:
    model = _lru()
    x = _digits_like(batch=64, steps=8)
    backend = AnalogIMCBackend()
    fresh = _relative_error(backend.prepare(model, model_key="lru/1"), model, x)
    options = {"t_inference": YEAR, "drift_compensation": False}
    drifted = _relative_error(backend.prepare(model, model_key="lru/1", options=options), model, x)
    options["drift_compensation"] = True
    compensated = _relative_error(
        backend.prepare(model, model_key="lru/1", options=options), model, x
    )
    assert fresh < compensated < drifted


def test_chip_is_programmed_once_per_seed_and_reads_are_reproducible() -> None:
    model = _lru()
    backend = AnalogIMCBackend()
    hour = backend.prepare(model, model_key="lru/1", options={"t_inference": 3600.0})
    day = backend.prepare(model, model_key="lru/1", options={"t_inference": 86_400.0})
    other = backend.prepare(model, model_key="lru/1", options={"seed": 1})
    name = "head.weight"
    assert hour.engines[name].crossbar is day.engines[name].crossbar
    assert other.engines[name].crossbar is not hour.engines[name].crossbar

    x = _digits_like()
    again = AnalogIMCBackend().prepare(model, model_key="lru/1", options={"t_inference": 3600.0})
    first, _, _ = hour.run(x)
    torch.testing.assert_close(again.run(x)[0], first, rtol=0, atol=0)
    assert not torch.equal(other.run(x)[0], first)


def test_runner_snapshot_is_isolated_from_later_model_changes() -> None:
    model = _lru()
    runner = AnalogIMCBackend(IDEAL).prepare(model, model_key="lru/1")
    x = _digits_like()
    before, _, _ = runner.run(x)
    with torch.no_grad():
        model.head.weight.mul_(3.0)
    torch.testing.assert_close(runner.run(x)[0], before, rtol=1e-5, atol=1e-5)


def test_bad_options_and_inputs_raise_clear_errors() -> None:
    backend = AnalogIMCBackend()
    model = _lru()
    with pytest.raises(ValueError, match="t_inferense"):
        backend.prepare(model, model_key="lru/1", options={"t_inferense": 1.0})
    with pytest.raises(ValueError, match="t_inference"):
        backend.prepare(model, model_key="lru/1", options={"t_inference": -1.0})
    with pytest.raises(ValueError, match="stuck"):
        backend.prepare(
            model,
            model_key="lru/1",
            options={"stuck_at_zero_fraction": 0.8, "stuck_at_gmax_fraction": 0.8},
        )
    runner = backend.prepare(model, model_key="lru/1")
    with pytest.raises(ValueError, match="batch"):
        runner.init_state(0)
    with pytest.raises(ValueError, match="feature"):
        runner.run(torch.ones(2, 3, 5))


def test_a_reused_model_key_never_serves_another_model_s_chip() -> None:
    backend = AnalogIMCBackend(IDEAL)
    x = _digits_like()
    for seed in (0, 1):
        model = _lru(seed)
        logits, _, _ = backend.prepare(model, model_key="same/1").run(x)
        with torch.no_grad():
            torch.testing.assert_close(logits, model(x)[0], rtol=1e-4, atol=1e-4)


def test_noise_follows_the_steps_so_chunks_and_whole_sequences_agree() -> None:
    model = _lru()
    x = _digits_like(batch=4, steps=6)
    backend = AnalogIMCBackend()
    whole, whole_state, _ = backend.prepare(model, model_key="lru/1").run(x)
    chunked = backend.prepare(model, model_key="lru/1")
    first, state, _ = chunked.run(x[:, :2])
    second, state, _ = chunked.run(x[:, 2:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=0, atol=0)
    for name in state:
        torch.testing.assert_close(state[name], whole_state[name], rtol=0, atol=0)


def test_read_noise_is_per_chip_and_time_so_batch_neighbours_change_nothing() -> None:
    # Periphery noise and quantisation off: what is left is the chip as read at t (programming
    # noise, drift, accumulated read noise). A sequence then gets the same logits alone on a
    # fresh runner as inside a larger batch on a runner that has served other calls before.
    model = _lru()
    options = {"t_inference": 3600.0, "out_noise": 0.0, "inp_res": 0.0, "out_res": 0.0}
    x = _digits_like(batch=8, steps=5)
    backend = AnalogIMCBackend()
    alone, _, _ = backend.prepare(model, model_key="lru/1", options=options).run(x[:1])
    busy = backend.prepare(model, model_key="lru/1", options=options)
    busy.run(_digits_like(batch=3, steps=4, seed=9))  # other traffic first
    batched, _, _ = busy.run(x)
    torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-5)
    # The read noise is there: an ideal chip gives other logits.
    ideal, _, _ = AnalogIMCBackend(IDEAL).prepare(model, model_key="lru/1").run(x[:1])
    assert (ideal - alone).abs().max() > 1e-3


def test_output_noise_is_drawn_per_call() -> None:
    model = _lru()
    runner = AnalogIMCBackend().prepare(model, model_key="lru/1")
    x = _digits_like(batch=2, steps=3)
    first, _, _ = runner.run(x)
    second, _, _ = runner.run(x)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("mapping", ["rescaled", "raw"])
def test_both_weight_mappings_are_exact_on_an_ideal_chip(mapping: str) -> None:
    model = _lru()
    ideal = AnalogIMCBackend(IDEAL)
    runner = ideal.prepare(model, model_key="lru/1", options={"weight_mapping": mapping})
    x = _digits_like()
    with torch.no_grad():
        torch.testing.assert_close(runner.run(x)[0], model(x)[0], rtol=1e-4, atol=1e-4)


def test_raw_mapping_puts_output_noise_in_weight_units() -> None:
    # Weights well below 1: in raw units the same output noise is a far larger error.
    model = _lru()
    x = _digits_like(batch=32, steps=5)
    noise_only = {"prog_noise_scale": 0.0, "read_noise_scale": 0.0, "drift_scale": 0.0}
    errors = {}
    for mapping in ("rescaled", "raw"):
        options = noise_only | {"weight_mapping": mapping}
        runner = AnalogIMCBackend().prepare(model, model_key="lru/1", options=options)
        errors[mapping] = _relative_error(runner, model, x)
    assert errors["raw"] > 2.0 * errors["rescaled"]


def test_a_sequence_gets_the_same_answers_alone_or_in_any_batch() -> None:
    # Full periphery: each sequence's output noise follows its own stream and steps, so a
    # sequence stepped alone gives what it gives inside a batch, wherever it sits there.
    model, backend = _lru(), AnalogIMCBackend()
    x = _digits_like(batch=5, steps=4)
    streams = [stream_of(f"session-{i}") for i in range(5)]
    runner = backend.prepare(model, model_key="lru/1")
    batched, batch_state, _ = runner.run(x, seed_streams(runner.init_state(5), streams))
    for i in (0, 3):
        alone_runner = backend.prepare(model, model_key="lru/1")
        state = seed_streams(alone_runner.init_state(1), [streams[i]])
        alone, alone_state, _ = alone_runner.run(x[i : i + 1], state)
        assert torch.equal(alone, batched[i : i + 1])
        for name in alone_state:
            assert torch.equal(alone_state[name], batch_state[name][i : i + 1]), name
    assert batch_state[NOISE_STREAM][:, 1].tolist() == [4] * 5  # steps taken
    order = [4, 2, 0, 1, 3]
    reordered = seed_streams(runner.init_state(5), [streams[i] for i in order])
    shuffled, _, _ = runner.run(x[order], reordered)
    assert torch.equal(shuffled, batched[order])
