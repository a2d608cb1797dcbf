"""`neuroserve calibrate` and `neuroserve export-onnx`: a calibration per position (per step for
classifiers, per context-length bucket for language models) written beside the weights and
served at once, each answer by its own position's calibration and uncalibrated past the
horizon; backend options recorded and compared; clear refusals; the committed built-in
calibrations (format 2 on every backend, reproduced by the command they record); the store's
refusal of mismatched, foreign and old-format files; the reliability plot; and an exported
step that agrees with the model."""

from __future__ import annotations

import functools
import json
import shlex
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime
import pytest
import torch

from calibration import (
    CalibrationArtifact,
    PositionalCalibration,
    PositionBuckets,
    fit_calibration_artifact,
)
from models.digits import load_digits_seq
from models.repository import CONFIG_FILE, WEIGHTS_FILE, ModelRepository, default_repository_root
from models.userdata import load_npz_dataset
from service.app import create_app
from service.cli import main
from service.dataplane.calibration_data import (
    LM_BUCKET_EDGES,
    LM_WINDOWS,
    HeldOutText,
    language_examples,
    prepared_runner,
    stepwise_logits,
)
from service.dataplane.calibration_store import CalibrationFileError, CalibrationStore
from service.settings import Settings
from tests.service.conftest import CHAR_VOCABULARY, publish_lru, running_server
from tests.service.test_cli import run_cli

BUILT_IN_MODELS = (
    "digits-lru",
    "digits-snn",
    "digits-snn-lite",
    "charlm-selective",
    "charlm-moe",
)
BUILT_IN_BACKENDS = ("torch", "onnxruntime", "analog_imc", "stochastic")
NPZ_STEPS = 4  # the npz calibration data: the first rows of each digit (a short horizon)
NPZ_IMAGES = 200
LM_POSITIONS = ["1", "2-3", "4-7", "8-15", "16-1024"]  # the context-length buckets


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The fits and runs here are small: a second torch thread only contends for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    inputs = split.inputs[:NPZ_IMAGES, :NPZ_STEPS].numpy()  # [200, 4, 8]
    np.savez(path, inputs=inputs, labels=split.labels[:NPZ_IMAGES].numpy())
    return path


def calibrate(repository: ModelRepository, *args: str) -> int:
    return main(["calibrate", *args, "--repository", str(repository.root)])


def digit_prefixes(rows: int, count: int = 4) -> list:
    """The first `rows` rows of `count` test digits, as JSON inputs [count][rows][8]."""
    return load_digits_seq("test").inputs[:count, :rows].tolist()


def members(mask: torch.Tensor) -> list[str]:
    """The digit labels of a set mask [10]."""
    return [str(d) for d in mask.nonzero().flatten().tolist()]


# ---- calibrate ------------------------------------------------------------------------------


def test_help_lists_the_new_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "calibrate" in result.stdout and "export-onnx" in result.stdout


