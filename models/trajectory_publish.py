"""Publishing trajectory versions into a model repository, and exporting them as plain ones.

`publish_trajectory_version` stores a fine-tuned version as its base plus the ZO steps taken
from it (`models.trajectory`), with the calibrations fitted for it; `export_safetensors_version`
turns a trajectory version into a plain `weights.safetensors` version. Both publish through
`ModelRepository.publish_files`, so readers see all of a version or none of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from safetensors.torch import save as save_tensors

from calibration.positional import PositionalCalibration
from models.artifact_format import CONFIG_FILE, WEIGHTS_FILE, ModelCard
from models.repository import ModelRepository
from models.trajectory import (
    TRAJECTORY_FILE,
    WEIGHTS_KIND,
    Trajectory,
    calibration_files,
    load_serving,
    materialize_trajectory,
    stored_calibrations,
    tensor_digest,
)


def _config_bytes(config: dict[str, Any]) -> bytes:
    return (json.dumps(config, indent=2, allow_nan=False) + "\n").encode()


def _rekeyed(calibration: PositionalCalibration, name: str, version: str) -> PositionalCalibration:
    artifacts = tuple(
        dataclasses.replace(artifact, model=name, version=version)
        for artifact in calibration.artifacts
    )
    return PositionalCalibration(calibration.buckets, artifacts)


def publish_trajectory_version(
    repository: ModelRepository,
    name: str,
    base: ModelCard,
    trajectory: Trajectory,
    weights_sha256: str,
    config_updates: dict[str, Any],
    calibrations: Sequence[PositionalCalibration] = (),
    serving: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    promote: bool = True,
) -> ModelCard:
    """Publish `trajectory` (from `base`) as the next version of `name` (made `latest` only
    when `promote`: `ModelRepository.publish_files`).

    `weights_sha256` is `tensor_digest` of the rebuilt weights; `config_updates` (provenance,
    metrics, dataset, ...) overlay the base's config. Calibrations are stored under
    `calibration/<backend>` keyed to the new name and version, each with its `serving[backend]`
    object (the backend options its data ran with, its source).
    """
    trajectory_bytes = trajectory.to_json_bytes()
    ignored = ("name", "version", "weights_sha256", "weights", "training", "metrics")
    config = {key: value for key, value in base.config.items() if key not in ignored}
    config.update(config_updates)
    config["weights"] = {
        "kind": WEIGHTS_KIND,
        "file": TRAJECTORY_FILE,
        "file_sha256": hashlib.sha256(trajectory_bytes).hexdigest(),
        "steps": trajectory.n_steps,
        "base": dataclasses.asdict(trajectory.base),
        "weights_sha256_of": "tensor_digest of the rebuilt tensors",
    }
    config["weights_sha256"] = weights_sha256

    def files_for(version: str) -> dict[str, bytes]:
        files = {TRAJECTORY_FILE: trajectory_bytes}
        for artifact in calibrations:
            files |= calibration_files(
                _rekeyed(artifact, name, version), (serving or {}).get(artifact.backend)
            )
        files[CONFIG_FILE] = _config_bytes({"name": name, "version": version, **config})
        return files

    return repository.publish_files(name, files_for, promote=promote)


def export_safetensors_version(
    repository: ModelRepository, name: str, version: str, target_name: str | None = None
) -> ModelCard:
    """Publish a trajectory version's rebuilt weights as a plain safetensors version of
    `target_name` (default: the same model), with its calibration artifacts."""
    card = repository.card(name, version)
    tensors = materialize_trajectory(card, repository.load)
    weights_bytes = save_tensors(tensors)
    target = target_name or name
    ignored = ("name", "version", "weights", "weights_sha256")
    config = {key: value for key, value in card.config.items() if key not in ignored}
    exported_from = {
        "name": name,
        "version": card.version,
        "weights_sha256": tensor_digest(tensors),
    }
    config["provenance"] = dict(
        card.config["provenance"],
        exported_from=exported_from,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    config["weights_sha256"] = hashlib.sha256(weights_bytes).hexdigest()
    calibrations = stored_calibrations(card)
    serving = {c.backend: load_serving(card, c.backend) for c in calibrations}

    def files_for(new_version: str) -> dict[str, bytes]:
        files = {WEIGHTS_FILE: weights_bytes}
        for artifact in calibrations:
            files |= calibration_files(
                _rekeyed(artifact, target, new_version), serving[artifact.backend]
            )
        files[CONFIG_FILE] = _config_bytes({"name": target, "version": new_version, **config})
        return files

    return repository.publish_files(target, files_for)
