"""Versions as trajectories: record, JSON, replay (in this and in a fresh process), checksums,
corruption, chains of versions, export to safetensors, atomic publishing."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calibration import fit_stepwise_calibration
from models.architectures import build_model, config_to_dict
from models.finetune import attach_targets
from models.repository import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    ModelCard,
    ModelRepository,
    stored_tensors,
)
from models.trajectory import (
    TRAJECTORY_FILE,
    BaseReference,
    Trajectory,
    load_calibration,
    materialize_trajectory,
    rebuild_weights,
    tensor_digest,
)
from models.trajectory_publish import export_safetensors_version, publish_trajectory_version
from models.zo import ZOConfig, ZOOptimizer
from service.dataplane.calibration_store import CalibrationStore
from service.finetuning.forward import BackendForward

TINY_LRU = {"d_input": 3, "d_output": 4, "d_model": 8, "d_state": 4, "n_layers": 1}
REPO_ROOT = Path(__file__).resolve().parents[2]


def _publish_base(repo: ModelRepository, name: str = "toy", seed: int = 0) -> ModelCard:
    torch.manual_seed(seed)
    model = build_model("lru", dict(TINY_LRU)).eval()
    config = {
        "architecture": "lru",
        "model_config": config_to_dict(model.config),
        "task": "classification",
        "labels": ["a", "b", "c", "d"],
        "input": {"kind": "features", "features": 3, "dtype": "float32"},
        "provenance": {
            "data_sha256": "0" * 64,
            "seed": seed,
            "command": "test",
            "created": "2024-01-01T00:00:00+00:00",
            "torch_version": torch.__version__,
        },
    }
    return repo.publish(name, config, model.state_dict())


def _tune(repo: ModelRepository, base: ModelCard, steps: int = 12, selection: str = "all"):
    """A real ZO run from `base` on random data: (tuned model, trajectory, weights after each
    step)."""
    model = build_model("lru", base.config["model_config"])
    model.load_state_dict(repo.load(base.name, base.version).model.state_dict())
    model.eval()
    reference = BaseReference(base.name, base.version, base.config["weights_sha256"])
    config = ZOConfig(eps=1e-3, n_perturbations=2)
    optimizer = ZOOptimizer(attach_targets(model, selection), config)
    trajectory = Trajectory(reference, config, selection, optimizer.names)
    generator = torch.Generator().manual_seed(1)
    x, labels = torch.rand(16, 5, 3, generator=generator), torch.arange(16) % 4
    forward = BackendForward(model)
    checkpoints = [{k: v.clone() for k, v in model.state_dict().items()}]
    for step in range(steps):
        seeds = [100 * step + 1, 100 * step + 2]
        lr = 0.05 * (1 - step / steps)
        result = optimizer.step(seeds, lambda s: forward.loss(x, labels, "cross_entropy"), lr)
        trajectory.append(seeds, result.projected_grads, lr)
        checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, trajectory, checkpoints


def _publish_tuned(repo: ModelRepository, base: ModelCard, trajectory: Trajectory, name="toy"):
    base_model = repo.load(base.name, base.version).model
    _, tensors = rebuild_weights(base_model, trajectory)
    return publish_trajectory_version(
        repo, name, base, trajectory, tensor_digest(tensors), {"metrics": {"note": "test"}}
    )


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "repo")


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the record ------------------------------------------------------------------------------


def test_json_round_trip_keeps_every_value(repo: ModelRepository) -> None:
    _, trajectory, _ = _tune(repo, _publish_base(repo))
    data = trajectory.to_json_bytes()
    again = Trajectory.from_json_bytes(data, "test")
    assert again == trajectory
    assert again.to_json_bytes() == data
    assert json.loads(data)["n_steps"] == 12
    assert len(data) < 4000  # kilobytes, not a copy of the weights


def test_replay_reproduces_the_tuned_weights_and_every_checkpoint(repo: ModelRepository) -> None:
    base = _publish_base(repo)
    model, trajectory, checkpoints = _tune(repo, base)
    base_model = repo.load(base.name, base.version).model
    replayed, tensors = rebuild_weights(base_model, trajectory)
    assert _equal(tensors, stored_tensors(model, model.state_dict(), "tuned"))
    for k in (0, 1, 5, 12):
        _, at_k = rebuild_weights(base_model, trajectory.truncated(k))
        assert _equal(at_k, checkpoints[k]), f"checkpoint {k}"
    assert not _equal(checkpoints[0], checkpoints[12])


def test_a_published_trajectory_loads_through_the_repository(repo: ModelRepository) -> None:
    base = _publish_base(repo)
    model, trajectory, _ = _tune(repo, base, selection="readout_and_norm")
    card = _publish_tuned(repo, base, trajectory)
    assert card.version == "2" and not (card.path / WEIGHTS_FILE).exists()
    assert card.config["weights"]["kind"] == "trajectory"
    assert (card.path / TRAJECTORY_FILE).stat().st_size < 4000
    assert card.path.stat().st_mode & 0o777 == 0o755  # readable by a server of another user
    assert (card.path / TRAJECTORY_FILE).stat().st_mode & 0o777 == 0o644
    loaded = repo.load("toy", "2")
    assert _equal(loaded.model.state_dict(), model.state_dict())
    assert (
        tensor_digest(stored_tensors(loaded.model, loaded.model.state_dict(), "x"))
        == (card.config["weights_sha256"])
    )


def test_a_fresh_process_rebuilds_the_weights_bit_for_bit(
    repo: ModelRepository, tmp_path: Path
) -> None:
    base = _publish_base(repo)
    model, trajectory, _ = _tune(repo, base)
    card = _publish_tuned(repo, base, trajectory)
    out = tmp_path / "rebuilt.safetensors"
    script = textwrap.dedent(f"""
        from safetensors.torch import save_file
        from models.repository import ModelRepository
        from models.trajectory import materialize_trajectory
        repo = ModelRepository({str(repo.root)!r})
        save_file(materialize_trajectory(repo.card("toy", "2"), repo.load), {str(out)!r})
        print(repo.load("toy", "2").card.config["weights_sha256"])
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == card.config["weights_sha256"]
    rebuilt = load_file(out)
    assert _equal(rebuilt, stored_tensors(model, model.state_dict(), "tuned"))
    assert tensor_digest(rebuilt) == card.config["weights_sha256"]


