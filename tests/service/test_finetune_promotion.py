"""Guarded promotion of fine-tuned versions (`service.finetuning.promotion`): a job always
publishes a candidate, `latest` moves only when the held-out accuracy improved beyond its
noise and the candidate is calibrated on every backend its base was; `output_name` of a model
of another lineage is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from models.repository import ModelRepository, VersionConflictError
from models.trajectory import load_calibration, load_serving
from service.cli.main import main
from service.finetuning.job import run_finetune
from service.finetuning.promotion import accuracy_margin, check_output_name, decide
from service.finetuning.spec import FinetuneSpec
from tests.service.conftest import copied_repository, publish_lru, publish_tiny_lru

TRANSLATED = {"kind": "builtin", "shift": "translated"}
BASE_BACKENDS = ("torch", "stochastic", "onnxruntime")


@pytest.fixture(scope="module")
def base_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LRU trained on clean digits (~3 s), calibrated on three backends, and an
    untrained LRU of another lineage (`other-lru`)."""
    root = tmp_path_factory.mktemp("promotion-base")
    repository = ModelRepository(root)
    publish_tiny_lru(repository)
    for backend in BASE_BACKENDS:
        assert main(["calibrate", "tiny", "--backend", backend, "--repository", str(root)]) == 0
    return root


@pytest.fixture
def repo(base_root: Path, tmp_path: Path) -> ModelRepository:
    return copied_repository(base_root, tmp_path)


def _spec(**overrides) -> FinetuneSpec:
    fields = {"model": "tiny", "data": TRANSLATED, "steps": 300, "lr": 2e-3, "eval_every": 100}
    return FinetuneSpec(**{**fields, **overrides})


def test_the_margin_is_the_paired_standard_error_times_z() -> None:
    before = torch.tensor([True] * 50 + [False] * 50)
    after = torch.tensor([True] * 60 + [False] * 40)  # 10 more right, none lost
    improvement, se, margin = accuracy_margin(before, after, 2.0)
    d = torch.tensor([0.0] * 50 + [1.0] * 10 + [0.0] * 40)
    assert improvement == pytest.approx(0.1)
    assert se == pytest.approx(float(d.std()) / 10)  # sqrt(n) = 10
    assert margin == pytest.approx(2 * se)
    # Swapping which examples are right without changing the count is no improvement.
    shuffled = torch.tensor([False] * 50 + [True] * 50)
    decision = decide(
        requested=True,
        z=1.645,
        correct_before=before,
        correct_after=shuffled,
        required=["torch"],
        calibrated=["torch"],
        calibration_errors={},
        new_model=False,
    )
    assert not decision.promoted and "not more than the margin" in decision.reason


def test_a_job_that_does_not_improve_publishes_a_candidate_but_not_latest(repo) -> None:
    # Updates of 1e-30 leave the weights as they were: no accuracy to gain.
    result = run_finetune(_spec(lr=1e-30, steps=20, eval_every=10), repo)
    assert result.status == "completed" and result.version == "2"
    promotion = result.promotion
    assert promotion.requested and not promotion.promoted
    assert promotion.improvement == 0.0 and "margin" in promotion.reason
    assert promotion.latest == "1" and repo.latest("tiny") == "1"
    assert repo.versions("tiny") == ["1", "2"]  # the candidate is there, by number
    assert repo.card("tiny", "2").config["finetune"]["promotion"]["promoted"] is False


def test_an_improving_job_is_promoted_and_calibrated_on_every_backend_of_its_base(repo) -> None:
    result = run_finetune(_spec(), repo)
    promotion = result.promotion
    assert promotion.improvement > promotion.margin > 0, promotion
    assert promotion.promoted and promotion.latest == result.version == repo.latest("tiny")
    assert promotion.backends_required == sorted(BASE_BACKENDS)
    assert promotion.backends_calibrated == sorted(BASE_BACKENDS)
    card = repo.card("tiny", result.version)
    for backend in BASE_BACKENDS:
        artifact = load_calibration(card, backend)
        assert (artifact.model, artifact.version, artifact.backend) == (
            "tiny",
            result.version,
            backend,
        )
        # fitted with the base calibration's own options, on the job's data
        base_options = load_serving(repo.card("tiny", "1"), backend)["backend_options"]
        assert load_serving(card, backend)["backend_options"] == base_options
    assert card.config["lineage"] == "tiny"


def test_promotion_is_refused_when_a_base_backend_cannot_be_calibrated(repo) -> None:
    # A calibration for a backend this server does not have (its files copied from torch's).
    folder = repo.version_path("tiny", "1") / "calibration"
    for suffix in (".json", ".safetensors"):
        shutil.copy(folder / f"torch{suffix}", folder / f"missing_chip{suffix}")
    result = run_finetune(_spec(steps=2), repo)
    promotion = result.promotion
    assert not promotion.promoted and "missing_chip" in promotion.reason
    assert "missing_chip" in promotion.calibration_errors
    assert repo.latest("tiny") == "1"


def test_a_job_that_does_not_ask_is_not_promoted(repo) -> None:
    result = run_finetune(_spec(steps=20, promote=False), repo)
    assert not result.promotion.promoted and "did not ask" in result.promotion.reason
    assert repo.latest("tiny") == "1"


def test_output_name_of_another_lineage_is_refused(repo) -> None:
    publish_lru(repo, "other-lru", seed=5)
    base = repo.card("tiny")
    with pytest.raises(VersionConflictError, match="another lineage"):
        check_output_name(repo, "other-lru", base)
    check_output_name(repo, "tiny", base)  # its own name
    check_output_name(repo, "brand-new", base)  # a new one
    with pytest.raises(VersionConflictError, match="another lineage"):
        run_finetune(_spec(steps=2, output_name="other-lru"), repo)
    assert repo.versions("other-lru") == ["1"]


def test_a_tuned_copy_under_a_new_name_keeps_its_lineage(repo) -> None:
    result = run_finetune(_spec(steps=2, output_name="tiny-shifted", promote=False), repo)
    # the first version of a new model is its latest whatever the guard says
    assert result.promotion.promoted and "first version" in result.promotion.reason
    assert result.promotion.latest == "1" and repo.latest("tiny-shifted") == "1"
    check_output_name(repo, "tiny-shifted", repo.card("tiny"))  # same lineage: allowed
