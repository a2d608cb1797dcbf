"""The committed built-in artifacts: they load, reach their stated metrics on held-out data,
record the recipe that made them, and `neuroserve evaluate` reports them."""

from __future__ import annotations

from pathlib import Path

import pytest

from hardware_backends.energy import FP32_ACCUMULATE_JOULES, FP32_MAC_JOULES
from models.builtin import (
    BUILTIN_RECIPES,
    BUILTIN_TARGETS,
    MetricTarget,
    ReportRow,
    builtin_report,
    ensure_builtin_models,
    format_report,
    report_metrics,
)
from models.charcorpus import load_char_corpus
from models.evaluate import step_classification_metrics
from models.repository import ModelRepository, default_repository_root
from models.training import TrainingRecipe, load_training_data
from service.cli.models import main as cli_main

BUILTINS = ("digits-lru", "digits-snn", "digits-snn-lite", "charlm-selective", "charlm-moe")
LANGUAGE_MODELS = ("charlm-selective", "charlm-moe")


@pytest.fixture(scope="module")
def repository() -> ModelRepository:
    return ModelRepository(default_repository_root())


@pytest.fixture(scope="module")
def report(repository: ModelRepository) -> dict[str, dict]:
    return report_metrics(builtin_report(repository, sample_tokens=40))


def test_every_builtin_has_a_recipe_a_target_and_a_committed_artifact(
    repository: ModelRepository,
) -> None:
    assert set(BUILTIN_RECIPES) == set(BUILTIN_TARGETS) == set(BUILTINS)
    assert set(BUILTINS) <= set(repository.list_models())


@pytest.mark.parametrize("name", BUILTINS)
def test_artifact_records_its_recipe_and_command(repository: ModelRepository, name: str) -> None:
    config = repository.card(name).config
    # Read back as a recipe: an artifact older than a recipe field was trained with its
    # default (e.g. step_loss "last"), which the stored dict leaves out.
    assert TrainingRecipe(**config["training"]) == BUILTIN_RECIPES[name]
    assert config["dataset"]["spec"] == BUILTIN_RECIPES[name].dataset
    assert f"train --builtin {name}" in config["provenance"]["command"]
    assert len(config["provenance"]["data_sha256"]) == 64


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_reaches_its_stated_metric(
    repository: ModelRepository, report: dict[str, dict], name: str
) -> None:
    target = BUILTIN_TARGETS[name]
    measured = report[name][target.metric]
    stored = repository.card(name).config["metrics"][target.metric]
    assert target.met_by(measured), f"{name}: {target.metric} = {measured}, target {target}"
    if name in LANGUAGE_MODELS:
        # The corpus is this Python's stdlib docstrings: equal only where the text is equal.
        data_hash = repository.card(name).config["provenance"]["data_sha256"]
        if load_char_corpus().sha256 != data_hash:
            pytest.skip("this Python's stdlib docstrings differ from the training machine's")
    assert measured == pytest.approx(stored, abs=1e-4)


@pytest.mark.parametrize("name", ["digits-snn", "digits-snn-lite"])
def test_snn_reports_sparse_spiking_and_event_driven_cost(
    report: dict[str, dict], name: str
) -> None:
    snn = report[name]
    assert 0.0 < snn["test_spike_fraction"] < 0.5
    # Event-driven accumulates are far fewer than a dense implementation's operations.
    assert (
        snn["test_synaptic_ops_per_inference"]
        < 0.5 * snn["test_dense_equivalent_macs_per_inference"]
    )


def test_snn_lite_input_is_spike_driven_and_costs_a_fraction_of_digits_snn(
    report: dict[str, dict],
) -> None:
    lite, snn = report["digits-snn-lite"], report["digits-snn"]
    # thermometer-coded input spikes: the only dense MACs are the decays of 256 LIF neurons
    # (two each) and 10 readout units, on each of 8 steps
    assert lite["test_dense_macs_per_inference"] == 8 * (2 * 256 + 10)

    def nanojoules(metrics: dict) -> float:
        return 1e9 * (
            metrics["test_dense_macs_per_inference"] * FP32_MAC_JOULES
            + metrics["test_synaptic_ops_per_inference"] * FP32_ACCUMULATE_JOULES
        )

    assert nanojoules(lite) < nanojoules(snn) / 5
    assert lite["test_spike_fraction"] < snn["test_spike_fraction"]


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_language_model_beats_unigram_and_writes_text(report: dict[str, dict], name: str) -> None:
    lm = report[name]
    assert lm["valid_bpc"] < lm["unigram_valid_bpc"] - 1.5
    greedy = lm["sample_greedy"]
    assert greedy.startswith("Return the ") and len(greedy) == len("Return the ") + 40
    words = greedy.split()
    assert sum(word.isalpha() for word in words) >= len(words) // 2  # mostly real-looking words


def test_metric_target_bounds() -> None:
    assert MetricTarget("acc", minimum=0.9).met_by(0.9)
    assert not MetricTarget("acc", minimum=0.9).met_by(0.89)
    assert MetricTarget("bpc", maximum=2.5).met_by(2.4)
    assert not MetricTarget("bpc", maximum=2.5).met_by(2.6)


def test_format_report_aligns_columns() -> None:
    rows = [
        ReportRow("a", "1", "test_accuracy", 0.98765, ">= 0.97"),
        ReportRow("bb", "2", "x", "hi"),
    ]
    lines = format_report(rows).splitlines()
    assert lines[0].split() == ["model", "version", "metric", "value", "target"]
    assert lines[1].split() == ["a", "1", "test_accuracy", "0.9877", ">=", "0.97"]
    assert lines[2].split() == ["bb", "2", "x", "'hi'"]
    assert lines[0].index("value") == lines[1].index("0.9877") == lines[2].index("'hi'")


def test_cli_evaluate_prints_every_builtin(capsys) -> None:
    assert cli_main(["evaluate", "--sample-tokens", "10"]) == 0
    out = capsys.readouterr().out
    for name in BUILTINS:
        assert name in out
    for metric in ("test_accuracy", "test_spike_fraction", "valid_bpc", "unigram_valid_bpc"):
        assert metric in out


def test_ensure_builtin_models_trains_what_is_missing(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    trained = ensure_builtin_models(repo, ["digits-lru"])
    assert [card.name for card in trained] == ["digits-lru"]
    assert BUILTIN_TARGETS["digits-lru"].met_by(trained[0].config["metrics"]["test_accuracy"])
    # The recipe trains every step: after 4 of 8 rows it is right on ~91% of the test split
    # (~12% when trained on the last step only).
    test = load_training_data("digits-seq:rows").evaluation["test"]
    after = step_classification_metrics(repo.load("digits-lru").model, test)["accuracy"]
    assert after[3] >= 0.85
    assert ensure_builtin_models(repo, ["digits-lru"]) == []  # already there: nothing to do
    with pytest.raises(ValueError, match="unknown built-in 'nope'"):
        ensure_builtin_models(repo, ["nope"])
