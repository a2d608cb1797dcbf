"""What every imported model's config.json shares: labels, input spec, provenance, origin.

An imported version records where it came from under `imported`: the file's format ("nir" or
"onnx"), its base name and its sha256, so `GET /v1/models/{name}` can say so and anyone can
check that a version was built from the file they hold. `model_origin` reads any version's
config and says whether it is built-in, trained, fine-tuned or imported.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from models.artifact_format import file_sha256
from models.training import neuroserve_version

IMPORT_FORMATS = ("nir", "onnx")


def class_labels(labels: list[str] | None, n_classes: int) -> list[str]:
    """`labels`, checked against the model's number of outputs; "0".."C-1" when None."""
    if labels is None:
        return [str(i) for i in range(n_classes)]
    if len(labels) != n_classes or len(set(labels)) != len(labels):
        raise ValueError(
            f"--labels needs {n_classes} distinct names (the model has {n_classes} outputs), "
            f"got {len(labels)}: {labels}"
        )
    return list(labels)


def imported_config(
    *,
    source_format: str,
    path: Path,
    architecture: str,
    model_config: dict[str, Any],
    labels: list[str],
    d_input: int,
    command: str,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json content of an imported classifier (publish adds name, version, hashes)."""
    if source_format not in IMPORT_FORMATS:
        raise ValueError(f"unknown import format {source_format!r}; known: {IMPORT_FORMATS}")
    return {
        "architecture": architecture,
        "model_config": model_config,
        "task": "classification",
        "labels": labels,
        "input": {"kind": "features", "features": d_input, "dtype": "float32"},
        "imported": {
            "format": source_format,
            "file": path.name,
            "sha256": file_sha256(path),
            **(details or {}),
        },
        "provenance": {
            "data_sha256": None,  # trained elsewhere, on data this repository never saw
            "seed": None,
            "command": command,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "neuroserve_version": neuroserve_version(),
        },
        "metrics": {},
    }


def model_origin(config: dict[str, Any]) -> dict[str, Any]:
    """Where a version came from: {"kind": "imported", "format", "file", "sha256"} for an
    import, else {"kind": "built-in" | "trained" | "fine-tuned", "command"}."""
    imported = config.get("imported")
    if isinstance(imported, dict):
        return {"kind": "imported", **imported}
    command = str((config.get("provenance") or {}).get("command") or "")
    if isinstance(config.get("weights"), dict) or "finetune" in config:
        kind = "fine-tuned"
    elif "--builtin" in command:
        kind = "built-in"
    else:
        kind = "trained"
    return {"kind": kind, "command": command or None}
