"""`neuroserve calibrate` and `neuroserve export-onnx`: artifacts written beside the weights and
served at once, backend options recorded, language models as next-token classifiers, clear
refusals, the committed built-in calibrations (present for every backend, reproducible), and
an exported step that agrees with the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnxruntime
import pytest
import torch

from calibration import CalibrationArtifact, fit_calibration_artifact
from models.digits import load_digits_seq
from models.repository import CONFIG_FILE, WEIGHTS_FILE, ModelRepository, default_repository_root
from models.userdata import load_npz_dataset
from service.app import create_app
from service.calibration_store import CalibrationFileError, CalibrationStore
from service.cli import main
from service.cli_calibrate import LM_CONTEXT, next_token_windows
from service.settings import Settings
from tests.service.conftest import CHAR_VOCABULARY, publish_lru, running_server
from tests.service.test_cli import run_cli

BUILT_IN_MODELS = ("digits-lru", "digits-snn", "charlm-selective")
BUILT_IN_BACKENDS = ("torch", "onnxruntime", "analog_imc", "stochastic")


@pytest.fixture()
def repository(tmp_path: Path) -> ModelRepository:
    repository = ModelRepository(tmp_path / "repository")
    publish_lru(repository, "tiny-digits", seed=1)
    publish_lru(repository, "tiny-digits", seed=2)  # version 2, the latest
    publish_lru(repository, "tiny-charlm", seed=3, task="language-model")
    return repository


@pytest.fixture(scope="module")
def calibration_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    split = load_digits_seq("calibration")
    path = tmp_path_factory.mktemp("data") / "holdout.npz"
    np.savez(path, inputs=split.inputs.numpy(), labels=split.labels.numpy())
    return path


def calibrate(repository: ModelRepository, *args: str) -> int:
    return main(["calibrate", *args, "--repository", str(repository.root)])


# ---- calibrate ------------------------------------------------------------------------------


def test_help_lists_the_new_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "calibrate" in result.stdout and "export-onnx" in result.stdout


def test_calibrating_from_an_npz_stores_an_artifact_the_server_uses(
    repository: ModelRepository, calibration_npz: Path, tmp_path: Path, capsys
) -> None:
    plot = tmp_path / "reliability.png"
    code = calibrate(
        repository, "tiny-digits", "--data", str(calibration_npz), "--plot", str(plot),
        "--seed", "3",
    )  # fmt: skip
    output = capsys.readouterr()
    assert code == 0, output.err
    for metric in ("accuracy", "nll", "ece", "adaptive_ece", "mce", "brier"):
        assert f"\n{metric} " in output.out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000

    stored = CalibrationStore(repository).get("tiny-digits", "2", "torch")
    assert stored is not None
    artifact = stored.artifact
    assert (artifact.model, artifact.version, artifact.backend, artifact.seed) == (
        "tiny-digits", "2", "torch", 3,
    )  # fmt: skip
    assert artifact.n + artifact.n_tune == 400 and artifact.num_classes == 10
    assert stored.source["data"] == "npz:holdout.npz"
    assert stored.source["data_sha256"] == load_npz_dataset(calibration_npz).sha256
    assert stored.backend_options == {}

    settings = Settings(model_repository=repository.root, allow_uncalibrated=False)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url) as http:
        inputs = load_digits_seq("test").inputs[:4].tolist()
        answer = http.post("/v1/models/tiny-digits/predict", json={"inputs": inputs}).json()
        assert answer["calibrated"] is True
        assert all(p["set_size"] is not None for p in answer["predictions"])
        untouched = http.post(
            "/v1/models/tiny-digits/predict", json={"inputs": inputs, "version": 1}
        )
        assert untouched.status_code == 409  # version 1 was not calibrated


def test_backend_options_are_recorded_and_compared(
    repository: ModelRepository, calibration_npz: Path, capsys
) -> None:
    code = calibrate(
        repository, "tiny-digits", "--data", str(calibration_npz), "--backend", "stochastic",
        "--backend-option", "samples=4", "--backend-option", "relative_std=0.1",
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    json_path, _ = CalibrationStore(repository).paths("tiny-digits", "2", "stochastic")
    serving = json.loads(json_path.read_text())["serving"]
    assert serving["backend_options"] == {"samples": 4, "relative_std": 0.1}
    settings = Settings(model_repository=repository.root)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url) as http:
        inputs = load_digits_seq("test").inputs[:2].tolist()
        body = {"inputs": inputs, "backend": "stochastic"}
        same = http.post(
            "/v1/models/tiny-digits/predict",
            json={**body, "backend_options": {"relative_std": 0.1, "samples": 4}},
        ).json()
        other = http.post("/v1/models/tiny-digits/predict", json=body).json()
        assert same["warnings"] == []
        assert "the coverage guarantee holds only" in other["warnings"][0]


def test_a_language_model_is_calibrated_on_next_token_windows(
    repository: ModelRepository, tmp_path: Path, capsys
) -> None:
    text = tmp_path / "holdout.txt"
    rng = np.random.default_rng(0)
    text.write_text("".join(rng.choice(CHAR_VOCABULARY, size=3000)))
    code = calibrate(repository, "tiny-charlm", "--data", str(text))
    assert code == 0, capsys.readouterr().err
    stored = CalibrationStore(repository).get("tiny-charlm", "1", "torch")
    assert stored is not None and stored.artifact.num_classes == len(CHAR_VOCABULARY)
    assert stored.artifact.n + stored.artifact.n_tune == 2000
    assert f"windows of {LM_CONTEXT}" in stored.source["data"]


def test_next_token_windows_pair_each_context_with_the_token_after_it() -> None:
    ids = torch.arange(100)
    windows, labels = next_token_windows(ids, context=8, count=20, seed=0)
    assert windows.shape == (20, 8) and labels.shape == (20,)
    for window, label in zip(windows, labels, strict=True):
        assert window.tolist() == list(range(int(window[0]), int(window[0]) + 8))
        assert int(label) == int(window[-1]) + 1
    assert len({int(w[0]) for w in windows}) == 20  # drawn without replacement


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["tiny-digits", "--backend", "quantum"], "registered backends: "),
        (["tiny-digits", "--backend-option", "t_inferenc=1"], "t_inferenc: Extra inputs"),
        (["tiny-digits"], "pass --data FILE.npz"),
        (["tiny-charlm"], "pass --data FILE.txt"),
        (["no-such-model"], "no model named 'no-such-model'"),
        (["tiny-digits", "--version", "7"], "has no version '7'"),
    ],
)
def test_calibrate_refusals_name_the_problem(
    repository: ModelRepository, calibration_npz: Path, args: list[str], fragment: str, capsys
) -> None:
    if "--backend" in args or "--backend-option" in args:
        args = [*args, "--data", str(calibration_npz)]
    assert calibrate(repository, *args) == 2
    assert fragment in capsys.readouterr().err


def test_npz_that_does_not_fit_the_model_is_refused(
    repository: ModelRepository, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "seven_features.npz"
    np.savez(path, inputs=np.zeros((20, 8, 7), np.float32), labels=np.arange(20) % 10)
    assert calibrate(repository, "tiny-digits", "--data", str(path)) == 2
    assert "7 features per step, tiny-digits expects 8" in capsys.readouterr().err


# ---- the committed built-in calibrations ------------------------------------------------------


def test_every_built_in_model_is_calibrated_on_every_built_in_backend() -> None:
    store = CalibrationStore(ModelRepository(default_repository_root()))
    digits_sha256 = load_digits_seq("calibration").sha256
    for model in BUILT_IN_MODELS:
        assert set(BUILT_IN_BACKENDS) <= set(store.calibrated_backends(model, "1"))
        for backend in BUILT_IN_BACKENDS:
            stored = store.get(model, "1", backend)
            assert stored is not None
            assert (stored.artifact.model, stored.artifact.backend) == (model, backend)
            assert stored.backend_options == {}
            if model.startswith("digits"):
                assert stored.source["data_sha256"] == digits_sha256
            else:  # next-token windows of the held-out docstrings
                assert stored.source["data"].startswith("charcorpus/stdlib-docstrings")
                assert stored.artifact.num_classes == 97 and stored.source["n"] == 2000


def test_the_committed_torch_calibration_is_reproduced_by_the_command(
    tmp_path: Path, capsys
) -> None:
    built_in = ModelRepository(default_repository_root())
    copy = ModelRepository(tmp_path / "copy")
    target = copy.version_path("digits-lru", "1")
    target.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy(built_in.version_path("digits-lru", "1") / name, target / name)
    assert calibrate(copy, "digits-lru") == 0, capsys.readouterr().err
    committed = CalibrationStore(built_in).get("digits-lru", "1", "torch").artifact
    fresh = CalibrationStore(copy).get("digits-lru", "1", "torch").artifact
    assert fresh.to_json_dict() | {"created": None} == committed.to_json_dict() | {"created": None}
    assert fresh.to_safetensors() == committed.to_safetensors()


# ---- the store behind the command --------------------------------------------------------


def _artifact(seed: int, model: str = "tiny-digits", version: str = "2") -> CalibrationArtifact:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(60, 10, generator=generator, dtype=torch.float64) * 3  # [60, 10]
    labels = torch.randint(0, 10, (60,), generator=generator)  # [60]
    return fit_calibration_artifact(logits, labels, model, version, "torch", seed=seed)


def test_a_new_calibration_is_served_without_a_restart(repository: ModelRepository) -> None:
    store = CalibrationStore(repository)
    assert store.get("tiny-digits", "2", "torch") is None
    store.save(_artifact(seed=1), source={"data": "first"})
    first = store.get("tiny-digits", "2", "torch")
    assert first is store.get("tiny-digits", "2", "torch")  # cached while the file stays
    store.save(_artifact(seed=2), source={"data": "second"})
    second = store.get("tiny-digits", "2", "torch")
    assert second.source == {"data": "second"} and second.artifact.seed == 2


def test_mismatched_or_foreign_files_are_refused(repository: ModelRepository) -> None:
    store = CalibrationStore(repository)
    json_path, tensor_path = store.paths("tiny-digits", "2", "torch")
    store.save(_artifact(seed=1))
    tensor_path.write_bytes(_artifact(seed=2).to_safetensors())  # half of another calibration
    with pytest.raises(CalibrationFileError, match="tensor file kept changing"):
        store.get("tiny-digits", "2", "torch")
    store.save(_artifact(seed=1, version="1"))  # version 1's calibration ...
    json_path.write_bytes(store.paths("tiny-digits", "1", "torch")[0].read_bytes())
    tensor_path.write_bytes(store.paths("tiny-digits", "1", "torch")[1].read_bytes())
    with pytest.raises(CalibrationFileError, match="not tiny-digits version 2"):
        store.get("tiny-digits", "2", "torch")  # ... copied under version 2 is not version 2's
    with pytest.raises(ValueError, match="cannot name a calibration file"):
        store.paths("tiny-digits", "2", "../escape")


# ---- export-onnx --------------------------------------------------------------------------


def test_export_onnx_writes_a_step_graph_that_agrees_with_the_model(
    repository: ModelRepository, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "tiny.onnx"
    code = main(
        ["export-onnx", "tiny-digits", "--repository", str(repository.root), "--output",
         str(output)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    spec = json.loads(printed[printed.index("{") :])
    model = repository.load("tiny-digits").model
    state = model.init_state(3)
    x = torch.tensor(np.random.default_rng(0).uniform(0, 16, (3, 8)), dtype=torch.float32)
    with torch.inference_mode():
        expected, _ = model.step(x, state)  # [3, 10]
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    feeds = {"x": x.numpy()} | {
        f"state.{name}": state[name].numpy() for name in spec["state_names"]
    }
    assert [i.name for i in session.get_inputs()] == spec["inputs"]
    (logits, *_) = session.run(None, feeds)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5, rtol=0)
    assert main(["export-onnx", "nope", "--output", str(output)]) == 2
