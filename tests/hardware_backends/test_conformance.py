"""Every registered backend x every architecture honours the Runner contract.

The backends come from the entry-point registry, so a newly installed backend is tested
without editing this file. A backend that cannot run here fails, unless it is listed in
OPTIONAL_BACKENDS with the reason it may be missing.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from hardware_backends.base import DERIVED_USAGE, BackendUnavailableError, Runner, Usage
from hardware_backends.energy import ANALOG_PCM, DIGITAL_FP32, joules_per_mac, usage_from_counts
from hardware_backends.noise_streams import NOISE_STREAM
from hardware_backends.onnx_export import CACHE_DIR_ENV
from hardware_backends.registry import BackendRegistry
from hardware_backends.routing import find_linear_weights
from hardware_backends.torch_backend import TorchBackend
from models.architectures import ARCHITECTURES, build_model
from models.base import StatefulModel

# name -> why it may be unavailable on a machine that runs the test suite. Empty: every
# built-in backend must run everywhere.
OPTIONAL_BACKENDS: dict[str, str] = {}

# Small versions of each architecture so that the suite stays fast; an architecture missing
# here is tested with its default config.
SMALL_CONFIGS: dict[str, dict] = {
    "lru": {"d_model": 16, "d_state": 8, "n_layers": 2, "dropout": 0.0},
    "selective": {"d_model": 16, "d_state": 4, "n_layers": 2},
    "snn": {"d_model": 24, "n_layers": 2},
}

# Every architecture, plus the options that change what a step runs: name -> (architecture,
# config).
MODEL_CASES: dict[str, tuple[str, dict]] = {
    **{name: (name, SMALL_CONFIGS.get(name, {})) for name in ARCHITECTURES},
    "selective-moe": (
        "selective",
        {**SMALL_CONFIGS["selective"], "mixer": "moe", "n_experts": 4, "top_k": 1, "d_expert": 8},
    ),
}

REGISTRY = BackendRegistry()
BACKENDS = REGISTRY.names()
BATCH, STEPS = 3, 6


def small_model(case: str, seed: int = 0) -> StatefulModel:
    """The model of `case` in MODEL_CASES (an architecture's name is its own case)."""
    torch.manual_seed(seed)
    architecture, config = MODEL_CASES[case]
    return build_model(architecture, config)


def example_sequence(model: StatefulModel, batch: int, steps: int, seed: int = 0) -> Tensor:
    """Seeded raw inputs: tokens [B, T] or features [B, T, F] spanning the model's input range."""
    generator = torch.Generator().manual_seed(seed)
    cfg = model.config
    if model.input_kind == "tokens":
        return torch.randint(0, cfg.vocab_size, (batch, steps), generator=generator)
    return torch.rand(batch, steps, cfg.d_input, generator=generator) / abs(cfg.input_scale)


@pytest.fixture(autouse=True)
def onnx_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path_factory.getbasetemp() / "onnx-cache"))


def fresh_runner(backend: str, model: StatefulModel, options: dict | None = None) -> Runner:
    """A newly prepared runner (not from the cache), so that runners can be compared."""
    status = REGISTRY.status(backend)
    if status.reason is not None:
        if backend in OPTIONAL_BACKENDS:
            pytest.skip(f"optional backend {backend!r}: {status.reason}")
        pytest.fail(f"backend {backend!r} is registered but unavailable: {status.reason}")
    return REGISTRY.get(backend).prepare(model, model_key="conformance/1", options=options)


def logits_shape(runner: Runner, batch: int, *rest: int) -> list[int]:
    leading = [runner.samples] if runner.samples != 1 else []
    return [*leading, batch, *rest]


def assert_same_state_layout(state: dict[str, Tensor], reference: dict[str, Tensor]) -> None:
    assert list(state) == list(reference)
    for name in reference:
        assert state[name].shape == reference[name].shape, name
        assert state[name].dtype == reference[name].dtype, name


def assert_usage_close(actual: Usage, expected: Usage) -> None:
    for field in ("macs", "accumulates", "spikes", "neuron_steps"):
        assert getattr(actual, field) == getattr(expected, field), field
    for field in ("energy_joules", "dense_equivalent_energy_joules"):
        assert math.isclose(getattr(actual, field), getattr(expected, field), rel_tol=1e-9)


def test_every_built_in_backend_is_registered() -> None:
    assert {"torch", "onnxruntime", "analog_imc", "stochastic"} <= set(BACKENDS)


