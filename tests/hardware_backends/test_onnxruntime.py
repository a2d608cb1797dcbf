"""ONNX export and the onnxruntime backend: agreement with torch, graph interface, caching,
thread options."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

from hardware_backends.onnx_export import (
    INPUT_NAME,
    LOGITS_NAME,
    OPSET,
    STATE_IN_PREFIX,
    STATE_OUT_PREFIX,
    ExportCache,
    _register_missing_operators,
    export_onnx,
)
from hardware_backends.onnxruntime_backend import (
    INTER_OP_THREADS_ENV,
    INTRA_OP_THREADS_ENV,
    OnnxRuntimeBackend,
)
from hardware_backends.torch_backend import TorchBackend
from models.architectures import ARCHITECTURES
from tests.hardware_backends.test_conformance import example_sequence, small_model

ARCHS = sorted(ARCHITECTURES)
LONG_RUN = 64  # steps: errors that compound through the recurrence show up over a long run


@pytest.fixture()
def backend(tmp_path: Path) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(cache_dir=tmp_path / "onnx", exports=ExportCache())


@pytest.mark.parametrize("architecture", ARCHS)
def test_matches_torch_step_by_step_over_many_steps(
    architecture: str, backend: OnnxRuntimeBackend
) -> None:
    model = small_model(architecture)
    reference = TorchBackend().prepare(model, model_key="t/1", options={"device": "cpu"})
    runner = backend.prepare(model, model_key="t/1", options={"intra_op_threads": 1})
    x = example_sequence(model, batch=3, steps=LONG_RUN, seed=1)
    ref_state, state = reference.init_state(3), runner.init_state(3)
    for t in range(LONG_RUN):
        ref_logits, ref_state, ref_usage = reference.step(x[:, t], ref_state)
        logits, state, usage = runner.step(x[:, t], state)
        assert (logits - ref_logits).abs().max() < 1e-4, f"logits differ at step {t}"
        for name in ref_state:
            assert (state[name] - ref_state[name]).abs().max() < 1e-4, f"{name} at step {t}"
        assert usage == ref_usage, f"usage differs at step {t}"


@pytest.mark.parametrize("architecture", ARCHS)
def test_run_matches_torch_forward_and_its_own_reference(
    architecture: str, backend: OnnxRuntimeBackend
) -> None:
    model = small_model(architecture)
    x = example_sequence(model, batch=2, steps=20, seed=2)
    runner = backend.prepare(model, model_key="t/1")
    logits, state, usage = runner.run(x)
    with torch.no_grad():
        expected, expected_state = model.eval()(x)
    assert (logits - expected).abs().max() < 1e-4
    for name in expected_state:
        assert (state[name] - expected_state[name]).abs().max() < 1e-4
    slow_logits, slow_state, slow_usage = runner.run_by_steps(x)
    assert torch.equal(logits, slow_logits)
    assert all(torch.equal(state[n], slow_state[n]) for n in state)
    assert usage == slow_usage


@pytest.mark.parametrize("architecture", ARCHS)
def test_graph_has_named_state_and_a_dynamic_batch(architecture: str, tmp_path: Path) -> None:
    model = small_model(architecture)
    path = tmp_path / "step.onnx"
    spec = export_onnx(model, path)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    state_names = list(model.init_state(1))
    assert spec.state_names == state_names
    assert [i.name for i in graph.graph.input] == [
        INPUT_NAME,
        *(STATE_IN_PREFIX + n for n in state_names),
    ]
    outputs = [o.name for o in graph.graph.output]
    assert outputs[: 1 + len(state_names)] == [
        LOGITS_NAME,
        *(STATE_OUT_PREFIX + n for n in state_names),
    ]
    for value in [*graph.graph.input, *graph.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    # Any batch runs through the one graph, without torch.
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x_t = example_sequence(model, batch, 1)[:, 0]
        feeds = {INPUT_NAME: x_t.numpy()}
        feeds |= {STATE_IN_PREFIX + n: t.numpy() for n, t in model.init_state(batch).items()}
        logits = session.run([LOGITS_NAME], feeds)[0]
        with torch.no_grad():
            expected, _ = model.eval().step(x_t, model.init_state(batch))
        assert logits.shape == (batch, model.config.d_output)
        assert abs(logits - expected.numpy()).max() < 1e-4


def test_export_is_cached_in_memory_and_on_disk(tmp_path: Path) -> None:
    model = small_model("lru")
    cache = ExportCache()
    first = cache.get(model, "digits-lru/1", tmp_path)
    assert cache.exports_done == 1
    assert cache.get(model, "digits-lru/1", tmp_path) is first
    assert cache.exports_done == 1
    # A new process (a new cache object) finds the export on disk.
    restarted = ExportCache()
    again = restarted.get(model, "digits-lru/1", tmp_path)
    assert restarted.exports_done == 0 and again.path == first.path
    # New weights under the same key are a new export in a new directory; nothing is reused.
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    changed = restarted.get(model, "digits-lru/1", tmp_path)
    assert restarted.exports_done == 1 and changed.path != first.path
    assert changed.spec.weights_hash != first.spec.weights_hash
    assert first.path.is_file() and changed.path.is_file()
    other_key = restarted.get(model, "digits-lru/2", tmp_path)
    assert other_key.path.parent.parent != changed.path.parent.parent
    assert not list(tmp_path.glob("*/.export-*")), "staging directories are cleaned up"


def test_prepare_reuses_the_export_across_thread_options(backend: OnnxRuntimeBackend) -> None:
    model = small_model("lru")
    one = backend.prepare(model, model_key="m/1", options={"intra_op_threads": 1})
    two = backend.prepare(model, model_key="m/1", options={"intra_op_threads": 2})
    assert backend.exports.exports_done == 1
    assert one.session.get_session_options().intra_op_num_threads == 1
    assert two.session.get_session_options().intra_op_num_threads == 2


def test_thread_counts_come_from_the_environment_unless_given(
    backend: OnnxRuntimeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = small_model("lru")
    monkeypatch.setenv(INTRA_OP_THREADS_ENV, "1")
    monkeypatch.setenv(INTER_OP_THREADS_ENV, "1")
    options = backend.prepare(model, model_key="m/1").session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    given = backend.prepare(model, model_key="m/1", options={"inter_op_threads": 2})
    assert given.session.get_session_options().inter_op_num_threads == 2
    monkeypatch.setenv(INTRA_OP_THREADS_ENV, "many")
    with pytest.raises(ValueError, match=INTRA_OP_THREADS_ENV):
        backend.prepare(model, model_key="m/1")


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"intra_op_threads": -1}, "intra_op_threads"),
        ({"intra_op_threads": 10_000}, "intra_op_threads"),
        ({"inter_op_threads": "two"}, "inter_op_threads"),
        ({"threads": 2}, "threads"),
    ],
)
def test_bad_thread_options_name_the_problem(
    options: dict, problem: str, backend: OnnxRuntimeBackend
) -> None:
    with pytest.raises(ValueError, match=problem):
        backend.prepare(small_model("lru"), model_key="m/1", options=options)


class _Expm1(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.expm1(x)


def test_exported_expm1_keeps_its_precision_for_small_arguments(tmp_path: Path) -> None:
    # exp(x) - 1 in float32 loses every digit below |x| ~ 1e-7; the exported op must not.
    _register_missing_operators()
    path = tmp_path / "expm1.onnx"
    x = torch.cat([torch.logspace(-9, 1.5, 400), -torch.logspace(-9, 1.5, 400), torch.zeros(1)])
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            _Expm1(), (x,), str(path), opset_version=OPSET, dynamo=False, input_names=["x"]
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    expected = torch.expm1(x.double())
    # A few float32 ulps everywhere, including |x| = 1e-9 where exp(x) - 1 would give 0.
    torch.testing.assert_close(torch.from_numpy(got).double(), expected, rtol=5e-7, atol=0)
    assert not torch.allclose(torch.exp(x) - 1, expected.float(), rtol=1e-3, atol=0)
