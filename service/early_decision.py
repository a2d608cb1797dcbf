"""Early decisions for sessions: when a streaming classifier may stop reading its input.

`neuroserve calibrate` runs the calibration split through the model step by step and keeps,
for every checkpoint step, the calibrated probabilities of the examples held out from the
map fit. They are stored beside the backend's calibration artifact:

    <repository>/<name>/<version>/calibration/early/<backend>.json          steps, report, link
    <repository>/<name>/<version>/calibration/early/<backend>.safetensors   probs [N, K, C], labels

(a folder of their own, so they are never taken for a backend's calibration artifact).

A session that asks for early decisions gets an `EarlyDecisionRule` fitted on those
probabilities at the session's own alpha, score and `max_set_size` (the rule is cheap to fit
and cached), and every step that lands on a checkpoint is answered with the rule's decision:
stop or read on, and the set at level alpha / K. Stopping at the first `stop` (or any other
stopping rule) keeps coverage >= 1 - alpha at the stopping time (`calibration.early_decision`).

The stored probabilities were made by one calibration map; the JSON names the calibration it
belongs to (its `created` time and data hash), and a recalibration without a new early-decision
fit makes the pair inconsistent: such a file is refused instead of mixed with the new map.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from calibration import CalibrationArtifact, EarlyDecisionRule
from models.repository import ModelCard
from service.calibration_store import (
    CalibrationFileError,
    CalibrationStore,
    StoredCalibration,
    write_atomically,
)
from service.errors import BadInputError, ConflictError
from service.predictions import calibration_inputs

EARLY_DIR = "early"
_RULE_CACHE_SIZE = 256


@dataclass(frozen=True)
class EarlyDecisionData:
    """Calibration streams of one (model, version, backend): what every rule is fitted on."""

    probs: Tensor  # [N, K, C] calibrated probabilities at each checkpoint
    labels: Tensor  # [N]
    checkpoint_steps: tuple[int, ...]  # 1-based time step of each checkpoint
    calibration_created: str  # `created` of the calibration artifact whose map made `probs`
    calibration_data_hash: str
    report: dict[str, Any]  # what `neuroserve calibrate` measured on the test split

    def belongs_to(self, artifact: CalibrationArtifact) -> bool:
        return (self.calibration_created, self.calibration_data_hash) == (
            artifact.created,
            artifact.data_hash,
        )

    def rule(
        self, artifact: CalibrationArtifact, alpha: float, score: str, max_set_size: int
    ) -> EarlyDecisionRule:
        return EarlyDecisionRule.calibrate(
            self.probs,
            self.labels,
            alpha,
            max_set_size=max_set_size,
            score=artifact.make_score(score),
            checkpoint_steps=self.checkpoint_steps,
        )


def checkpoint_probabilities(artifact: CalibrationArtifact, step_logits: Tensor) -> Tensor:
    """Calibrated probabilities [N, K, C] from a backend's per-step logits [N, K, C] (or
    [S, N, K, C] from a sampling backend), read as the dataplane reads a last step."""
    streams = []
    for k in range(step_logits.shape[-2]):
        logits, _ = calibration_inputs(step_logits[..., k, :])  # [N, C]
        streams.append(artifact.calibrate(logits))
    return torch.stack(streams, dim=1)


def check_max_set_size(value: object, num_classes: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_classes:
        raise BadInputError(
            f"early_decision.max_set_size must be an integer in 1..{num_classes}, got {value!r}"
        )
    return value


class EarlyDecisionStore:
    """Reads and writes early-decision files beside the calibration artifacts; thread-safe."""

    def __init__(self, calibrations: CalibrationStore) -> None:
        self.calibrations = calibrations
        self._cache: dict[Path, tuple[tuple[int, ...], EarlyDecisionData]] = {}
        self._rules: OrderedDict[tuple, EarlyDecisionRule] = OrderedDict()
        self._lock = threading.Lock()

    def paths(self, name: str, version: str, backend: str) -> tuple[Path, Path]:
        json_path, tensor_path = self.calibrations.paths(name, version, backend)
        folder = json_path.parent / EARLY_DIR
        return folder / json_path.name, folder / tensor_path.name

    def save(
        self,
        artifact: CalibrationArtifact,
        probs: Tensor,
        labels: Tensor,
        checkpoint_steps: tuple[int, ...],
        report: dict[str, Any],
    ) -> tuple[Path, Path]:
        json_path, tensor_path = self.paths(artifact.model, artifact.version, artifact.backend)
        tensor_bytes = save_tensors(
            {"probs": probs.to(torch.float64).contiguous(), "labels": labels.to(torch.long)}
        )
        meta = {
            "model": artifact.model,
            "version": artifact.version,
            "backend": artifact.backend,
            "checkpoint_steps": list(checkpoint_steps),
            "calibration_created": artifact.created,
            "calibration_data_hash": artifact.data_hash,
            "test_report": report,
            "tensors_sha256": hashlib.sha256(tensor_bytes).hexdigest(),
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(tensor_path, tensor_bytes)
        text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n"
        write_atomically(json_path, text.encode("utf-8"))
        return json_path, tensor_path

    def get(self, name: str, version: str, backend: str) -> EarlyDecisionData | None:
        """The stored streams, or None when none were fitted; CalibrationFileError when the
        files exist but are unusable."""
        json_path, _ = self.paths(name, version, backend)
        try:
            stat = json_path.stat()
        except FileNotFoundError:
            return None
        signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._cache.get(json_path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        data = self._read(name, version, backend)
        with self._lock:
            self._cache[json_path] = (signature, data)
        return data

    def _read(self, name: str, version: str, backend: str) -> EarlyDecisionData:
        json_path, tensor_path = self.paths(name, version, backend)
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
            tensor_bytes = tensor_path.read_bytes()
            if hashlib.sha256(tensor_bytes).hexdigest() != meta["tensors_sha256"]:
                raise ValueError(f"{tensor_path.name} does not match its JSON (rewritten?)")
            tensors = load_tensors(tensor_bytes)
            return EarlyDecisionData(
                probs=tensors["probs"],
                labels=tensors["labels"],
                checkpoint_steps=tuple(int(step) for step in meta["checkpoint_steps"]),
                calibration_created=str(meta["calibration_created"]),
                calibration_data_hash=str(meta["calibration_data_hash"]),
                report=dict(meta.get("test_report") or {}),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CalibrationFileError(
                f"{json_path}: unusable early-decision file ({error})"
            ) from None

    def rule(
        self,
        card: ModelCard,
        backend: str,
        stored: StoredCalibration | None,
        *,
        alpha: float,
        score: str,
        max_set_size: int,
    ) -> EarlyDecisionRule:
        """The session's rule; ConflictError when this backend has none to offer."""
        if score.endswith("_randomized"):
            raise BadInputError(
                f"early decisions need a deterministic score; {score!r} draws random numbers "
                "(use lac, aps, raps or topk)"
            )
        where = f"model {card.name!r} version {card.version} on backend {backend!r}"
        fit = f"run `neuroserve calibrate {card.name} --version {card.version} --backend {backend}`"
        if stored is None:
            raise ConflictError(f"early decisions need a calibration: {where} has none; {fit}")
        data = self.get(card.name, card.version, backend)
        if data is None:
            raise ConflictError(f"{where} has no early-decision rule; {fit}")
        if not data.belongs_to(stored.artifact):
            raise ConflictError(
                f"the early-decision rule of {where} was fitted with an older calibration; {fit}"
            )
        key = (id(data), float(alpha), score, int(max_set_size))
        with self._lock:
            rule = self._rules.get(key)
            if rule is not None:
                self._rules.move_to_end(key)
                return rule
        try:
            rule = data.rule(stored.artifact, alpha, score, max_set_size)
        except ValueError as error:  # e.g. max_set_size above the number of classes
            raise BadInputError(f"early_decision: {error}") from None
        with self._lock:
            self._rules[key] = rule
            while len(self._rules) > _RULE_CACHE_SIZE:
                self._rules.popitem(last=False)
        return rule


def decide(
    rule: EarlyDecisionRule,
    artifact: CalibrationArtifact,
    logits: Tensor,
    step: int,
    labels: list[str],
) -> dict[str, Any] | None:
    """The decision after the session's `step`-th time step, from its last logits [C] (or
    [S, C]); None when `step` is not one of the rule's checkpoints."""
    if step not in rule.checkpoint_steps:
        return None
    checkpoint = rule.checkpoint_steps.index(step)
    probs = checkpoint_probabilities(artifact, logits.unsqueeze(-2).unsqueeze(-2))[:, 0]  # [1, C]
    stop, sets = rule.decide(probs, checkpoint)
    members = sets[0].nonzero().flatten().tolist()
    return {
        "stop": bool(stop[0]),
        "checkpoint": step,
        "prediction_set": [labels[i] for i in members],
        "guaranteed_coverage": 1.0 - rule.alpha,
    }
