"""Where a version came from (`model_origin`) and the labels an import gets."""

from __future__ import annotations

import pytest

from models.imported import class_labels, model_origin
from models.repository import ModelRepository, default_repository_root
from models.training import TrainingRecipe


def test_built_in_artifacts_say_built_in() -> None:
    card = ModelRepository(default_repository_root()).card("digits-snn")
    origin = model_origin(card.config)
    assert origin["kind"] == "built-in"
    assert origin["command"].startswith("neuroserve train --builtin")


def test_trained_fine_tuned_and_imported_versions() -> None:
    trained = {"provenance": {"command": "neuroserve train --dataset npz:x.npz"}}
    assert model_origin(trained)["kind"] == "trained"
    assert model_origin({**trained, "finetune": {}})["kind"] == "fine-tuned"
    imported = {"imported": {"format": "nir", "file": "a.nir", "sha256": "0" * 64}}
    assert model_origin({**trained, **imported}) == {"kind": "imported", **imported["imported"]}


def test_labels_default_to_indices_and_must_fit_the_outputs() -> None:
    assert class_labels(None, 3) == ["0", "1", "2"]
    assert class_labels(["a", "b"], 2) == ["a", "b"]
    with pytest.raises(ValueError, match="--labels needs 3 distinct names"):
        class_labels(["a", "a", "b"], 3)


def test_imported_architectures_are_not_trained_here() -> None:
    with pytest.raises(ValueError, match="made by `neuroserve import`, not trained here"):
        TrainingRecipe(architecture="nir", dataset="digits-seq:rows")