# ---- refusing what does not check out --------------------------------------------------------


def _rewrite_trajectory(card: ModelCard, edit) -> None:
    """Edit trajectory.json and re-sign it in config.json, so only the replay can notice."""
    raw = json.loads((card.path / TRAJECTORY_FILE).read_text())
    edit(raw)
    data = json.dumps(raw).encode()
    (card.path / TRAJECTORY_FILE).write_bytes(data)
    config = json.loads((card.path / CONFIG_FILE).read_text())
    config["weights"]["file_sha256"] = hashlib.sha256(data).hexdigest()
    (card.path / CONFIG_FILE).write_text(json.dumps(config))


@pytest.fixture
def published(repo: ModelRepository) -> ModelCard:
    base = _publish_base(repo)
    _, trajectory, _ = _tune(repo, base)
    return _publish_tuned(repo, base, trajectory)


def test_a_changed_gradient_fails_the_checksum(repo: ModelRepository, published) -> None:
    def nudge(raw):
        raw["projected_grads"][3][0] *= 1.5

    _rewrite_trajectory(published, nudge)
    with pytest.raises(ArtifactError, match="replayed weights have sha256 .* torch"):
        repo.load("toy", "2")


def test_a_corrupted_file_is_refused_before_replay(repo: ModelRepository, published) -> None:
    path = published.path / TRAJECTORY_FILE
    path.write_bytes(path.read_bytes().replace(b'"n_steps": 12', b'"n_steps": 13'))
    with pytest.raises(ArtifactError, match="does not match file_sha256"):
        repo.load("toy", "2")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw["seeds"][2].append(5), "step 2: need 2 integer seeds"),
        (lambda raw: raw["learning_rates"].pop(), "n_steps says 12 but 11"),
        (lambda raw: raw["zo"].update(optimizer="sgd"), "malformed trajectory"),
        (lambda raw: raw.update(format_version=9), "format_version 9 is not supported"),
        (lambda raw: raw["parameter_names"].reverse(), "do not match the model's"),
    ],
)
def test_malformed_trajectories_are_refused_clearly(repo, published, edit, message) -> None:
    _rewrite_trajectory(published, edit)
    with pytest.raises(ArtifactError, match=message):
        materialize_trajectory(repo.card("toy", "2"), repo.load)


def test_a_replaced_base_is_refused(repo: ModelRepository, published) -> None:
    def other_base(raw):
        raw["base"]["weights_sha256"] = "f" * 64

    _rewrite_trajectory(published, other_base)
    with pytest.raises(ArtifactError, match="trajectory was recorded from f{64}"):
        repo.load("toy", "2")


def test_a_cycle_of_bases_is_refused_not_deadlocked(repo: ModelRepository, published) -> None:
    # Version 3: a copy of version 2 whose trajectory starts from version 2; then version 2's
    # trajectory is pointed at version 3, closing the loop.
    v3 = repo.version_path("toy", "3")
    v3.mkdir()
    for name in (TRAJECTORY_FILE, CONFIG_FILE):
        (v3 / name).write_bytes((published.path / name).read_bytes())
    config = json.loads((v3 / CONFIG_FILE).read_text())
    (v3 / CONFIG_FILE).write_text(json.dumps(dict(config, version="3")))
    card3 = repo.card("toy", "3")

    def base(card: ModelCard):
        return lambda raw: raw["base"].update(
            version=card.version, weights_sha256=card.config["weights_sha256"]
        )

    _rewrite_trajectory(card3, base(published))
    _rewrite_trajectory(published, base(card3))
    with pytest.raises(ArtifactError, match="in a cycle"):
        repo.load("toy", "2")


