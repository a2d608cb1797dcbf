"""Fine-tuned versions stored as trajectories: a base version plus the ZO steps taken from it.

A zeroth-order update is fully determined by its seeds, projected gradients and learning
rate (`models.zo`), so a tuned version need not store its weights: it stores its base
(name, version, weights sha256) and one small record per step, and any replica rebuilds the
weights by replaying the updates on the CPU. Replay runs no forward pass and redraws each z
from its seed with a `torch.Generator` in the recorded parameter order; because ZO weights live
on an exact fixed-point grid, the rebuilt weights equal the tuned ones bit for bit. A sha256
of the rebuilt tensors is stored at publish time, so a machine whose torch draws different
random numbers (another torch version or CPU kernel) is refused with a clear `ArtifactError`
instead of serving different weights. Truncating a trajectory at step k gives the weights
after step k: that is how the best checkpoint of a run is kept without copying weights.

A trajectory version's directory:

    config.json         the base's config; "weights": {"kind": "trajectory", ...}; its
                        weights_sha256 is `tensor_digest` of the rebuilt tensors
    trajectory.json     base, optimiser settings, parameter names, torch version, steps
    calibration/<backend>.json + .safetensors     calibrations (`PositionalCalibration`)

This module is the format and its replay; the repository loads a trajectory version through
`materialize_trajectory`. Publishing one, and exporting one as a plain version
(`weights.safetensors`), is `models.trajectory_publish`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from calibration.positional import SERVING_KEY, PositionalCalibration
from models.artifact_format import (
    CONFIG_FILE,
    ArtifactError,
    LoadedModel,
    ModelCard,
    stored_tensors,
)
from models.base import StatefulModel
from models.finetune import attach_targets, merge_targets, parse_targets
from models.zo import MAX_SEED, ZOConfig, ZOOptimizer, as_float32

TRAJECTORY_FILE = "trajectory.json"
TRAJECTORY_FORMAT = "neuroserve-zo-trajectory"
TRAJECTORY_FORMAT_VERSION = 1
WEIGHTS_KIND = "trajectory"
CALIBRATION_DIR = "calibration"
MAX_CHAIN_DEPTH = 32  # bases that are themselves trajectory versions, nested


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order. Independent of
    any file format, so it identifies weights however they were stored or rebuilt."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# ---- the trajectory record -----------------------------------------------------------------


@dataclass(frozen=True)
class BaseReference:
    name: str
    version: str
    weights_sha256: str


@dataclass
class Trajectory:
    """The base and every step of a ZO run; learning rates and projected gradients are
    float32 values (what the update applies), so they print short and replay exactly."""

    base: BaseReference
    zo: ZOConfig
    selection: str
    parameter_names: list[str]
    torch_version: str = torch.__version__
    seeds: list[list[int]] = field(default_factory=list)  # [steps][n_perturbations]
    projected_grads: list[list[float]] = field(default_factory=list)  # [steps][n_perturbations]
    learning_rates: list[float] = field(default_factory=list)  # [steps]

    @property
    def n_steps(self) -> int:
        return len(self.learning_rates)

    def append(self, seeds: list[int], grads: list[float], lr: float) -> None:
        self.seeds.append(list(seeds))
        self.projected_grads.append([as_float32(g) for g in grads])
        self.learning_rates.append(as_float32(lr))

    def truncated(self, n_steps: int) -> Trajectory:
        """The first `n_steps` steps: the weights after step n_steps, i.e. a checkpoint."""
        if not 0 <= n_steps <= self.n_steps:
            raise ValueError(f"cannot truncate {self.n_steps} steps to {n_steps}")
        return dataclasses.replace(
            self,
            seeds=[list(s) for s in self.seeds[:n_steps]],
            projected_grads=[list(g) for g in self.projected_grads[:n_steps]],
            learning_rates=list(self.learning_rates[:n_steps]),
        )

    # ---- JSON --------------------------------------------------------------------------------
    def to_json_bytes(self) -> bytes:
        """JSON with float32 numbers in their shortest form (str(np.float32) round-trips)."""
        header = {
            "format": TRAJECTORY_FORMAT,
            "format_version": TRAJECTORY_FORMAT_VERSION,
            "base": dataclasses.asdict(self.base),
            "zo": self.zo.to_dict(),
            "selection": self.selection,
            "parameter_names": self.parameter_names,
            "torch_version": self.torch_version,
            "n_steps": self.n_steps,
        }
        steps = {
            "seeds": "[" + ",".join(json.dumps(s) for s in self.seeds) + "]",
            "projected_grads": "[" + ",".join(map(_float32_list, self.projected_grads)) + "]",
            "learning_rates": _float32_list(self.learning_rates),
        }
        lines = json.dumps(header, indent=1)[:-2]  # drop the closing "\n}"
        lines += "".join(f',\n "{key}": {text}' for key, text in steps.items())
        return (lines + "\n}\n").encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, source: str) -> Trajectory:
        """Parse and check everything; ArtifactError naming `source` and the problem."""
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ArtifactError(f"{source}: not valid JSON ({error})") from error
        if not isinstance(raw, dict):
            raise ArtifactError(f"{source}: expected a JSON object")
        if raw.get("format") != TRAJECTORY_FORMAT:
            raise ArtifactError(f"{source}: format is {raw.get('format')!r}, not a trajectory")
        if raw.get("format_version") != TRAJECTORY_FORMAT_VERSION:
            raise ArtifactError(
                f"{source}: trajectory format_version {raw.get('format_version')!r} is not "
                f"supported (this build reads {TRAJECTORY_FORMAT_VERSION})"
            )
        try:
            base = raw["base"]
            trajectory = cls(
                base=BaseReference(str(base["name"]), str(base["version"]), base["weights_sha256"]),
                zo=ZOConfig(**raw["zo"]),
                selection=raw["selection"],
                parameter_names=list(raw["parameter_names"]),
                torch_version=str(raw["torch_version"]),
                seeds=raw["seeds"],
                projected_grads=raw["projected_grads"],
                learning_rates=raw["learning_rates"],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"{source}: malformed trajectory ({error!r})") from error
        trajectory._check(source, raw.get("n_steps"))
        # The short decimal forms parse to doubles near the float32 values: snap them back.
        trajectory.projected_grads = [
            [as_float32(g) for g in row] for row in trajectory.projected_grads
        ]
        trajectory.learning_rates = [as_float32(lr) for lr in trajectory.learning_rates]
        return trajectory

    def _check(self, source: str, n_steps: Any) -> None:
        problems = []
        try:
            parse_targets(self.selection)
        except ValueError as error:
            problems.append(str(error))
        if not self.parameter_names or not all(isinstance(n, str) for n in self.parameter_names):
            problems.append("parameter_names must be a non-empty list of names")
        if n_steps != self.n_steps:
            problems.append(f"n_steps says {n_steps} but {self.n_steps} learning rates are stored")
        n = self.zo.n_perturbations
        if len(self.seeds) != self.n_steps or len(self.projected_grads) != self.n_steps:
            problems.append("seeds, projected_grads and learning_rates differ in length")
        else:
            for step, (seeds, grads, lr) in enumerate(
                zip(self.seeds, self.projected_grads, self.learning_rates, strict=True)
            ):
                if not (_is_seed_list(seeds, n) and _is_finite_list(grads, n)):
                    problems.append(f"step {step}: need {n} integer seeds and finite gradients")
                elif not (_is_finite_list([lr], 1) and lr >= 0):
                    problems.append(f"step {step}: learning rate {lr!r} is not finite and >= 0")
                if len(problems) > 3:
                    break
        if problems:
            raise ArtifactError(f"{source}: corrupt trajectory: {'; '.join(problems)}")


def _float32_list(values: list[float]) -> str:
    """A JSON array of float32 values in their shortest decimal form ("0.0005", not
    "0.0005000000237487257"): str(np.float32) round-trips through float32."""
    return "[" + ",".join(str(np.float32(value)) for value in values) + "]"


def _is_seed_list(values: Any, n: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == n
        and all(type(v) is int and 0 <= v <= MAX_SEED for v in values)
    )


def _is_finite_list(values: Any, n: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == n
        and all(type(v) in (int, float) and math.isfinite(v) for v in values)
    )


# ---- replay --------------------------------------------------------------------------------


def replay(model: StatefulModel, trajectory: Trajectory, source: str = "trajectory") -> None:
    """Apply the trajectory's updates to `model` in place (its weights must be the base's):
    attach the recorded targets' adapters, replay, and merge the adapters into the weights."""
    parameters = attach_targets(model, trajectory.selection)
    names = [name for name, _ in parameters]
    if names != trajectory.parameter_names:
        raise ArtifactError(
            f"{source}: recorded parameters {trajectory.parameter_names} do not match the "
            f"model's {trajectory.selection!r} selection {names}"
        )
    optimizer = ZOOptimizer(parameters, trajectory.zo)  # snaps to the grid, as tuning did
    for seeds, grads, lr in zip(
        trajectory.seeds, trajectory.projected_grads, trajectory.learning_rates, strict=True
    ):
        optimizer.update_(seeds, grads, lr)
    merge_targets(model)


