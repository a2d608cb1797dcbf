"""The model repository: publish/load round trips, verification of artifacts, atomicity."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.architectures import build_model, config_to_dict
from models.repository import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    ModelNotFoundError,
    ModelRepository,
    default_repository_root,
    file_sha256,
)

TINY_LRU = {"d_input": 3, "d_output": 4, "d_model": 8, "d_state": 4, "n_layers": 1}
TINY_LM = {"vocab_size": 11, "d_output": 11, "d_model": 8, "d_state": 2, "n_layers": 1}


def _classifier(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("lru", dict(TINY_LRU)).eval()
    config = {
        "architecture": "lru",
        "model_config": config_to_dict(model.config),
        "task": "classification",
        "labels": ["a", "b", "c", "d"],
        "input": {"kind": "features", "features": 3, "dtype": "float32", "value_range": [0, 1]},
        "dataset": {"spec": "synthetic"},
        "provenance": {
            "data_sha256": "0" * 64,
            "seed": seed,
            "command": "test",
            "created": "2024-01-01T00:00:00+00:00",
            "torch_version": torch.__version__,
            "neuroserve_version": "test",
        },
        "metrics": {},
    }
    return model, config


def _publish(repo: ModelRepository, name: str = "toy", seed: int = 0):
    model, config = _classifier(seed)
    return model, repo.publish(name, config, model.state_dict())


def test_save_then_load_gives_identical_outputs(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    model, card = _publish(repo)
    assert (card.name, card.version, card.path) == ("toy", "1", tmp_path / "toy" / "1")
    assert card.config["weights_sha256"] == file_sha256(card.path / WEIGHTS_FILE)
    # Readable by everyone, as a server may run as another user than the publisher.
    assert card.path.stat().st_mode & 0o777 == 0o755
    assert {(p.name, p.stat().st_mode & 0o777) for p in card.path.iterdir()} == {
        (CONFIG_FILE, 0o644),
        (WEIGHTS_FILE, 0o644),
    }
    loaded = repo.load("toy")
    assert loaded.card == card and not loaded.model.training
    x = torch.rand(5, 7, 3)  # [B, T, F]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)[0], model(x)[0], rtol=0, atol=0)
    assert repo.load("toy", "1") is loaded  # cached


def test_tied_weights_are_stored_once_and_restored(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model("selective", dict(TINY_LM)).eval()
    _, config = _classifier()
    config.update(
        architecture="selective",
        model_config=config_to_dict(model.config),
        task="language-model",
        vocabulary=[chr(97 + i) for i in range(11)],
        input={"kind": "tokens", "vocab_size": 11},
    )
    del config["labels"]
    repo = ModelRepository(tmp_path)
    card = repo.publish("lm", config, model.state_dict())
    stored = load_file(card.path / WEIGHTS_FILE)
    assert "encoder.embed.weight" in stored and "head.weight" not in stored
    loaded = repo.load("lm").model
    assert loaded.head.weight is loaded.encoder.embed.weight
    tokens = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], rtol=0, atol=0)


def test_versions_sort_numerically_and_skip_other_entries(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    _publish(repo)
    for entry in ("10", "2", "01", "abc", ".publishing-toy-x"):
        (tmp_path / "toy" / entry).mkdir()
    (tmp_path / ".publishing-other-123").mkdir()
    (tmp_path / "empty").mkdir()
    assert repo.versions("toy") == ["1", "2", "10"]
    assert repo.latest("toy") == "10"
    assert repo.list_models() == ["toy"]
    assert repo.versions("absent") == []


def test_publish_numbers_versions_and_keeps_old_ones(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    first_model, first = _publish(repo, seed=0)
    _, second = _publish(repo, seed=1)
    assert (first.version, second.version) == ("1", "2")
    assert repo.latest("toy") == "2" and repo.card("toy").version == "2"
    assert json.loads((second.path / CONFIG_FILE).read_text())["version"] == "2"
    x = torch.rand(2, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(repo.load("toy", "1").model(x)[0], first_model(x)[0])


def test_unknown_models_and_versions_name_what_exists(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    _publish(repo)
    with pytest.raises(ModelNotFoundError, match=r"no model named 'nope'.*available: \['toy'\]"):
        repo.load("nope")
    with pytest.raises(ModelNotFoundError, match=r"no version '7'; available versions: \['1'\]"):
        repo.card("toy", "7")


@pytest.mark.parametrize(
    "name", ["..", "../escape", "a/b", "a\\b", "", ".hidden", "x" * 200, "name\n"]
)
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    repo = ModelRepository(tmp_path)
    model, config = _classifier()
    with pytest.raises(ValueError, match="invalid model name"):
        repo.publish(name, config, model.state_dict())
    with pytest.raises(ValueError, match="invalid model name"):
        repo.versions(name)


def test_corrupted_weights_are_refused(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    _, card = _publish(repo)
    weights = card.path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights.safetensors: sha256 .* does not match"):
        ModelRepository(tmp_path).load("toy")
    weights.unlink()
    with pytest.raises(ArtifactError, match="weights.safetensors: missing"):
        ModelRepository(tmp_path).load("toy")


def _edit_config(card, **changes) -> None:
    config = json.loads((card.path / CONFIG_FILE).read_text())
    config.update(changes)
    (card.path / CONFIG_FILE).write_text(json.dumps(config))


def test_replaced_weights_with_other_tensors_are_named(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    _, card = _publish(repo)
    weights = card.path / WEIGHTS_FILE
    tensors = load_file(weights)
    tensors["head.weight"] = torch.zeros(5, 8)  # wrong shape
    tensors["surprise"] = torch.zeros(1)
    del tensors["head.bias"]
    save_file(tensors, str(weights))
    _edit_config(card, weights_sha256=file_sha256(weights))  # a consistent but wrong artifact
    with pytest.raises(ArtifactError) as error:
        ModelRepository(tmp_path).load("toy")
    message = str(error.value)
    assert "missing tensors ['head.bias']" in message
    assert "unexpected tensors ['surprise']" in message
    assert "head.weight: expected [4, 8], found [5, 8]" in message


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_config": {**TINY_LRU, "d_model": 16}}, "shape mismatches"),
        ({"state_schema_hash": "f" * 64}, "state_schema_hash .* does not match"),
        ({"labels": ["a", "b"]}, r"2 labels but model_config.d_output is 4"),
        ({"task": "regression"}, "task must be one of"),
        ({"version": "3"}, "says name='toy' version='3' but lives at toy/1"),
        ({"architecture": "transformer"}, "cannot build the model"),
    ],
)
def test_edited_configs_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    repo = ModelRepository(tmp_path)
    _, card = _publish(repo)
    _edit_config(card, **change)
    with pytest.raises(ArtifactError, match=message):
        ModelRepository(tmp_path).load("toy")


def test_unparsable_or_incomplete_config_is_refused(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    _, card = _publish(repo)
    config_path = card.path / CONFIG_FILE
    complete = json.loads(config_path.read_text())
    del complete["provenance"]
    config_path.write_text(json.dumps(complete))
    with pytest.raises(ArtifactError, match=r"config.json: missing required keys \['provenance'\]"):
        repo.card("toy")
    config_path.write_text("{not json")
    with pytest.raises(ArtifactError, match="config.json: not valid JSON"):
        repo.card("toy")


def test_publish_refuses_a_state_dict_that_does_not_fit(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    model, config = _classifier()
    state = model.state_dict()
    state["head.weight"] = torch.zeros(3, 8)
    with pytest.raises(ArtifactError, match=r"head.weight: expected \[4, 8\], found \[3, 8\]"):
        repo.publish("toy", config, state)
    with pytest.raises(ValueError, match=r"config lacks \['provenance'\]"):
        repo.publish("toy", {k: v for k, v in config.items() if k != "provenance"}, state)
    assert repo.versions("toy") == []


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".publishing-" in p.name)


def test_failed_publish_leaves_no_partial_version(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    _publish(repo)
    model, config = _classifier(seed=3)
    with pytest.raises(TypeError):  # the extra file fails to write after the weights did
        repo.publish("toy", config, model.state_dict(), extra_files={"notes.txt": "not bytes"})
    assert repo.versions("toy") == ["1"] and _leftovers(tmp_path) == []


def test_failure_at_the_rename_leaves_no_partial_version(tmp_path: Path, monkeypatch) -> None:
    repo = ModelRepository(tmp_path)
    model, config = _classifier()

    def failing_rename(source, destination) -> None:
        raise PermissionError(13, "simulated failure", str(destination))

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(PermissionError):
        repo.publish("toy", config, model.state_dict(), extra_files={"notes.txt": b"hi"})
    monkeypatch.undo()
    assert repo.versions("toy") == [] and _leftovers(tmp_path) == []
    card = repo.publish("toy", config, model.state_dict(), extra_files={"notes.txt": b"hi"})
    assert (card.path / "notes.txt").read_bytes() == b"hi"


def test_concurrent_publishes_get_distinct_versions(tmp_path: Path) -> None:
    model, config = _classifier()
    cards = []

    def publish() -> None:  # separate repository objects, as separate processes would have
        cards.append(ModelRepository(tmp_path).publish("toy", config, model.state_dict()))

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(card.version for card in cards) == ["1", "2", "3", "4"]
    repo = ModelRepository(tmp_path)
    assert all(repo.card("toy", v).config["version"] == v for v in repo.versions("toy"))


def test_concurrent_loads_build_once(tmp_path: Path) -> None:
    _publish(ModelRepository(tmp_path))
    repo = ModelRepository(tmp_path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(repo.load("toy"))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6 and all(result is results[0] for result in results)


def test_default_root_is_the_committed_artifacts_folder() -> None:
    assert default_repository_root() == Path(__file__).resolve().parents[2] / "models" / "artifacts"


def test_a_candidate_publish_leaves_latest_where_it_was(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    _publish(repo, seed=0)  # no pointer file yet: the highest version is latest
    model, config = _classifier(seed=1)
    card = repo.publish("toy", config, model.state_dict(), promote=False)
    assert card.version == "2"
    assert repo.latest("toy") == "1"
    assert ModelRepository(tmp_path).latest("toy") == "1"  # another replica sees the same
