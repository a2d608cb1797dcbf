"""The fine-tuning job: spec validation, data splits, a short real run on shifted digits,
early stopping, cancellation, failures, and publishing with recalibration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from models.repository import ModelRepository
from models.trajectory import (
    TRAJECTORY_FILE,
    load_calibration,
    load_serving,
    read_trajectory,
    rebuild_weights,
)
from service.dataplane.calibration_store import CalibrationStore
from service.finetuning.job import load_finetune_data, run_finetune
from service.finetuning.spec import FinetuneSpec, ProgressEvent
from tests.service.conftest import copied_repository

DIGITS_LABELS = [str(d) for d in range(10)]
TRANSLATED = {"kind": "builtin", "shift": "translated"}


@pytest.fixture
def repo(tiny_lru_root: Path, tmp_path: Path) -> ModelRepository:
    return copied_repository(tiny_lru_root, tmp_path)


def _spec(**overrides) -> FinetuneSpec:
    """Plain all-parameter MeZO at fixed settings (the defaults: test_finetuning_targets.py)."""
    fields = {"model": "tiny", "data": TRANSLATED, "steps": 300, "lr": 2e-3, "eval_every": 100,
              "parameters": "all", "optimizer": "mezo", "eps": 1e-3}  # fmt: skip
    return FinetuneSpec(**{**fields, **overrides})


def _leftovers(repo: ModelRepository) -> list[str]:
    """Anything in the repository besides the base model's version 1."""
    entries = [p.name for p in repo.root.iterdir() if p.name != "tiny"]
    return entries + [v for v in repo.versions("tiny") if v != "1"]


# ---- the spec --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"lr": 0.0}, "lr"),
        ({"steps": 0}, "steps"),
        ({"eps": 1e-9}, "eps"),
        ({"batch_size": 100_000}, "batch_size"),
        ({"alpha": 1.0}, "alpha"),
        ({"eval_every": 0}, "eval_every"),
        ({"n_perturbations": 65}, "n_perturbations"),
        ({"optimizer": "adamw"}, "optimizer"),
        ({"parameters": "head"}, "parameters"),
        ({"backend": "onnxruntime"}, "backend"),
        ({"learning_rate": 0.1}, "learning_rate"),
        ({"model": "../etc"}, "model"),
        ({"data": {"kind": "builtin", "shift": "rotated"}}, "data.builtin.shift"),
        ({"data": {"kind": "npz", "path": "data.csv"}}, "data.npz.path"),
    ],
)
def test_bad_hyper_parameters_name_their_field(overrides: dict, field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        _spec(**overrides)
    locations = [".".join(str(p) for p in error["loc"]) for error in caught.value.errors()]
    assert field in locations, locations


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"validation_fraction": 0.5, "test_fraction": 0.3}, "keep it below 0.9"),
        ({"backend_options": {"seed": 1}}, "backend 'torch' takes no backend_options"),
        ({"backend": "analog_imc", "backend_options": {"sead": 1}}, "sead"),
        (
            {"data": {"kind": "inline", "inputs": [[[1.0]], [[1.0, 2.0]]], "labels": [0, 1]}},
            "inputs[1] is not [1, 1]",
        ),  # fmt: skip
        ({"data": {"kind": "inline", "inputs": [[[float("nan")]]], "labels": [0]}}, "finite"),
        ({"data": {"kind": "inline", "inputs": [[[1.0]]], "labels": [0, 1]}}, "2 labels for 1"),
    ],
)
def test_inconsistent_specs_are_explained(overrides: dict, message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message.replace("[", r"\[")):
        _spec(**overrides)


def test_a_spec_survives_json() -> None:
    spec = _spec(backend="analog_imc", backend_options={"seed": 3}, patience=2)
    assert FinetuneSpec.model_validate_json(spec.model_dump_json()) == spec


# ---- data ------------------------------------------------------------------------------------


def test_builtin_digits_splits_are_fixed_and_held_out() -> None:
    data = load_finetune_data(_spec(), DIGITS_LABELS, 8)
    assert data.split_sizes == {"tune": 800, "validation": 200, "calibration": 400, "test": 397}
    assert data.sha256 == load_finetune_data(_spec(), DIGITS_LABELS, 8).sha256
    reseeded = load_finetune_data(_spec(seed=1), DIGITS_LABELS, 8)
    assert reseeded.tune.sha256 != data.tune.sha256
    assert reseeded.calibration.sha256 == data.calibration.sha256  # the fixed digits split
    rows = lambda d: {x.numpy().tobytes() for x in d.inputs}  # noqa: E731
    assert not rows(data.tune) & rows(data.validation)


def test_user_data_is_cut_four_ways_without_losing_an_example(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(50, 4, 8)).astype(np.float32)
    labels = np.arange(50) % 10
    inline = {"kind": "inline", "inputs": inputs.tolist(), "labels": labels.tolist()}
    data = load_finetune_data(_spec(data=inline), DIGITS_LABELS, 8)
    assert data.split_sizes == {"tune": 20, "validation": 10, "calibration": 10, "test": 10}
    parts = (data.tune, data.validation, data.calibration, data.test)
    seen = sorted(x.numpy().tobytes() for part in parts for x in part.inputs)
    assert seen == sorted(x.tobytes() for x in inputs)

    path = tmp_path / "mine.npz"
    np.savez(path, inputs=inputs, labels=labels, label_names=np.array(DIGITS_LABELS))
    from_file = load_finetune_data(_spec(data={"kind": "npz", "path": str(path)}), DIGITS_LABELS, 8)
    assert from_file.split_sizes == data.split_sizes