def rebuild_weights(
    base_model: StatefulModel, trajectory: Trajectory, source: str = "trajectory"
) -> tuple[StatefulModel, dict[str, Tensor]]:
    """A copy of `base_model` with the trajectory replayed, and its tensors as stored on
    disk (tied aliases dropped). The base model is left untouched."""
    model = copy.deepcopy(base_model)
    replay(model, trajectory, source)
    return model, stored_tensors(model, model.state_dict(), source)


def _trajectory_weights(card: ModelCard) -> dict[str, Any]:
    weights = card.config.get("weights")
    if not isinstance(weights, dict) or weights.get("kind") != WEIGHTS_KIND:
        raise ValueError(f"{card.name}/{card.version} is not a trajectory version")
    return weights


def is_trajectory_version(card: ModelCard) -> bool:
    weights = card.config.get("weights")
    return isinstance(weights, dict) and weights.get("kind") == WEIGHTS_KIND


def read_trajectory(card: ModelCard) -> Trajectory:
    """The verified trajectory of a trajectory version (file sha256 checked first)."""
    weights = _trajectory_weights(card)
    path = card.path / TRAJECTORY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise ArtifactError(f"{path}: missing") from error
    actual = hashlib.sha256(data).hexdigest()
    if actual != weights.get("file_sha256"):
        raise ArtifactError(
            f"{path}: sha256 {actual} does not match file_sha256 {weights.get('file_sha256')} "
            f"in {CONFIG_FILE} (corrupted or replaced)"
        )
    return Trajectory.from_json_bytes(data, str(path))


