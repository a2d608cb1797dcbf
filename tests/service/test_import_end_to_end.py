"""Bring your own model, end to end through the real command line and a real server.

An snnTorch network trained on the digits training split is exported to NIR, imported with
`neuroserve import nir`, calibrated with `neuroserve calibrate --data` on the calibration
split, and served by uvicorn on loopback: every held-out test image runs through its own
session. The served labels are snnTorch's own (same held-out accuracy), and the conformal
sets at alpha 0.1 cover within [1-a-3SE, 1-a+1/(n+1)+3SE]. The same path for an ONNX GRU,
and the command's refusals leave the repository untouched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from models.digits import load_digits_seq
from models.repository import ModelRepository
from service.app import create_app
from service.cli.main import main as neuroserve
from service.settings import Settings
from tests.models.test_onnx_import import GRUStep, export
from tests.service.conftest import running_server

snn_bench = pytest.importorskip("bench.import_snntorch_digits")  # needs snnTorch


@pytest.fixture(scope="module")
def trained_network():
    return snn_bench.train_network(epochs=20)  # a few seconds; accuracy is not the point here


def test_snntorch_network_served_calibrated_with_its_own_accuracy(
    tmp_path: Path, trained_network, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEUROSERVE_ONNX_CACHE_DIR", str(tmp_path / "onnx-cache"))
    nir_path = snn_bench.export_graph(trained_network, tmp_path / "digits.nir")
    calibration = snn_bench.write_npz("calibration", tmp_path / "calibration.npz")
    root = tmp_path / "repo"
    snn_bench.import_and_calibrate(nir_path, root, calibration)

    # The imported model computes snnTorch's class scores (the unit tests check the dynamics).
    model = ModelRepository(root).load(snn_bench.NAME).model
    test = load_digits_seq("test")
    with torch.no_grad():
        expected = snn_bench.source_logits(trained_network, test.inputs)  # [N, T, 10]
        got, _ = model(test.inputs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)

    settings = Settings(model_repository=root)
    with running_server(create_app(settings)) as base_url:
        info = httpx.get(f"{base_url}/v1/models/{snn_bench.NAME}", timeout=30).json()
        served = snn_bench.serve_sessions(base_url, test.inputs, test.labels)
        # The graph's state (membranes) carries across requests: row by row, one request
        # per row, ends where one request with all rows ends.
        with httpx.Client(base_url=base_url, timeout=30) as client:
            for image in test.inputs[:3].tolist():
                answers = []
                for chunks in ([image], [[row] for row in image]):
                    session = client.post("/v1/sessions", json={"model": snn_bench.NAME})
                    session_id = session.json()["session_id"]
                    for chunk in chunks:
                        answer = client.post(
                            f"/v1/sessions/{session_id}/step", json={"inputs": chunk}
                        ).json()
                    answers.append(answer)
                assert answers[1]["step"] == answers[0]["step"] == 8
                assert answers[1]["prediction"]["probabilities"] == pytest.approx(
                    answers[0]["prediction"]["probabilities"], abs=1e-6
                )
    assert info["architecture"] == "nir"
    assert info["origin"]["kind"] == "imported" and info["origin"]["format"] == "nir"
    assert info["origin"]["sha256"] == hashlib.sha256(nir_path.read_bytes()).hexdigest()
    assert {b["name"]: b["calibrated"] for b in info["backends"]}["torch"] is True

    report = snn_bench.compare(trained_network, served)
    assert report.same_label == 1.0
    assert report.served_accuracy == report.source_accuracy > 0.5
    low, high = snn_bench.coverage_band(report.n)
    assert low <= report.coverage <= high, report.lines()


def test_onnx_gru_is_imported_calibrated_and_served(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NEUROSERVE_ONNX_CACHE_DIR", str(tmp_path / "onnx-cache"))
    torch.manual_seed(0)
    path = export(GRUStep(), tmp_path / "gru.onnx")
    root = tmp_path / "repo"
    repository = ["--repository", str(root)]
    assert neuroserve(["import", "onnx", str(path), "--name", "gru", *repository]) == 0
    generator = np.random.default_rng(0)
    labels = generator.integers(0, 3, size=200)
    inputs = generator.normal(size=(200, 5, 4)).astype(np.float32) + labels[:, None, None]
    np.savez(tmp_path / "data.npz", inputs=inputs, labels=labels)
    code = neuroserve(
        ["calibrate", "gru", "--backend", "onnxruntime", "--data", str(tmp_path / "data.npz")]
        + repository
    )
    assert code == 0
    with running_server(create_app(Settings(model_repository=root))) as base_url:
        info = httpx.get(f"{base_url}/v1/models/gru", timeout=30).json()
        created = httpx.post(
            f"{base_url}/v1/sessions", json={"model": "gru", "backend": "onnxruntime"}
        ).json()
        answer = httpx.post(
            f"{base_url}/v1/sessions/{created['session_id']}/step",
            json={"inputs": inputs[0].tolist()},
            timeout=30,
        ).json()
    assert info["origin"]["format"] == "onnx" and info["architecture"] == "onnx-step"
    assert answer["calibrated"] is True and answer["step"] == 5
    assert answer["prediction"]["prediction_set"]


def test_refused_imports_exit_2_with_the_reason_and_publish_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repo"
    broken = tmp_path / "broken.nir"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n not really")
    code = neuroserve(["import", "nir", str(broken), "--name", "x", "--repository", str(root)])
    assert code == 2
    assert "not a readable NIR file" in capsys.readouterr().err
    onnx_path = export(GRUStep(), tmp_path / "gru.onnx")
    code = neuroserve(
        ["import", "onnx", str(onnx_path), "--name", "x", "--labels", "a,b"]
        + ["--repository", str(root)]
    )
    assert code == 2
    assert "--labels needs 3 distinct names" in capsys.readouterr().err
    assert ModelRepository(root).list_models() == []
