"""The model repository: versioned, verified, atomically published model artifacts on disk.

Layout: `<root>/<name>/<version>/config.json` + `weights.safetensors` (+ calibration files
that other components write beside them). Versions are "1", "2", ... and never change once
published. A zeroth-order fine-tuned version may hold `trajectory.json` instead of weights
(config "weights": {"kind": "trajectory"}); `load` rebuilds it through `models.trajectory`.
The format of one version (file names, `ModelCard`, `ArtifactError`, the weight checks) is
`models.artifact_format`; these names are re-exported here.
`config.json` holds:

    name, version, architecture, model_config, task ("classification" | "language-model"),
    labels (classification) or vocabulary (language-model), input, dataset, provenance
    {data_sha256, seed, command, created, torch_version, neuroserve_version}, metrics,
    weights_sha256, state_schema_hash

Loading verifies everything it can (required keys, weights hash, exact tensor names and
shapes, state schema) and raises `ArtifactError` naming the file and the problem. Weights are
read and written only with safetensors, never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import Tensor

from models.architectures import build_model
from models.artifact_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    LoadedModel,
    ModelCard,
    check_model_name,
    check_state_dict,
    file_sha256,
    is_safe_name,
    model_state_schema_hash,
    stored_tensors,
    tied_names,
)
from models.base import StatefulModel
from models.files import empty_directory, fsync_path, fsync_tree, staging_directory, write_synced
from models.latest_pointer import (
    LatestPointer,
    model_lock,
    pointed_latest,
    read_pointer,
    write_pointer,
)
from models.trajectory import TRAJECTORY_FILE, is_trajectory_version, materialize_trajectory

TASKS = ("classification", "language-model")
# Keys the publisher must supply; publish() adds name, version and the two hashes.
PUBLISHER_KEYS = ("architecture", "model_config", "task", "input", "provenance")
REQUIRED_KEYS = ("name", "version", *PUBLISHER_KEYS, "weights_sha256", "state_schema_hash")
PROVENANCE_KEYS = ("data_sha256", "seed", "command", "created", "torch_version")
_TEMP_PREFIX = ".publishing-"
_DELETING_PREFIX = ".deleting-"


class ModelNotFoundError(LookupError):
    """An unknown model name or version; the message says what was asked and what exists."""


class VersionConflictError(ValueError):
    """A version change that would leave a model without a sound `latest` (deleting the
    latest or only version, rolling back past the first): the message says what to do."""


def default_repository_root() -> Path:
    """The committed built-in artifacts: `models/artifacts` inside the package."""
    return Path(__file__).resolve().parent / "artifacts"


class ModelRepository:
    """Versioned model artifacts under one root directory; loaded models are cached."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._cache: dict[tuple[str, str], LoadedModel] = {}
        self._cache_lock = threading.Lock()
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        # Listings and cards are read on every request: kept while the directory (or the
        # config file) keeps its modification time, so a publish shows up at once.
        self._versions: dict[str, tuple[int, list[str]]] = {}
        self._cards: dict[tuple[str, str], tuple[tuple[int, int], ModelCard]] = {}
        self._model_dirs: dict[str, str] = {}  # checked name -> its directory, as str for os.stat

    # ---- listing ----------------------------------------------------------------------------
    def list_models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.is_dir() and is_safe_name(entry.name) and self.versions(entry.name)
        )

    def versions(self, name: str) -> list[str]:
        """Published versions of `name`, sorted numerically; [] for an unknown name."""
        return list(self._listing(name))

    def _model_dir(self, name: str) -> str:
        model_dir = self._model_dirs.get(name)
        if model_dir is None:
            if len(self._model_dirs) >= 1024:  # names come from requests: keep it bounded
                self._model_dirs.clear()
            model_dir = self._model_dirs[name] = str(self.root / check_model_name(name))
        return model_dir

    def _listing(self, name: str) -> list[str]:
        """`versions` without the copy: the cached list itself, not to be changed. Every
        request passes here, hence `os.stat` on a str (pathlib costs more than the stat)."""
        try:
            status = os.stat(self._model_dir(name))
        except OSError:
            return []
        if not stat.S_ISDIR(status.st_mode):
            return []
        cached = self._versions.get(name)
        if cached is not None and cached[0] == status.st_mtime_ns:
            return cached[1]
        model_dir = Path(self._model_dir(name))
        numbers = [
            int(entry.name)
            for entry in model_dir.iterdir()
            if entry.is_dir() and entry.name.isdigit() and entry.name == str(int(entry.name))
        ]
        versions = [str(number) for number in sorted(numbers)]
        self._versions[name] = (status.st_mtime_ns, versions)
        return list(versions)

    def latest(self, name: str) -> str:
        """The version a request without one gets: the pointer's (`models.latest_pointer`),
        else the highest."""
        versions = self._listing(name)
        if not versions:
            raise ModelNotFoundError(
                f"no model named {name!r} in {self.root}; available: {self.list_models()}"
            )
        pointed = pointed_latest(self._model_dir(name))
        return pointed if pointed in versions else versions[-1]

    def pointer(self, name: str) -> LatestPointer:
        """Latest, the promotion history and deleted numbers (implicit ones for a model
        without a pointer file: every version promoted in turn)."""
        versions = self.versions(name)
        pointer = read_pointer(self.root / check_model_name(name), fresh=True)
        if pointer is None:
            return LatestPointer(versions[-1] if versions else None, list(versions), [])
        if pointer.latest not in versions:
            pointer.latest = versions[-1] if versions else None
        return pointer

    def version_path(self, name: str, version: str) -> Path:
        return self.root / check_model_name(name) / str(version)

    # ---- reading ----------------------------------------------------------------------------
    def _resolve(self, name: str, version: str | None) -> str:
        if version is None:
            return self.latest(name)
        versions = self._listing(name)
        if str(version) not in versions:
            if not versions:
                raise ModelNotFoundError(
                    f"no model named {name!r} in {self.root}; available: {self.list_models()}"
                )
            raise ModelNotFoundError(
                f"model {name!r} has no version {version!r}; available versions: {versions}"
            )
        return str(version)

    def card(self, name: str, version: str | None = None) -> ModelCard:
        """The parsed, key-checked config of one version (the latest when version is None)."""
        version = self._resolve(name, version)
        cached = self._cards.get((name, version))
        config_file = os.path.join(self._model_dir(name), version, CONFIG_FILE)
        try:
            status = os.stat(config_file)
        except FileNotFoundError as error:
            raise ArtifactError(f"{config_file}: missing") from error
        stamp = (status.st_mtime_ns, status.st_size)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        path = self.version_path(name, version)
        config_path = path / CONFIG_FILE
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise ArtifactError(f"{config_path}: missing") from error
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ArtifactError(f"{config_path}: not valid JSON ({error})") from error
        _check_config(config, config_path, name, version)
        card = ModelCard(name=name, version=version, path=path, config=config)
        self._cards[(name, version)] = (stamp, card)
        return card

    def load(self, name: str, version: str | None = None) -> LoadedModel:
        """Build, verify and load a version (cached; concurrent loads of one key build once)."""
        version = self._resolve(name, version)
        key = (name, version)
        with self._cache_lock:
            if key in self._cache:
                return self._cache[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._cache_lock:
                if key in self._cache:
                    return self._cache[key]
            loaded = self._load_uncached(name, version)
            with self._cache_lock:
                self._cache[key] = loaded
            return loaded

    def load_resolved(self, card: ModelCard) -> LoadedModel:
        """`load` of a card just resolved by `card` (as a request does first): the loaded
        version of that very card without a second look at the files."""
        cached = self._cache.get((card.name, card.version))
        if cached is not None and cached.card is card:
            return cached
        return self.load(card.name, card.version)

    def _load_uncached(self, name: str, version: str) -> LoadedModel:
        card = self.card(name, version)
        config_path = card.path / CONFIG_FILE
        if is_trajectory_version(card):
            # A fine-tuned version stored as its base plus zeroth-order steps: rebuilt by replay.
            tensors, source = materialize_trajectory(card, self.load), card.path / TRAJECTORY_FILE
        else:
            tensors, source = _read_weights(card), card.path / WEIGHTS_FILE
        model = _build(card.config, config_path)
        check_state_dict(model, tensors, str(source))
        for alias, canonical in tied_names(model).items():
            tensors[alias] = tensors[canonical]
        model.load_state_dict(tensors, strict=True)
        schema_hash = model_state_schema_hash(model)
        if schema_hash != card.config["state_schema_hash"]:
            raise ArtifactError(
                f"{config_path}: state_schema_hash {card.config['state_schema_hash']} does not "
                f"match the built model's {schema_hash} (edited model_config?)"
            )
        model.eval()
        return LoadedModel(card=card, model=model)

    # ---- writing ----------------------------------------------------------------------------
    def publish(
        self,
        name: str,
        config: dict[str, Any],
        state_dict: dict[str, Tensor],
        extra_files: dict[str, bytes] | None = None,
        *,
        promote: bool = True,
    ) -> ModelCard:
        """Publish the next version of `name` atomically and return its card (`latest`
        unless `promote` is False: see `publish_files`).

        Written as `publish_files` writes every version. `config` must hold PUBLISHER_KEYS;
        name, version, weights_sha256 and state_schema_hash are filled in here.
        """
        check_model_name(name)
        missing = [key for key in PUBLISHER_KEYS if key not in config]
        if missing:
            raise ValueError(f"cannot publish {name!r}: config lacks {missing}")
        _check_content(config, f"config for {name!r}")
        extra_files = dict(extra_files or {})
        for file_name in extra_files:
            if file_name in (CONFIG_FILE, WEIGHTS_FILE) or not is_safe_name(file_name):
                raise ValueError(f"cannot publish {name!r}: invalid extra file name {file_name!r}")
        model = _build(config, Path(f"<config for {name}>"))
        tensors = stored_tensors(model, state_dict, f"state_dict for {name!r}")
        check_state_dict(model, tensors, f"state_dict for {name!r}")
        weights = save_tensors(tensors)
        # name and version lead config.json; the hashes close it.
        full_config = {"name": name, "version": None}
        full_config.update((k, v) for k, v in config.items() if k not in ("name", "version"))
        full_config["state_schema_hash"] = model_state_schema_hash(model)
        full_config["weights_sha256"] = hashlib.sha256(weights).hexdigest()

        def files_for(version: str) -> dict[str, bytes]:
            full_config["version"] = version
            return {WEIGHTS_FILE: weights, **extra_files, CONFIG_FILE: _config_bytes(full_config)}

        return self.publish_files(name, files_for, promote=promote)

    def publish_files(
        self, name: str, files_for: Callable[[str], dict[str, bytes]], *, promote: bool = True
    ) -> ModelCard:
        """Publish the next version of `name` from `files_for(version)` (relative path ->
        bytes, config.json included) and return its card.

        `promote` makes it `latest`; without it the version is a candidate that serves only
        when asked for by number (the first version of a new model is latest regardless:
        there is nothing else to serve). All of it happens under the model's lock, so
        publishes, promotions, rollbacks and deletes of one model never interleave.

        The files are written and fsynced in a hidden staging dir inside root, then the dir
        is renamed to `<root>/<name>/<version>`, so readers see all of a version or none. If
        another publisher takes that version first (rename onto a non-empty directory fails),
        the files are rebuilt for the next one. On any error no version appears.
        """
        check_model_name(name)
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        prefix = f"{_TEMP_PREFIX}{name}-"
        with self._locked(name, model_dir), staging_directory(self.root, prefix) as staging:
            pointer = self.pointer(name)
            # Without a pointer file the highest version is latest: a promoted publish needs
            # none. A candidate pins today's latest first, so no reader takes it for latest.
            has_pointer = read_pointer(model_dir, fresh=True) is not None
            if not promote and pointer.latest is not None:
                write_pointer(model_dir, pointer)
                has_pointer = True
            for _ in range(100):
                versions = self.versions(name)
                used = [int(v) for v in versions + pointer.deleted]
                version = str(max(used) + 1 if used else 1)
                for relative, data in files_for(version).items():
                    write_synced(staging / relative, data)
                fsync_tree(staging)
                try:
                    os.rename(staging, self.version_path(name, version))
                    break
                except OSError:
                    if not self.version_path(name, version).exists():
                        raise
                    empty_directory(staging)
            else:
                raise RuntimeError(f"could not find a free version for {name!r} after 100 attempts")
            fsync_path(model_dir)
            if has_pointer and (promote or pointer.latest is None):
                pointer.latest = version
                pointer.history.append(version)
                write_pointer(model_dir, pointer)
        return self.card(name, version)

    # ---- moving latest, deleting ------------------------------------------------------------
    @contextmanager
    def _locked(self, name: str, model_dir: Path) -> Iterator[None]:
        """The model's lock, with its listing read afresh (another process may have changed
        it within the file system's timestamp tick)."""
        with model_lock(model_dir):
            self._versions.pop(name, None)
            yield

    def promote(self, name: str, version: str) -> LatestPointer:
        """Make `version` latest (a no-op when it is); ModelNotFoundError for an unknown one."""
        model_dir = self.root / check_model_name(name)
        with self._locked(name, model_dir):
            version = self._resolve(name, str(version))
            pointer = self.pointer(name)
            if pointer.latest != version:
                pointer.latest = version
                pointer.history.append(version)
                write_pointer(model_dir, pointer)
            return pointer

    def rollback(self, name: str) -> LatestPointer:
        """Make the version that was latest before the current one latest again (versions
        deleted since are skipped); VersionConflictError when there is none."""
        model_dir = self.root / check_model_name(name)
        with self._locked(name, model_dir):
            self.latest(name)  # ModelNotFoundError for an unknown model
            pointer = self.pointer(name)
            versions = self.versions(name)
            history = [v for v in pointer.history if v in versions]
            while history and history[-1] == pointer.latest:
                history.pop()
            if not history:
                raise VersionConflictError(
                    f"model {name!r} has no earlier latest version to roll back to (latest is "
                    f"{pointer.latest}); promote a version instead"
                )
            pointer.history = history
            pointer.latest = history[-1]
            write_pointer(model_dir, pointer)
            return pointer

    def delete_version(
        self, name: str, version: str, check: Callable[[], None] | None = None
    ) -> LatestPointer:
        """Delete one version that is not latest. `check` runs under the model's lock just
        before (it raises to refuse: live sessions, say). The version's directory is renamed
        out of the model first, so readers see all of it or none; its number is never reused.
        """
        model_dir = self.root / check_model_name(name)
        with self._locked(name, model_dir):
            version = self._resolve(name, str(version))
            pointer = self.pointer(name)
            if version == pointer.latest:
                raise VersionConflictError(
                    f"version {version} is model {name!r}'s latest; promote another version "
                    "or roll back first, then delete it"
                )
            if check is not None:
                check()
            pointer.history = [v for v in pointer.history if v != version]
            pointer.deleted = sorted({*pointer.deleted, version}, key=int)
            write_pointer(model_dir, pointer)  # before the rename: the number stays taken
            doomed = self.root / f"{_DELETING_PREFIX}{name}-{version}-{os.getpid()}"
            os.rename(self.version_path(name, version), doomed)
            fsync_path(model_dir)
        shutil.rmtree(doomed, ignore_errors=True)
        with self._cache_lock:
            self._cache.pop((name, version), None)
        self._cards.pop((name, version), None)
        return pointer


def _read_weights(card: ModelCard) -> dict[str, Tensor]:
    """The tensors of `weights.safetensors`, after checking its sha256 against config.json."""
    weights_path = card.path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ArtifactError(f"{weights_path}: missing")
    actual_hash = file_sha256(weights_path)
    if actual_hash != card.config["weights_sha256"]:
        raise ArtifactError(
            f"{weights_path}: sha256 {actual_hash} does not match weights_sha256 "
            f"{card.config['weights_sha256']} in {CONFIG_FILE} (corrupted or replaced)"
        )
    try:
        return load_file(weights_path)
    except Exception as error:  # safetensors raises its own error types
        raise ArtifactError(f"{weights_path}: unreadable safetensors file ({error})") from error


def _config_bytes(config: dict[str, Any]) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=False) + "\n").encode("utf-8")