def test_calibrating_from_an_npz_stores_a_calibration_per_step_the_server_uses(
    repository: ModelRepository, calibration_npz: Path, tmp_path: Path, capsys
) -> None:
    plot = tmp_path / "reliability.png"
    code = calibrate(
        repository, "tiny-digits", "--data", str(calibration_npz), "--plot", str(plot),
        "--seed", "3",
    )  # fmt: skip
    output = capsys.readouterr()
    assert code == 0, output.err
    assert f"{NPZ_STEPS} positions up to {NPZ_STEPS}" in output.out
    assert "position  map" in output.out and "ece before/after" in output.out
    assert f"wrote {plot}" in output.out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000

    stored = CalibrationStore(repository).get("tiny-digits", "2", "torch")
    assert stored is not None
    positional = stored.positional
    assert positional.buckets == PositionBuckets.every_step(NPZ_STEPS)
    for artifact in positional.artifacts:
        assert (artifact.model, artifact.version, artifact.backend, artifact.seed) == (
            "tiny-digits", "2", "torch", 3,
        )  # fmt: skip
        assert artifact.n + artifact.n_tune == NPZ_IMAGES and artifact.num_classes == 10
    assert stored.source["data"] == "npz:holdout.npz"
    assert stored.source["data_sha256"] == load_npz_dataset(calibration_npz).sha256
    assert stored.backend_options == {} and stored.report == {}  # no test data of its own
    summary = stored.summary()
    assert summary["horizon"] == NPZ_STEPS
    assert [(p["first"], p["last"]) for p in summary["positions"]] == [(t, t) for t in (1, 2, 3, 4)]

    settings = Settings(model_repository=repository.root, allow_uncalibrated=False)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url) as http:
        body = {"inputs": digit_prefixes(3), "alpha": 0.1, "score": "lac", "never_empty": False}
        answer = http.post("/v1/models/tiny-digits/predict", json=body).json()
        assert answer["calibrated"] is True and answer["warnings"] == []
        # Step 3's calibration, exactly: the same run through the torch backend, then at(3).
        runner = prepared_runner(repository, repository.card("tiny-digits"), "torch", {})
        logits = stepwise_logits(runner, torch.tensor(body["inputs"]))[:, -1]  # [4, 10]
        probs, sets = stored.at(3).predict(logits, 0.1, "lac")
        for prediction, row_probs, row_set in zip(answer["predictions"], probs, sets, strict=True):
            assert prediction["position"] == 3 and prediction["calibrated"] is True
            assert prediction["probabilities"] == row_probs.tolist()
            assert prediction["prediction_set"] == members(row_set)

        past = http.post(
            "/v1/models/tiny-digits/predict", json={"inputs": digit_prefixes(NPZ_STEPS + 1)}
        ).json()
        assert past["calibrated"] is False
        assert all(p["prediction_set"] is None for p in past["predictions"])
        assert any(f"past the {NPZ_STEPS} steps" in warning for warning in past["warnings"])
        untouched = http.post(
            "/v1/models/tiny-digits/predict", json={"inputs": digit_prefixes(3), "version": 1}
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
        body = {"inputs": digit_prefixes(NPZ_STEPS, count=2), "backend": "stochastic"}
        same = http.post(
            "/v1/models/tiny-digits/predict",
            json={**body, "backend_options": {"relative_std": 0.1, "samples": 4}},
        ).json()
        assert same["calibrated"] is True and same["warnings"] == []
        other = http.post(
            "/v1/models/tiny-digits/predict",
            json={**body, "backend_options": {"samples": 8}},
        ).json()
        assert other["calibrated"] is False
        assert all(p["prediction_set"] is None for p in other["predictions"])
        (warning,) = other["warnings"]
        assert "{'relative_std': 0.1, 'samples': 4}" in warning and "{'samples': 8}" in warning
        assert "neuroserve calibrate tiny-digits --backend stochastic" in warning


def test_a_language_model_is_calibrated_per_context_bucket(
    repository: ModelRepository, tmp_path: Path, capsys
) -> None:
    text = tmp_path / "holdout.txt"
    rng = np.random.default_rng(0)
    text.write_text("".join(rng.choice(CHAR_VOCABULARY, size=6000)))
    code = calibrate(repository, "tiny-charlm", "--data", str(text))
    output = capsys.readouterr()
    assert code == 0, output.err
    assert (
        "5 positions up to 1024" in output.out and "by position on text:holdout.txt" in output.out
    )
    stored = CalibrationStore(repository).get("tiny-charlm", "1", "torch")
    assert stored is not None
    positional = stored.positional
    assert positional.buckets.edges == LM_BUCKET_EDGES and positional.horizon == 1024
    assert [positional.buckets.describe(k) for k in range(5)] == LM_POSITIONS
    for artifact in positional.artifacts:
        assert artifact.num_classes == len(CHAR_VOCABULARY)
        assert artifact.n + artifact.n_tune == LM_WINDOWS
    assert stored.source["data"].startswith("text:holdout.txt (first 50%)")
    assert "early_decisions" not in stored.report
    assert {row["position"] for row in stored.report["positions"]} == set(LM_POSITIONS)

    settings = Settings(model_repository=repository.root)
    prompts = ["".join(rng.choice(CHAR_VOCABULARY, size=size)) for size in (2, 1024, 1025)]
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url) as http:
        answer = http.post("/v1/models/tiny-charlm/predict", json={"inputs": prompts}).json()
    short, longest, past = answer["predictions"]
    assert [p["position"] for p in answer["predictions"]] == [2, 1024, 1025]
    assert short["calibrated"] and longest["calibrated"] and longest["prediction_set"] is not None
    assert past["calibrated"] is False and past["prediction_set"] is None
    assert answer["calibrated"] is False
    assert any("position 1025 lies past the 1024" in warning for warning in answer["warnings"])