@pytest.mark.parametrize(
    "n, features, labels, message",
    [
        (12, 8, DIGITS_LABELS, "too little data"),
        (50, 3, DIGITS_LABELS, "reads 8 features per step, the data has 3"),
        (50, 8, [str(d) for d in range(12)], "differ from the model's"),
    ],
)
def test_data_that_cannot_serve_the_model_is_refused(n, features, labels, message, tmp_path):
    path = tmp_path / "bad.npz"
    inputs = np.zeros((n, 4, features), dtype=np.float32)
    np.savez(path, inputs=inputs, labels=np.arange(n) % 10, label_names=np.array(labels))
    with pytest.raises(ValueError, match=message):
        load_finetune_data(_spec(data={"kind": "npz", "path": str(path)}), DIGITS_LABELS, 8)


# ---- running jobs ----------------------------------------------------------------------------


def test_a_short_run_on_shifted_digits_lowers_the_loss_and_publishes(repo) -> None:
    events: list[ProgressEvent] = []
    result = run_finetune(_spec(), repo, progress=events.append)
    json.dumps(result.model_dump(mode="json"))  # JSON-able

    history = result.history
    assert [p.step for p in history] == [0, 100, 200, 300]
    assert history[-1].validation_loss < history[0].validation_loss - 0.1
    assert result.after.nll < result.before.nll and result.after.accuracy > result.before.accuracy
    assert result.status == "completed" and result.version == "2" and result.steps_run == 300
    best = max(history, key=lambda p: (p.validation_accuracy, -p.validation_loss))
    assert result.best_step == best.step

    stages = [event.stage for event in events]
    assert stages[0] == "loading" and stages[-3:] == ["calibrating", "publishing", "done"]
    steps = [event.step for event in events if event.stage == "tuning"]
    assert steps == sorted(steps) and steps[-1] == 300

    card = repo.card("tiny", "2")
    trajectory = read_trajectory(card)
    assert trajectory.n_steps == result.best_step  # the checkpoint is the truncated run
    assert result.trajectory_bytes == (card.path / TRAJECTORY_FILE).stat().st_size
    expected, _ = rebuild_weights(repo.load("tiny", "1").model, trajectory)
    loaded = repo.load("tiny", "2").model
    for tuned, replayed in zip(loaded.parameters(), expected.parameters(), strict=True):
        assert torch.equal(tuned, replayed)
    artifact = load_calibration(card, "torch")
    assert (artifact.model, artifact.version, artifact.backend) == ("tiny", "2", "torch")
    assert card.config["finetune"]["after"] == result.after.model_dump()
    assert card.config["provenance"]["data_sha256"] == result.data_sha256


def test_patience_stops_a_run_that_makes_no_progress(repo) -> None:
    # Updates of 1e-30 are invisible in a float32 loss (even on weights that start at zero,
    # where 1e-9 moved the loss by enough to count as progress on some machines): every
    # evaluation ties with the first.
    result = run_finetune(_spec(lr=1e-30, steps=1000, eval_every=20, patience=3), repo)
    assert result.stop_reason == "patience" and result.steps_run == 60
    assert result.best_step == 0
    card = repo.card("tiny", result.version)
    assert read_trajectory(card).n_steps == 0  # the base itself, recalibrated on this data


def test_a_diverging_run_stops_and_keeps_its_best_checkpoint(repo) -> None:
    events: list[ProgressEvent] = []
    result = run_finetune(_spec(lr=1.0, steps=500, eval_every=1), repo, progress=events.append)
    assert result.stop_reason == "diverged" and result.steps_run < 500
    assert any(event.message.startswith("diverged") for event in events)
    assert result.after is not None and np.isfinite(result.after.nll)
    assert read_trajectory(repo.card("tiny", result.version)).n_steps == result.best_step


def test_cancelling_stops_cleanly_and_publishes_nothing(repo) -> None:
    polls = []

    def should_cancel() -> bool:
        polls.append(1)
        return len(polls) > 40

    events: list[ProgressEvent] = []
    result = run_finetune(_spec(), repo, progress=events.append, should_cancel=should_cancel)
    assert result.status == "cancelled" and result.version is None
    assert result.steps_run == 40 and result.after is None
    assert events[-1].stage == "cancelled"
    assert _leftovers(repo) == []


def test_a_failure_mid_job_leaves_no_version_behind(repo) -> None:
    def progress(event: ProgressEvent) -> None:
        if event.stage == "tuning" and event.step >= 150:
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        run_finetune(_spec(), repo, progress=progress)
    assert _leftovers(repo) == []

    def fail_at_publishing(event: ProgressEvent) -> None:
        if event.stage == "publishing":
            raise RuntimeError("shutting down")

    with pytest.raises(RuntimeError, match="shutting down"):
        run_finetune(_spec(steps=20), repo, progress=fail_at_publishing)
    assert _leftovers(repo) == []


def test_a_job_on_the_analog_chip_stores_an_analog_calibration(repo) -> None:
    spec = _spec(backend="analog_imc", backend_options={"seed": 2}, steps=3, eps=1e-2)
    result = run_finetune(spec, repo)
    card = repo.card("tiny", result.version)
    artifact = load_calibration(card, "analog_imc")
    assert (artifact.backend, artifact.version) == ("analog_imc", result.version)
    assert card.config["finetune"]["spec"]["backend_options"] == {"seed": 2}
    # The server answers calibrated only for the options the calibration ran with.
    assert load_serving(card, "analog_imc")["backend_options"] == {"seed": 2}
    stored = CalibrationStore(repo).get("tiny", result.version, "analog_imc")
    assert stored.fitted_with({"seed": 2}) and not stored.fitted_with({})


def test_an_unknown_model_is_reported(repo) -> None:
    from models.repository import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="nope"):
        run_finetune(_spec(model="nope"), repo)
