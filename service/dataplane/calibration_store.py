"""Calibrations of served models: where they live, how they are written and cached.

One calibration per (model, version, backend), beside the weights, holding one calibration
per position of the sequence (`calibration.PositionalCalibration`):

    <repository>/<name>/<version>/calibration/<backend>.json          positions, maps, metrics
    <repository>/<name>/<version>/calibration/<backend>.safetensors   conformity scores, labels

The JSON is `PositionalCalibration.to_json_dict()` plus one `"serving"` object that the
calibration package ignores: the backend options the calibration data ran with, where that
data came from, what `neuroserve calibrate` measured on test data (`report`), and the sha256
of the safetensors file. Writing is atomic per file (`models.files.write_atomically`: a
temp file in the same folder, fsync, rename), tensors first and JSON last; the JSON names the
tensor file's hash, so a reader that catches a newer tensor file beside an older JSON notices
and reads again instead of mixing two calibrations.

`CalibrationStore.get` caches parsed artifacts and revalidates them against the JSON file's
inode, mtime and size on every call (one `stat`), so `neuroserve calibrate` on a running server's
repository takes effect on the next request without a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibration import CalibrationArtifact, PositionalCalibration
from calibration.positional import SERVING_KEY
from hardware_backends.registry import freeze_options
from models.files import write_atomically
from models.repository import ArtifactError, ModelRepository

CALIBRATION_DIR = "calibration"
_BACKEND_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_READ_ATTEMPTS = 3  # a concurrent writer can swap a file between our two reads


class CalibrationFileError(ArtifactError):
    """A calibration file that exists but cannot be used; the message names it (served as
    503, like any broken artifact)."""


@dataclass(frozen=True)
class StoredCalibration:
    """A calibration as the server serves it, with how it was made."""

    positional: PositionalCalibration
    backend_options: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # data name, sha256, n, command
    report: dict[str, Any] = field(default_factory=dict)  # measured on test data at fit time

    @property
    def calibration_id(self) -> str:
        return self.positional.calibration_id

    def at(self, position: int) -> CalibrationArtifact | None:
        """The calibration of one position (1-based), or None past the horizon."""
        return self.positional.at(position)

    def fitted_with(self, backend_options: Mapping[str, Any] | None) -> bool:
        """Whether these are the backend options the calibration data ran with."""
        return freeze_options(dict(backend_options or {})) == freeze_options(self.backend_options)

    def summary(self) -> dict[str, Any]:
        """JSON-safe description for the API: horizon, per-position fits, provenance."""
        positional = self.positional
        buckets = positional.buckets
        return {
            "created": positional.created,
            "calibration_id": positional.calibration_id,
            "horizon": positional.horizon,
            "positions": [
                {
                    "first": buckets.bounds(k)[0],
                    "last": buckets.bounds(k)[1],
                    "n_conformal": artifact.n,
                    "n_tune": artifact.n_tune,
                    "map": artifact.calibration_map.to_dict(),
                    "metrics": dict(artifact.metrics),
                    "raps": {
                        "lam": artifact.raps_lam,
                        "k_reg": artifact.raps_k_reg,
                        "alpha": artifact.raps_alpha,
                    },
                }
                for k, artifact in enumerate(positional.artifacts)
            ],
            "seed": positional.artifacts[0].seed,
            "backend_options": dict(self.backend_options),
            "source": dict(self.source),
            "report": dict(self.report),
        }


def _recalibrate(name: str, version: str, backend: str) -> str:
    return f"run `neuroserve calibrate {name} --version {version} --backend {backend}`"


def check_backend_name(backend: str) -> str:
    """Backend names become file names: letters, digits and `_.-` only."""
    if not isinstance(backend, str) or not _BACKEND_NAME.fullmatch(backend):
        raise ValueError(
            f"backend name {backend!r} cannot name a calibration file: use 1-64 letters, "
            "digits and _.- starting with a letter or digit"
        )
    return backend


class CalibrationStore:
    """Reads and writes the calibration artifacts of one model repository; thread-safe."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository
        self._cache: dict[tuple[str, str, str], tuple[tuple[int, ...], StoredCalibration]] = {}
        self._paths: dict[tuple[str, str, str], tuple[Path, Path]] = {}
        self._lock = threading.Lock()

    def directory(self, name: str, version: str) -> Path:
        return self.repository.version_path(name, version) / CALIBRATION_DIR

    def paths(self, name: str, version: str, backend: str) -> tuple[Path, Path]:
        """(JSON path, safetensors path) of one artifact, whether or not it exists."""
        key = (name, str(version), backend)
        found = self._paths.get(key)
        if found is None:  # built once: every answered batch looks its artifact up
            folder = self.directory(name, version)
            stem = check_backend_name(backend)
            found = self._paths[key] = (folder / f"{stem}.json", folder / f"{stem}.safetensors")
        return found

    # ---- reading ----------------------------------------------------------------------------

    def get(self, name: str, version: str, backend: str) -> StoredCalibration | None:
        """The artifact for (name, version, backend), or None when it was never calibrated.

        Raises `CalibrationFileError` when the files exist but are unusable.
        """
        json_path, tensor_path = self.paths(name, version, backend)
        key = (name, str(version), backend)
        json_file = str(json_path)  # os.stat on a str: every answered batch passes here
        signatures = set()
        for _ in range(_READ_ATTEMPTS):
            try:
                stat = os.stat(json_file)
            except FileNotFoundError:
                with self._lock:
                    self._cache.pop(key, None)
                return None
            # Every save renames a new file into place, so the inode changes even when a
            # rewrite lands within the clock tick of the last one with the same size.
            signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            signatures.add(signature)
            with self._lock:
                cached = self._cache.get(key)
            if cached is not None and cached[0] == signature:
                return cached[1]
            stored = self._read(name, str(version), backend)
            if stored is not None:
                with self._lock:
                    self._cache[key] = (signature, stored)
                return stored
        if len(signatures) == 1:  # the JSON stood still: its tensor file is not its own
            raise CalibrationFileError(
                f"{tensor_path} does not match the sha256 that {json_path.name} records "
                f"(damaged, or from another calibration); {_recalibrate(name, version, backend)}"
            )
        raise CalibrationFileError(
            f"{json_path}: its tensor file kept changing while being read; is a calibration "
            "being written right now? Try again."
        )

    def _read(self, name: str, version: str, backend: str) -> StoredCalibration | None:
        """Parse and verify one artifact; None when the two files do not belong together yet."""
        json_path, tensor_path = self.paths(name, version, backend)
        try:
            json_text = json_path.read_text(encoding="utf-8")
            tensor_bytes = tensor_path.read_bytes()
        except FileNotFoundError as error:
            raise CalibrationFileError(f"{error.filename}: missing") from None
        try:
            meta = json.loads(json_text)
        except json.JSONDecodeError as error:
            raise CalibrationFileError(f"{json_path}: not valid JSON ({error})") from None
        serving = meta.get(SERVING_KEY, {}) if isinstance(meta, dict) else {}
        expected_hash = serving.get("tensors_sha256")
        if expected_hash is not None and hashlib.sha256(tensor_bytes).hexdigest() != expected_hash:
            return None  # the tensor file was replaced after this JSON: read both again
        try:
            positional = PositionalCalibration.from_serialized(json_text, tensor_bytes)
        except (ValueError, KeyError, TypeError) as error:
            raise CalibrationFileError(f"{json_path}: unusable calibration ({error})") from None
        found = (positional.model, positional.version, positional.backend)
        if found != (name, version, backend):
            raise CalibrationFileError(
                f"{json_path}: holds the calibration of {found[0]} version {found[1]} on "
                f"{found[2]}, not {name} version {version} on {backend}; "
                f"{_recalibrate(name, version, backend)}"
            )
        return StoredCalibration(
            positional=positional,
            backend_options=dict(serving.get("backend_options") or {}),
            source=dict(serving.get("source") or {}),
            report=dict(serving.get("report") or {}),
        )

    def calibrated_backends(self, name: str, version: str) -> list[str]:
        """Backends with a calibration file for this version, sorted."""
        folder = self.directory(name, version)
        if not folder.is_dir():
            return []
        return sorted(
            path.stem
            for path in folder.glob("*.json")
            if _BACKEND_NAME.fullmatch(path.stem) and path.with_suffix(".safetensors").is_file()
        )

    # ---- writing ----------------------------------------------------------------------------

    def save(
        self,
        positional: PositionalCalibration,
        *,
        backend_options: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
        report: dict[str, Any] | None = None,
    ) -> tuple[Path, Path]:
        """Write the calibration beside its model version's weights, atomically; the paths."""
        name, version, backend = positional.model, positional.version, positional.backend
        if not self.repository.version_path(name, version).is_dir():
            raise ValueError(f"model {name!r} has no published version {version!r} to calibrate")
        json_path, tensor_path = self.paths(name, version, backend)
        json_path.parent.mkdir(exist_ok=True)
        json_bytes, tensor_bytes = positional.to_files(
            {
                "backend_options": dict(backend_options or {}),
                "source": dict(source or {}),
                "report": dict(report or {}),
            }
        )
        write_atomically(tensor_path, tensor_bytes)
        write_atomically(json_path, json_bytes)
        return json_path, tensor_path