def test_language_examples_pair_each_context_with_the_token_after_it(
    repository: ModelRepository,
) -> None:
    """Every example of a bucket is a context of a length in that bucket, read from the text,
    labelled with the token that follows it: found by matching its logits against the model's
    logits for every (start, length) of a short text."""
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, len(CHAR_VOCABULARY), 40))
    runner = prepared_runner(repository, repository.card("tiny-charlm"), "torch", {})
    buckets = PositionBuckets((1, 2, 4, 8))
    examples = language_examples(runner, HeldOutText("t", ids), seed=0, buckets=buckets, windows=30)
    starts = torch.arange(ids.shape[0] - buckets.horizon)  # every start the sampler can draw
    windows = ids[starts[:, None] + torch.arange(buckets.horizon)]  # [S, 7]
    every = stepwise_logits(runner, windows)  # [S, 7, C] after every length
    for k in range(len(buckets)):
        low, high = buckets.bounds(k)
        assert examples.logits[k].shape == (30, len(CHAR_VOCABULARY))
        for logits, label in zip(examples.logits[k], examples.labels[k], strict=True):
            matches = [
                (int(start), length)
                for length in range(low, high + 1)
                for start in starts
                if torch.allclose(every[start, length - 1], logits, rtol=0, atol=1e-6)
            ]
            assert matches, f"an example of bucket {buckets.describe(k)} is no context of it"
            assert any(int(ids[start + length]) == int(label) for start, length in matches)


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


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("abc " * 500, "has 1000 tokens; calibrating contexts up to 1024 tokens needs more"),
        ("ABC " * 1000, "outside the model's vocabulary: ['A', 'B', 'C']"),
    ],
)
def test_text_that_cannot_calibrate_the_model_is_refused(
    repository: ModelRepository, tmp_path: Path, text: str, fragment: str, capsys
) -> None:
    path = tmp_path / "holdout.txt"
    path.write_text(text)
    assert calibrate(repository, "tiny-charlm", "--data", str(path)) == 2
    assert fragment in capsys.readouterr().err


# ---- the committed built-in calibrations ------------------------------------------------------


def test_every_built_in_model_is_calibrated_on_every_built_in_backend() -> None:
    store = CalibrationStore(ModelRepository(default_repository_root()))
    digits_sha256 = load_digits_seq("calibration").sha256
    for model in BUILT_IN_MODELS:
        assert set(BUILT_IN_BACKENDS) <= set(store.calibrated_backends(model, "1"))
        for backend in BUILT_IN_BACKENDS:
            json_path, _ = store.paths(model, "1", backend)
            assert json.loads(json_path.read_text())["format"] == 2, json_path
            stored = store.get(model, "1", backend)
            positional = stored.positional
            assert (positional.model, positional.backend) == (model, backend)
            assert stored.backend_options == {}
            assert stored.source["command"] == f"neuroserve calibrate {model} --backend {backend}"
            if model.startswith("digits"):
                assert positional.buckets == PositionBuckets.every_step(8)
                assert positional.horizon == 8 and positional.num_classes == 10
                assert stored.source["data_sha256"] == digits_sha256
                assert all(a.n + a.n_tune == 400 for a in positional.artifacts)
                assert {row["score"] for row in stored.report["early_decisions"]} == {"lac", "raps"}
            else:  # windows of the held-out docstrings, per context-length bucket
                assert positional.buckets.edges == LM_BUCKET_EDGES and positional.horizon == 1024
                assert stored.source["data"].startswith("charcorpus/stdlib-docstrings")
                assert positional.num_classes == 97 and stored.source["n"] == LM_WINDOWS
                assert "early_decisions" not in stored.report
            positions = {row["position"] for row in stored.report["positions"]}
            assert positions == {
                positional.buckets.describe(k) for k in range(len(positional.buckets))
            }