def _check_config(config: Any, config_path: Path, name: str, version: str) -> None:
    if not isinstance(config, dict):
        raise ArtifactError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise ArtifactError(f"{config_path}: missing required keys {missing}")
    if config["name"] != name or str(config["version"]) != version:
        raise ArtifactError(
            f"{config_path}: says name={config['name']!r} version={config['version']!r} but "
            f"lives at {name}/{version}"
        )
    _check_content(config, str(config_path))


def _check_content(config: dict[str, Any], source: str) -> None:
    """Checks shared by publish and load: task, labels or vocabulary, provenance."""
    if config["task"] not in TASKS:
        raise ArtifactError(f"{source}: task must be one of {TASKS}, got {config['task']!r}")
    if not isinstance(config["model_config"], dict):
        raise ArtifactError(f"{source}: model_config must be an object")
    classification = config["task"] == "classification"
    task_key = "labels" if classification else "vocabulary"
    entries = config.get(task_key)
    if not isinstance(entries, list) or not entries:
        raise ArtifactError(f"{source}: a {config['task']} model needs a non-empty {task_key}")
    size_key = "d_output" if classification else "vocab_size"
    if len(entries) != config["model_config"].get(size_key):
        raise ArtifactError(
            f"{source}: {len(entries)} {task_key} but model_config.{size_key} is "
            f"{config['model_config'].get(size_key)}"
        )
    provenance = config["provenance"]
    if not isinstance(provenance, dict):
        raise ArtifactError(f"{source}: provenance must be an object")
    missing_provenance = [key for key in PROVENANCE_KEYS if key not in provenance]
    if missing_provenance:
        raise ArtifactError(f"{source}: provenance lacks {missing_provenance}")


def _build(config: dict[str, Any], source: Path) -> StatefulModel:
    try:
        return build_model(config["architecture"], dict(config["model_config"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{source}: cannot build the model ({error})") from error


# The artifact format's names are re-exported: callers need only this module.
__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "LoadedModel",
    "ModelCard",
    "ModelNotFoundError",
    "ModelRepository",
    "VersionConflictError",
    "check_model_name",
    "default_repository_root",
    "file_sha256",
    "is_safe_name",
    "stored_tensors",
]