# ---- chains, exports, calibration ------------------------------------------------------------


def test_a_trajectory_can_start_from_a_trajectory_version(repo: ModelRepository) -> None:
    base = _publish_base(repo)
    _, first, _ = _tune(repo, base, steps=4)
    middle = _publish_tuned(repo, base, first)
    model, second, _ = _tune(repo, middle, steps=4, selection="readout_and_norm")
    top = _publish_tuned(repo, middle, second)
    assert top.version == "3"
    assert _equal(repo.load("toy", "3").model.state_dict(), model.state_dict())


def test_export_gives_a_plain_version_with_the_same_weights_and_calibration(
    repo: ModelRepository,
) -> None:
    """The calibration per step travels with a trajectory version and its export, keyed to
    each new name and version, and the server's calibration store reads it."""
    base = _publish_base(repo)
    model, trajectory, _ = _tune(repo, base)
    base_model = repo.load(base.name, base.version).model
    _, tensors = rebuild_weights(base_model, trajectory)
    step_logits = torch.randn(40, 2, 4, generator=torch.Generator().manual_seed(0))  # [N, T, C]
    calibration = fit_stepwise_calibration(step_logits, torch.arange(40) % 4, "toy", "0", "torch")
    card = publish_trajectory_version(
        repo, "toy", base, trajectory, tensor_digest(tensors), {}, calibrations=[calibration]
    )
    stored = load_calibration(card, "torch")
    assert (stored.model, stored.version, stored.horizon) == ("toy", "2", 2)
    served = CalibrationStore(repo).get("toy", "2", "torch")
    assert served is not None and served.positional.buckets == stored.buckets

    exported = export_safetensors_version(repo, "toy", "2", target_name="toy-plain")
    assert (exported.name, exported.version) == ("toy-plain", "1")
    assert (exported.path / WEIGHTS_FILE).is_file() and "weights" not in exported.config
    assert exported.config["provenance"]["exported_from"]["version"] == "2"
    assert _equal(repo.load("toy-plain").model.state_dict(), model.state_dict())
    copied = load_calibration(exported, "torch")
    assert (copied.model, copied.version) == ("toy-plain", "1")
    assert copied.buckets == stored.buckets == calibration.buckets
    for step in (1, 2):
        for artifact in (stored.at(step), copied.at(step)):
            assert torch.equal(artifact.scores["aps"], calibration.at(step).scores["aps"])
            assert (
                artifact.calibration_map.to_dict() == calibration.at(step).calibration_map.to_dict()
            )
    assert copied.at(3) is None  # past the calibrated horizon


# ---- atomic publishing ------------------------------------------------------------------------


def test_a_failure_while_publishing_leaves_nothing_behind(repo: ModelRepository) -> None:
    _publish_base(repo)

    def files_for(version: str) -> dict[str, bytes]:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        repo.publish_files("toy", files_for)
    assert repo.versions("toy") == ["1"]
    assert sorted(p.name for p in repo.root.iterdir()) == ["toy"]  # no temp dir left


def test_concurrent_publishers_get_distinct_versions(repo: ModelRepository) -> None:
    # The model's lock serialises them (`models.latest_pointer.model_lock`); all four start
    # together and each reads the listing it publishes after.
    _publish_base(repo)
    barrier = threading.Barrier(4)
    cards: list[ModelCard] = []

    def files_for(version: str) -> dict[str, bytes]:
        config = json.loads((repo.version_path("toy", "1") / CONFIG_FILE).read_text())
        config["version"] = version
        return {
            CONFIG_FILE: json.dumps(config).encode(),
            WEIGHTS_FILE: (repo.version_path("toy", "1") / WEIGHTS_FILE).read_bytes(),
        }

    def publish() -> None:
        barrier.wait(timeout=10)
        cards.append(repo.publish_files("toy", files_for))

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(card.version for card in cards) == ["2", "3", "4", "5"]
    assert all(
        json.loads((c.path / CONFIG_FILE).read_text())["version"] == c.version for c in cards
    )


def test_tensor_digest_sees_every_bit_and_ignores_order() -> None:
    tensors = {"a": torch.zeros(3), "b": torch.ones(2, 2)}
    digest = tensor_digest(tensors)
    assert tensor_digest(dict(reversed(tensors.items()))) == digest
    flipped = {"a": torch.tensor([0.0, 0.0, torch.finfo(torch.float32).tiny]), "b": tensors["b"]}
    assert tensor_digest(flipped) != digest
    assert tensor_digest({"a": tensors["a"].double(), "b": tensors["b"]}) != digest