FLOAT32_LOGIT_NOISE = 1e-5


def assert_same_json(a: Any, b: Any, where: str = "") -> None:
    """Equal JSON, numbers to float32 precision (see FLOAT32_LOGIT_NOISE), all else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_json(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_json(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=FLOAT32_LOGIT_NOISE, abs=FLOAT32_LOGIT_NOISE), where
    else:
        assert a == b, where


def test_the_committed_torch_calibration_is_reproduced_by_the_command_it_records(
    tmp_path: Path, capsys
) -> None:
    built_in = ModelRepository(default_repository_root())
    committed = CalibrationStore(built_in).get("digits-lru", "1", "torch")
    copy = ModelRepository(tmp_path / "copy")
    target = copy.version_path("digits-lru", "1")
    target.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy(built_in.version_path("digits-lru", "1") / name, target / name)
    program, *args = shlex.split(committed.source["command"])
    assert program == "neuroserve" and args[:2] == ["calibrate", "digits-lru"]
    assert main([*args, "--repository", str(copy.root)]) == 0, capsys.readouterr().err
    fresh = CalibrationStore(copy).get("digits-lru", "1", "torch")
    old, new = committed.positional.tensors(), fresh.positional.tensors()
    assert old.keys() == new.keys()
    # The same float32 model on another CPU may round its logits differently (another SIMD
    # kernel), which moves scores by ~1e-7: the same calibration to float32 precision.
    for name in old:
        assert torch.allclose(old[name], new[name], rtol=0, atol=FLOAT32_LOGIT_NOISE), name
    for old_fit, new_fit in zip(
        committed.positional.artifacts, fresh.positional.artifacts, strict=True
    ):
        # The data hash hashes the scores' bits, compared above to float32 precision.
        unstamped = {"created": None, "data_hash": None}
        assert_same_json(old_fit.to_json_dict() | unstamped, new_fit.to_json_dict() | unstamped)
    assert_same_json(fresh.report, committed.report)
    assert fresh.source | {"command": None} == committed.source | {"command": None}


# ---- the store behind the command --------------------------------------------------------


@functools.cache
def _fitted() -> CalibrationArtifact:
    """One fit on synthetic logits that carry the label (fitting maps is slow)."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (60,), generator=generator)  # [60]
    noise = torch.randn(60, 10, generator=generator, dtype=torch.float64)  # [60, 10]
    logits = noise + 3 * torch.nn.functional.one_hot(labels, 10)  # [60, 10]
    return fit_calibration_artifact(logits, labels, "tiny-digits", "2", "torch", seed=1)


def _positional(created: str, version: str = "2", steps: int = 2) -> PositionalCalibration:
    """A calibration of tiny-digits for steps 1..`steps`, made at `created` (which tells two
    apart): the one fit, copied to every step (safetensors stores no shared tensors)."""
    fitted = _fitted()
    copies = tuple(
        replace(
            fitted,
            version=version,
            created=created,
            labels=fitted.labels.clone(),
            scores={name: scores.clone() for name, scores in fitted.scores.items()},
        )
        for _ in range(steps)
    )
    return PositionalCalibration(PositionBuckets.every_step(steps), copies)


