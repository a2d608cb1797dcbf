"""Stateful ONNX import: a torch GRU exported with its state as graph inputs and outputs
steps exactly as torch does (within 1e-5), on the model itself and on the onnxruntime backend;
graphs that break the convention and damaged files are refused and publish nothing."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from hardware_backends.onnx_export import CACHE_DIR_ENV
from hardware_backends.registry import BackendRegistry
from models.onnx_import import OnnxImportError, import_onnx
from models.onnx_step import OnnxStepModel
from models.repository import ModelRepository

ATOL = 1e-5
FEATURES, HIDDEN, CLASSES = 4, 8, 3


class GRUStep(nn.Module):
    """One step of a GRU classifier: (x [B, F], h [B, H]) -> (logits [B, C], h' [B, H])."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(FEATURES, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        h = self.cell(x, h)
        return self.head(h), h


class BrokenState(GRUStep):
    """Returns half of the state: next_state.h does not match state.h."""

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        logits, h = super().forward(x, h)
        return logits, h[:, : HIDDEN // 2]


def export(module: nn.Module, path: Path, outputs=("logits", "next_state.h")) -> Path:
    inputs = ("x", "state.h")
    example = (torch.rand(2, FEATURES), torch.zeros(2, HIDDEN))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes={name: {0: "batch"} for name in (*inputs, *outputs)},
        )
    return path


@pytest.fixture(autouse=True)
def onnx_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "onnx-cache"))


def test_gru_graph_steps_like_torch_on_the_model_and_the_onnxruntime_backend(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    step = GRUStep()
    path = export(step, tmp_path / "gru.onnx")
    repository = ModelRepository(tmp_path / "repo")
    card = import_onnx(repository, path, "gru", labels=["a", "b", "c"], command="test")
    assert card.config["architecture"] == "onnx-step"
    assert card.config["imported"]["format"] == "onnx"
    assert card.config["model_config"]["state"] == {"h": [HIDDEN]}
    model = repository.load("gru").model
    assert isinstance(model, OnnxStepModel)
    runner = BackendRegistry().get("onnxruntime").prepare(model, model_key="gru/1")

    x = torch.rand(5, 7, FEATURES, generator=torch.Generator().manual_seed(1))  # [B, T, F]
    h = torch.zeros(5, HIDDEN)
    state = model.init_state(5)
    runner_state = runner.init_state(5)
    with torch.no_grad():
        for t in range(x.shape[1]):
            expected, h = step(x[:, t], h)
            logits, state = model.step(x[:, t], state)
            runner_logits, runner_state, usage = runner.step(x[:, t], runner_state)
            torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
            torch.testing.assert_close(state["h"], h, atol=ATOL, rtol=0)
            torch.testing.assert_close(runner_logits, expected, atol=ATOL, rtol=0)
            assert usage.macs == 5 * card.config["model_config"]["dense_macs"] > 0
        # The whole sequence through torch's own GRU layer, sharing the cell's weights.
        gru = nn.GRU(FEATURES, HIDDEN, batch_first=True)
        gru.load_state_dict({f"{k}_l0": v for k, v in step.cell.state_dict().items()})
        outputs, _ = gru(x)
        all_logits, _ = model(x)
    torch.testing.assert_close(all_logits, step.head(outputs), atol=ATOL, rtol=0)


def _refused(tmp_path: Path, path: Path, match: str) -> None:
    repository = ModelRepository(tmp_path / "repo")
    with pytest.raises(OnnxImportError, match=match):
        import_onnx(repository, path, "bad")
    assert repository.list_models() == []


def test_mismatched_state_shapes_are_refused(tmp_path: Path) -> None:
    path = export(BrokenState(), tmp_path / "broken.onnx")
    _refused(tmp_path, path, r"state 'h': state.h is \['batch', 8\] but next_state.h is")


def test_unpaired_state_is_refused(tmp_path: Path) -> None:
    path = export(GRUStep(), tmp_path / "unpaired.onnx", outputs=("logits", "next_state.c"))
    _refused(tmp_path, path, r"\['state.h'\] have no next_state output")


def test_graph_without_the_convention_is_refused(tmp_path: Path) -> None:
    path = export(GRUStep(), tmp_path / "plain.onnx", outputs=("out", "next_state.h"))
    _refused(tmp_path, path, "the graph has no output 'logits'")


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = export(GRUStep(), tmp_path / "gru.onnx")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    _refused(tmp_path, path, "not a valid ONNX model")