_materializing = threading.local()  # versions being rebuilt by this thread (cycle guard)


def materialize_trajectory(
    card: ModelCard, load: Callable[[str, str], LoadedModel]
) -> dict[str, Tensor]:
    """Rebuild a trajectory version's weights (as stored: tied aliases dropped) and check
    them against the checksum taken at publish time. `load(name, version)` loads the base
    (`ModelRepository.load`), so a base that is itself a trajectory version is rebuilt first."""
    trajectory = read_trajectory(card)
    source = str(card.path / TRAJECTORY_FILE)
    base_ref = trajectory.base
    in_progress = getattr(_materializing, "keys", set())
    if (base_ref.name, base_ref.version) in in_progress | {(card.name, card.version)}:
        raise ArtifactError(f"{source}: base {base_ref.name}/{base_ref.version} is in a cycle")
    if len(in_progress) >= MAX_CHAIN_DEPTH:
        raise ArtifactError(f"{source}: trajectory bases nest deeper than {MAX_CHAIN_DEPTH}")
    _materializing.keys = in_progress | {(card.name, card.version)}
    try:
        base = load(base_ref.name, base_ref.version)
    finally:
        _materializing.keys = in_progress
    if base.card.config["weights_sha256"] != base_ref.weights_sha256:
        raise ArtifactError(
            f"{source}: base {base_ref.name}/{base_ref.version} has weights_sha256 "
            f"{base.card.config['weights_sha256']}, but the trajectory was recorded from "
            f"{base_ref.weights_sha256}"
        )
    for key in ("architecture", "model_config"):
        if base.card.config[key] != card.config[key]:
            raise ArtifactError(f"{source}: {key} differs from the base's")
    _, tensors = rebuild_weights(base.model, trajectory, source)
    digest = tensor_digest(tensors)
    if digest != card.config["weights_sha256"]:
        raise ArtifactError(
            f"{source}: replayed weights have sha256 {digest}, but weights_sha256 in "
            f"{CONFIG_FILE} is {card.config['weights_sha256']}; recorded with torch "
            f"{trajectory.torch_version}, replayed with torch {torch.__version__} "
            "(the random directions differ between these machines or versions)"
        )
    return tensors


# ---- calibration files beside a version ------------------------------------------------------


def calibration_files(
    calibration: PositionalCalibration, serving: Mapping[str, Any] | None = None
) -> dict[str, bytes]:
    """`calibration/<backend>.json` and `.safetensors`, as the calibration store writes them
    (`serving`: the backend options the calibration data ran with, its source, ...)."""
    stem = f"{CALIBRATION_DIR}/{calibration.backend}"
    json_bytes, tensor_bytes = calibration.to_files(serving)
    return {f"{stem}.json": json_bytes, f"{stem}.safetensors": tensor_bytes}


def load_calibration(card: ModelCard, backend: str) -> PositionalCalibration:
    """The calibration stored beside a version for `backend`."""
    json_path, tensor_path = _calibration_paths(card, backend)
    return PositionalCalibration.from_serialized(json_path.read_text(), tensor_path.read_bytes())


def load_serving(card: ModelCard, backend: str) -> dict[str, Any]:
    """The `serving` object of a stored calibration, without its tensor hash."""
    json_path, _ = _calibration_paths(card, backend)
    serving = json.loads(json_path.read_text()).get(SERVING_KEY) or {}
    return {key: value for key, value in serving.items() if key != "tensors_sha256"}


def _calibration_paths(card: ModelCard, backend: str) -> tuple[Path, Path]:
    stem = card.path / CALIBRATION_DIR / backend
    return stem.with_suffix(".json"), stem.with_suffix(".safetensors")


def stored_calibrations(card: ModelCard) -> list[PositionalCalibration]:
    directory = card.path / CALIBRATION_DIR
    if not directory.is_dir():
        return []
    return [load_calibration(card, p.stem) for p in sorted(directory.glob("*.json"))]