def test_a_new_calibration_is_served_without_a_restart(repository: ModelRepository) -> None:
    store = CalibrationStore(repository)
    settings = Settings(model_repository=repository.root)
    body = {"inputs": digit_prefixes(2)}
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url) as http:
        assert http.post("/v1/models/tiny-digits/predict", json=body).status_code == 409
        first = _positional("2026-01-01T00:00:00+00:00")
        store.save(first, source={"data": "first"})
        assert store.get("tiny-digits", "2", "torch") is store.get("tiny-digits", "2", "torch")
        assert http.post("/v1/models/tiny-digits/predict", json=body).json()["calibrated"]
        status = http.get("/v1/models/tiny-digits/calibration").json()["fit"]
        assert status["calibration_id"] == first.calibration_id and status["horizon"] == 2

        second = _positional("2026-01-02T00:00:00+00:00", steps=3)
        store.save(second, source={"data": "second"})
        status = http.get("/v1/models/tiny-digits/calibration").json()["fit"]
        assert status["calibration_id"] == second.calibration_id and status["horizon"] == 3
        assert status["source"] == {"data": "second"}
        answer = http.post("/v1/models/tiny-digits/predict", json={"inputs": digit_prefixes(3)})
        assert answer.json()["calibrated"]  # step 3 is calibrated now


def test_mismatched_foreign_or_old_format_files_are_refused(repository: ModelRepository) -> None:
    store = CalibrationStore(repository)
    json_path, tensor_path = store.paths("tiny-digits", "2", "torch")
    store.save(_positional("2026-01-01T00:00:00+00:00"))
    other = _positional("2026-01-02T00:00:00+00:00", steps=3)
    tensor_path.write_bytes(other.to_safetensors())  # half of another calibration
    with pytest.raises(CalibrationFileError, match="does not match the sha256"):
        store.get("tiny-digits", "2", "torch")

    store.save(_positional("2026-01-01T00:00:00+00:00", version="1"))  # version 1's calibration ...
    json_path.write_bytes(store.paths("tiny-digits", "1", "torch")[0].read_bytes())
    tensor_path.write_bytes(store.paths("tiny-digits", "1", "torch")[1].read_bytes())
    with pytest.raises(CalibrationFileError, match="not tiny-digits version 2"):
        store.get("tiny-digits", "2", "torch")  # ... copied under version 2 is not version 2's

    old = _fitted()  # one calibration for all positions: the format before positions
    json_path.write_text(old.to_json())
    tensor_path.write_bytes(old.to_safetensors())
    with pytest.raises(CalibrationFileError, match=r"format 1.*run `neuroserve calibrate` again"):
        store.get("tiny-digits", "2", "torch")

    with pytest.raises(ValueError, match="cannot name a calibration file"):
        store.paths("tiny-digits", "2", "../escape")


def test_refusals_of_foreign_or_mismatched_files_name_the_fix(repository: ModelRepository) -> None:
    store = CalibrationStore(repository)
    json_path, tensor_path = store.paths("tiny-digits", "2", "torch")
    fix = "neuroserve calibrate tiny-digits --version 2 --backend torch"
    store.save(_positional("2026-01-01T00:00:00+00:00", version="1"))
    json_path.parent.mkdir(exist_ok=True)
    shutil.copy(store.paths("tiny-digits", "1", "torch")[0], json_path)
    shutil.copy(store.paths("tiny-digits", "1", "torch")[1], tensor_path)
    with pytest.raises(CalibrationFileError, match=fix):
        store.get("tiny-digits", "2", "torch")
    store.save(_positional("2026-01-01T00:00:00+00:00"))
    tensor_path.write_bytes(tensor_path.read_bytes()[:-8])  # damaged for good, not being written
    with pytest.raises(CalibrationFileError, match=fix):
        store.get("tiny-digits", "2", "torch")


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
