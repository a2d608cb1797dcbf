"""What one published model version is on disk, and the checks that its weights fit its model.

A version directory holds `config.json` (`CONFIG_FILE`) and its weights: `weights.safetensors`
(`WEIGHTS_FILE`) or, for a zeroth-order fine-tuned version, a trajectory (`models.trajectory`).
`ModelCard` is a version's parsed config and where it lives; `ArtifactError` is the one error
for a corrupt or mismatched artifact, naming the file and the problem. The model repository
(`models.repository`) lists, loads and publishes versions on top of these.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.base import StatefulModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ArtifactError(ValueError):
    """A corrupt or mismatched artifact; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    path: Path  # the version directory
    config: dict[str, Any]  # parsed config.json


@dataclass
class LoadedModel:
    card: ModelCard
    model: StatefulModel  # in eval mode


def is_safe_name(name: object) -> bool:
    """A single path segment that cannot escape its directory or hide (no '..', no '/')."""
    return isinstance(name, str) and bool(_SAFE_NAME.fullmatch(name)) and ".." not in name


def check_model_name(name: str) -> str:
    """Return `name` if it is a safe single path segment; ValueError otherwise."""
    if not is_safe_name(name):
        raise ValueError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..' or slashes"
        )
    return name


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_state_schema_hash(model: StatefulModel) -> str:
    """sha256 of the state schema a model declares (`model.state_schema()`: names, per-sample
    shapes, dtypes) as sorted JSON: config.json's `state_schema_hash`.

    Publishing records it and loading checks it again, so a version whose built model would
    carry a different state (an edited model_config) is refused. Stored session state has a
    hash of its own, over the tensors actually stored (`service.state.codec.tensor_schema_hash`).
    """
    schema = {name: [list(shape), dtype] for name, (shape, dtype) in model.state_schema().items()}
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()


def tied_names(model: StatefulModel) -> dict[str, str]:
    """Alias -> canonical name for state-dict entries that share storage (tied weights, e.g.
    a language model's head and embedding). Only the canonical entry is stored on disk:
    safetensors refuses to save shared tensors."""
    canonical: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel() == 0:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in canonical:
            aliases[name] = canonical[key]
        else:
            canonical[key] = name
    return aliases


def check_state_dict(model: StatefulModel, tensors: dict[str, Tensor], source: str) -> None:
    """ArtifactError naming every missing, unexpected and shape-mismatched tensor.

    `tensors` holds the stored entries: tied aliases (see `tied_names`) must be absent.
    """
    aliases = tied_names(model)
    expected = {
        name: tuple(t.shape) for name, t in model.state_dict().items() if name not in aliases
    }
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{name}: expected {list(expected[name])}, found {list(found[name])}"
        for name in sorted(set(expected) & set(found))
        if expected[name] != found[name]
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing tensors {missing}")
        if unexpected:
            problems.append(f"unexpected tensors {unexpected}")
        if mismatched:
            problems.append(f"shape mismatches [{'; '.join(mismatched)}]")
        raise ArtifactError(f"{source}: weights do not match the model: {', '.join(problems)}")


def stored_tensors(model: StatefulModel, state_dict: dict[str, Tensor], source: str) -> dict:
    """The entries of `state_dict` to write: tied aliases dropped after checking that they
    really equal their canonical tensor."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    for alias, name in tied_names(model).items():
        if alias in tensors and name in tensors and not torch.equal(tensors[alias], tensors[name]):
            raise ArtifactError(f"{source}: tied tensors {alias!r} and {name!r} differ")
        tensors.pop(alias, None)
    return tensors
