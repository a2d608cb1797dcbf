"""Imported models on every backend: a recurrent NIR graph exported by snnTorch runs on torch
and onnxruntime alike, and its Affine weights are the linear maps the analog and stochastic
backends act on; an imported ONNX step graph has no torch linear maps, so every backend runs
it unchanged (onnxruntime inside)."""

from __future__ import annotations

from pathlib import Path

import nir
import pytest
import torch

from hardware_backends.onnx_export import CACHE_DIR_ENV
from hardware_backends.registry import BackendRegistry
from hardware_backends.routing import find_linear_weights
from models.nir_import import build_nir_model
from models.onnx_import import build_onnx_model
from tests.models.test_nir_import import Recurrent, _inputs, _strengthen
from tests.models.test_onnx_import import GRUStep, export

pytest.importorskip("snntorch")
from snntorch.export_nir import export_to_nir  # noqa: E402  (after the skip above)

REGISTRY = BackendRegistry()


@pytest.fixture(scope="module")
def recurrent_nir_model(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("nir") / "rec.nir"
    nir.write(str(path), export_to_nir(_strengthen(Recurrent()).eval(), torch.rand(4)))
    return build_nir_model(nir.read(str(path)), dt=1e-4, readout="sum")


def test_the_graphs_affine_weights_are_its_linear_maps(recurrent_nir_model) -> None:
    found = find_linear_weights(recurrent_nir_model)
    index = {name: i for i, name in enumerate(recurrent_nir_model.names)}
    assert sorted(found) == sorted(
        f"nodes.{index[name]}.linear.weight" for name in ("fc1", "lif1.w_rec", "fc2")
    )


@pytest.mark.parametrize("backend", REGISTRY.names())
def test_every_backend_runs_the_imported_graph(
    backend: str, recurrent_nir_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    runner = REGISTRY.get(backend).prepare(recurrent_nir_model, model_key="rec/1")
    x = _inputs(batch=3)
    logits, state, usage = runner.run(x)
    assert logits.shape[-3:] == (3, x.shape[1], 3)
    assert usage.spikes > 0 and usage.accumulates > 0 and usage.macs > 0
    if backend in ("torch", "onnxruntime"):  # exact backends: the model's own outputs
        with torch.no_grad():
            expected, _ = recurrent_nir_model(x)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", REGISTRY.names())
def test_every_backend_runs_an_imported_onnx_graph_unchanged(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = build_onnx_model(export(GRUStep(), tmp_path / "gru.onnx"))
    runner = REGISTRY.get(backend).prepare(model, model_key="gru/1")  # copies the model
    x = _inputs(batch=3)
    logits, _, usage = runner.run(x)
    with torch.no_grad():
        expected, _ = model(x)
    assert usage.macs == 3 * x.shape[1] * runner.samples * model.config.dense_macs
    torch.testing.assert_close(logits, expected.expand_as(logits), atol=1e-6, rtol=0)