@pytest.mark.parametrize("architecture", sorted(MODEL_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
class TestRunnerContract:
    def test_shapes_and_state_layout(self, backend: str, architecture: str) -> None:
        model = small_model(architecture)
        runner = fresh_runner(backend, model)
        assert runner.backend == backend
        assert isinstance(runner.samples, int) and runner.samples >= 1
        state = runner.init_state(BATCH)
        model_state = model.init_state(BATCH)
        # A runner may add one entry of its own: each sequence's noise stream.
        assert [name for name in state if name != NOISE_STREAM] == list(model_state)
        if NOISE_STREAM in state:
            assert state[NOISE_STREAM].dtype == torch.int64
            assert list(state[NOISE_STREAM].shape) == [BATCH, 2]
        for name, tensor in model_state.items():
            assert state[name].shape[1:] == tensor.shape[1:], name
            assert state[name].dtype == tensor.dtype, name
            # A sampling backend may keep one chain per sample: S * B rows.
            assert state[name].shape[0] in (BATCH, runner.samples * BATCH), name
        x = example_sequence(model, BATCH, STEPS)
        logits, next_state, usage = runner.step(x[:, 0], state)
        n_out = model.config.d_output
        assert list(logits.shape) == logits_shape(runner, BATCH, n_out)
        assert torch.isfinite(logits).all()
        assert_same_state_layout(next_state, state)
        assert isinstance(usage, Usage)
        logits, final_state, _ = runner.run(x)
        assert list(logits.shape) == logits_shape(runner, BATCH, STEPS, n_out)
        assert_same_state_layout(final_state, state)

    def test_step_leaves_its_input_state_alone(self, backend: str, architecture: str) -> None:
        model = small_model(architecture)
        runner = fresh_runner(backend, model)
        x = example_sequence(model, BATCH, 2)
        _, state, _ = runner.step(x[:, 0], runner.init_state(BATCH))
        before = {name: tensor.clone() for name, tensor in state.items()}
        runner.step(x[:, 1], state)
        for name in before:
            assert torch.equal(state[name], before[name]), name

    def test_run_equals_repeated_step(self, backend: str, architecture: str) -> None:
        model = small_model(architecture)
        x = example_sequence(model, BATCH, STEPS)
        logits, state, usage = fresh_runner(backend, model).run(x)
        stepper = fresh_runner(backend, model)
        step_state, step_usage, outputs = stepper.init_state(BATCH), Usage(), []
        for t in range(STEPS):
            logits_t, step_state, usage_t = stepper.step(x[:, t], step_state)
            outputs.append(logits_t)
            step_usage = step_usage + usage_t
        torch.testing.assert_close(logits, torch.stack(outputs, dim=-2), rtol=1e-4, atol=1e-4)
        for name in state:
            torch.testing.assert_close(state[name], step_state[name], rtol=1e-4, atol=1e-4)
        assert_usage_close(usage, step_usage)

    def test_a_sequence_split_in_chunks_equals_one_run(self, backend: str, architecture: str):
        model = small_model(architecture)
        x = example_sequence(model, BATCH, STEPS)
        whole, whole_state, _ = fresh_runner(backend, model).run(x)
        chunked = fresh_runner(backend, model)
        first, state, _ = chunked.run(x[:, :2])
        second, state, _ = chunked.run(x[:, 2:], state)
        torch.testing.assert_close(torch.cat([first, second], dim=-2), whole, rtol=1e-4, atol=1e-4)
        for name in state:
            torch.testing.assert_close(state[name], whole_state[name], rtol=1e-4, atol=1e-4)

    def test_usage_is_non_negative_and_consistent(self, backend: str, architecture: str) -> None:
        model = small_model(architecture)
        runner = fresh_runner(backend, model)
        _, _, usage = runner.run(example_sequence(model, BATCH, STEPS))
        counts = usage.to_dict()
        for field in ("macs", "accumulates", "spikes", "neuron_steps"):
            assert isinstance(counts[field], int) and counts[field] >= 0, field
        assert usage.macs + usage.accumulates > 0, "a step does some work"
        assert usage.spikes <= usage.neuron_steps
        assert usage.energy_joules > 0 and usage.dense_equivalent_energy_joules > 0
        assert all(math.isfinite(counts[f]) for f in counts if f not in DERIVED_USAGE)
        if usage.neuron_steps:
            assert counts["sparsity"] == usage.spikes / usage.neuron_steps
        assert 0 <= usage.routed_macs <= usage.macs
        if usage.skipped_macs:
            assert counts["active_fraction"] == usage.macs / (usage.macs + usage.skipped_macs)
        else:
            assert counts["active_fraction"] is None
        # Per-step work scales with the batch: a run of 2B sequences is the sum of two runs.
        double = example_sequence(model, 2 * BATCH, STEPS)
        _, _, both = fresh_runner(backend, model).run(double)
        _, _, half_a = fresh_runner(backend, model).run(double[:BATCH])
        _, _, half_b = fresh_runner(backend, model).run(double[BATCH:])
        assert both.macs == half_a.macs + half_b.macs

    def test_deterministic_across_fresh_runners(self, backend: str, architecture: str) -> None:
        model = small_model(architecture)
        x = example_sequence(model, BATCH, STEPS)
        torch.manual_seed(1)  # a runner must not depend on the global random state
        first = fresh_runner(backend, model).run(x)
        torch.manual_seed(2)
        second = fresh_runner(backend, model).run(x)
        assert torch.equal(first[0], second[0])
        for name in first[1]:
            assert torch.equal(first[1][name], second[1][name]), name
        assert first[2] == second[2]

    def test_bad_options_raise_value_error(self, backend: str, architecture: str) -> None:
        model = small_model(architecture)
        fresh_runner(backend, model)  # available (or skipped as optional)
        with pytest.raises(ValueError, match="definitely_not_an_option"):
            REGISTRY.get(backend).prepare(
                model, model_key="conformance/1", options={"definitely_not_an_option": 1}
            )

    def test_bad_inputs_raise_value_error(self, backend: str, architecture: str) -> None:
        model = small_model(architecture)
        runner = fresh_runner(backend, model)
        state = runner.init_state(BATCH)
        if model.input_kind == "tokens":
            wrong_step = torch.rand(BATCH)  # floats where token ids belong
        else:
            wrong_step = torch.rand(BATCH, model.config.d_input + 1)  # one feature too many
        with pytest.raises(ValueError):
            runner.step(wrong_step, state)
        x = example_sequence(model, BATCH, 2)
        with pytest.raises(ValueError):
            runner.step(x[:, 0], {**state, "no_such_state": state[next(iter(state))]})
        with pytest.raises(ValueError):
            runner.run(x[:, 0])  # one step where a sequence belongs
        with pytest.raises(ValueError):
            runner.init_state(0)


@pytest.mark.parametrize("architecture", sorted(MODEL_CASES))
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_digital_backends_charge_the_digital_energy_figures(backend: str, architecture: str):
    model = small_model(architecture)
    runner = fresh_runner(backend, model)
    _, _, usage = runner.run(example_sequence(model, BATCH, STEPS))
    counts = model.macs_per_step()
    dense_macs = counts["dense_macs"] * BATCH * STEPS
    dense_equivalent = dense_macs + counts.get("synaptic_ops_max", 0) * BATCH * STEPS
    expected = usage.macs * DIGITAL_FP32.mac_joules
    expected += usage.accumulates * DIGITAL_FP32.accumulate_joules
    assert usage.macs == dense_macs
    assert math.isclose(usage.energy_joules, expected, rel_tol=1e-9)
    assert math.isclose(
        usage.dense_equivalent_energy_joules,
        dense_equivalent * DIGITAL_FP32.mac_joules,
        rel_tol=1e-9,
    )
    if "synaptic_ops_max" not in counts:  # a dense model does no event-driven work
        assert usage.accumulates == usage.spikes == usage.neuron_steps == 0
        assert usage.energy_joules == usage.dense_equivalent_energy_joules
    # Routed experts: only the chosen ones are counted, and the rest is reported as skipped.
    assert usage.routed_macs == counts.get("routed_macs", 0) * BATCH * STEPS
    assert usage.skipped_macs == counts.get("skipped_macs", 0) * BATCH * STEPS


@pytest.mark.parametrize("backend", ["analog_imc", "stochastic"])
def test_routed_experts_stay_digital_on_engine_backends(backend: str) -> None:
    """The router runs on the engines like any projection; the experts, gathered rows in
    plain matmuls, run digitally and are priced as FP32 MACs, and usage still counts only
    the chosen experts."""
    model = small_model("selective-moe")
    weights = find_linear_weights(model)
    assert "layers.0.experts.router.weight" in weights
    assert not any("w_up" in name or "w_down" in name for name in weights)
    runner = fresh_runner(backend, model)
    _, _, usage = runner.run(example_sequence(model, BATCH, STEPS))
    counts = model.macs_per_step()
    per_sequence_step = usage.macs // (counts["dense_macs"] * STEPS)  # B, or S·B if sampled
    assert usage.macs == counts["dense_macs"] * STEPS * per_sequence_step
    assert usage.routed_macs == counts["routed_macs"] * STEPS * per_sequence_step
    assert usage.active_fraction == pytest.approx(
        counts["dense_macs"] / (counts["dense_macs"] + counts["skipped_macs"])
    )


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_spike_driven_work_is_spikes_times_fan_out(backend: str) -> None:
    """Recount the SNN's event-driven work from the spikes in its state and its layer shapes."""
    model = small_model("snn")
    runner = fresh_runner(backend, model)
    x = example_sequence(model, BATCH, STEPS)
    state, total = runner.init_state(BATCH), Usage()
    spikes = accumulates = 0
    n_layers = model.config.n_layers
    for t in range(STEPS):
        _, state, usage = runner.step(x[:, t], state)
        total = total + usage
        for i, layer in enumerate(model.layers):
            downstream = model.feedforward[i] if i + 1 < n_layers else model.readout.proj
            fan_out = layer.recurrent.out_features + downstream.out_features
            layer_spikes = int(state[f"layers.{i}.spk"].sum())
            spikes += layer_spikes
            accumulates += layer_spikes * fan_out
    assert spikes > 0, "the example input makes the network spike"
    assert total.spikes == spikes and total.accumulates == accumulates
    assert total.neuron_steps == BATCH * STEPS * n_layers * model.config.d_model
    # Event-driven energy is below the dense-equivalent figure unless every neuron spikes.
    assert total.energy_joules < total.dense_equivalent_energy_joules


# ---- the torch reference backend and the energy figures ------------------------------------


def test_torch_runner_is_a_snapshot_of_the_model() -> None:
    """A fine-tuning job changing the model must not leak into a runner already prepared."""
    model = small_model("lru")
    runner = TorchBackend().prepare(model, model_key="m/1", options={"device": "cpu"})
    x = example_sequence(model, BATCH, STEPS)
    before, _, _ = runner.run(x)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    after, _, _ = runner.run(x)
    assert torch.equal(before, after)
    assert model.training, "prepare leaves the caller's model in its own mode"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_torch_cuda_without_cuda_is_unavailable() -> None:
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        TorchBackend().prepare(small_model("lru"), model_key="m/1", options={"device": "cuda"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_torch_cuda_matches_cpu_and_returns_to_the_callers_device(architecture: str) -> None:
    model = small_model(architecture)
    x = example_sequence(model, BATCH, STEPS)
    cpu = TorchBackend().prepare(model, model_key="m/1", options={"device": "cpu"}).run(x)
    cuda = TorchBackend().prepare(model, model_key="m/1", options={"device": "cuda"}).run(x)
    assert cuda[0].device.type == "cpu"
    torch.testing.assert_close(cuda[0], cpu[0], rtol=1e-4, atol=1e-4)
    assert cuda[2] == cpu[2]


def test_energy_figures_follow_their_sources() -> None:
    # Horowitz 2014: 3.7 pJ multiply + 0.9 pJ add; HERMES: 2 ops per MAC at 2.48 / 9.76 TOPS/W.
    assert math.isclose(DIGITAL_FP32.mac_joules, 4.6e-12)
    assert math.isclose(DIGITAL_FP32.accumulate_joules, 0.9e-12)
    assert math.isclose(ANALOG_PCM.mac_joules, 2 / 2.48e12)
    assert math.isclose(joules_per_mac(9.76), 2 / 9.76e12)
    with pytest.raises(ValueError, match="tops_per_watt"):
        joules_per_mac(0.0)
    with pytest.raises(ValueError, match="non-negative"):
        usage_from_counts(macs=-1)
    usage = usage_from_counts(macs=10, accumulates=100, dense_equivalent_macs=110)
    assert math.isclose(usage.energy_joules, 10 * 4.6e-12 + 100 * 0.9e-12)
    assert math.isclose(usage.dense_equivalent_energy_joules, 110 * 4.6e-12)
    assert (usage + usage).accumulates == 200
