"""Calibration per position of a sequence: one `CalibrationArtifact` per position bucket.

A stateful model's output distribution changes with how much of its input it has read: a
digit classifier after 2 rows is not the predictor it is after 8, and a language model with
2 characters of context is not the one with 200. Split conformal coverage needs calibration
scores exchangeable with the test score, i.e. scored at the same position, so every answer is
built from the calibration of its own position:

- sequence classifiers: one bucket per time step 1..T (T is the calibration data's length);
- language models: buckets of context length (1, 2-3, 4-7, ...); within a bucket the
  guarantee is marginal over the context lengths the bucket was calibrated with.

A position past the last bucket (`horizon`) has no calibration: there `at` returns None and
an answer must say it is uncalibrated rather than borrow another position's scores.

Storage: one JSON document (format 2: the buckets and each bucket's artifact as
`CalibrationArtifact.to_json_dict()`) and one safetensors file whose tensor names carry the
bucket (`b3.scores.lac`, `b3.labels`). `to_files` adds the `serving` object a served
calibration keeps in its JSON (how the calibration data ran, where it came from, and the
tensor file's sha256, so a reader can tell the two files belong together); this package
ignores it when reading.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from calibration.artifact import (
    DEFAULT_RAPS_ALPHA,
    DEFAULT_TUNE_FRACTION,
    CalibrationArtifact,
    fit_calibration_artifact,
)
from calibration.checks import ArrayLike, as_labels
from calibration.maps import MAP_CANDIDATES

POSITIONAL_FORMAT = 2
SERVING_KEY = "serving"


@dataclass(frozen=True)
class PositionBuckets:
    """Bucket k holds the positions edges[k] <= p < edges[k + 1] (positions start at 1)."""

    edges: tuple[int, ...]

    def __post_init__(self) -> None:
        edges = tuple(self.edges)
        if len(edges) < 2 or any(isinstance(e, bool) or not isinstance(e, int) for e in edges):
            raise ValueError(f"bucket edges must be at least two integers, got {edges!r}")
        if edges[0] < 1 or any(b <= a for a, b in zip(edges[:-1], edges[1:], strict=True)):
            raise ValueError(f"bucket edges must increase from 1 or more, got {edges!r}")
        object.__setattr__(self, "edges", edges)

    @classmethod
    def every_step(cls, horizon: int) -> PositionBuckets:
        """One bucket per position 1..horizon."""
        return cls(tuple(range(1, horizon + 2)))

    @classmethod
    def doubling(cls, horizon: int) -> PositionBuckets:
        """1, 2-3, 4-7, ... up to `horizon` (the last bucket ends there)."""
        edges = [1]
        while edges[-1] * 2 < horizon:
            edges.append(edges[-1] * 2)
        return cls((*edges, horizon + 1))

    def __len__(self) -> int:
        return len(self.edges) - 1

    @property
    def horizon(self) -> int:
        """The last calibrated position."""
        return self.edges[-1] - 1

    def index(self, position: int) -> int | None:
        """The bucket holding `position`, or None outside 1..horizon."""
        if not self.edges[0] <= position < self.edges[-1]:
            return None
        return bisect.bisect_right(self.edges, position) - 1

    def bounds(self, bucket: int) -> tuple[int, int]:
        """First and last position (inclusive) of a bucket."""
        return self.edges[bucket], self.edges[bucket + 1] - 1

    def describe(self, bucket: int) -> str:
        low, high = self.bounds(bucket)
        return str(low) if low == high else f"{low}-{high}"


@dataclass(frozen=True, eq=False)  # tensors inside: compare fields
class PositionalCalibration:
    buckets: PositionBuckets
    artifacts: tuple[CalibrationArtifact, ...]  # one per bucket, in bucket order

    def __post_init__(self) -> None:
        object.__setattr__(self, "artifacts", tuple(self.artifacts))
        if len(self.artifacts) != len(self.buckets):
            raise ValueError(
                f"{len(self.buckets)} position buckets need as many calibrations, got "
                f"{len(self.artifacts)}"
            )
        first = self.artifacts[0]
        identity = (first.model, first.version, first.backend, first.num_classes, first.created)
        for artifact in self.artifacts[1:]:
            other = (
                artifact.model,
                artifact.version,
                artifact.backend,
                artifact.num_classes,
                artifact.created,
            )
            if other != identity:
                raise ValueError(
                    f"the calibrations of one positional calibration must share model, "
                    f"version, backend, classes and creation time: {other} vs {identity}"
                )

    # ---- identity -------------------------------------------------------------------------

    @property
    def model(self) -> str:
        return self.artifacts[0].model

    @property
    def version(self) -> str:
        return self.artifacts[0].version

    @property
    def backend(self) -> str:
        return self.artifacts[0].backend

    @property
    def num_classes(self) -> int:
        return self.artifacts[0].num_classes

    @property
    def created(self) -> str:
        return self.artifacts[0].created

    @property
    def horizon(self) -> int:
        return self.buckets.horizon

    @functools.cached_property  # asked for every answer; the fields are frozen
    def calibration_id(self) -> str:
        """16 hex digits that change with every fit (time and data): online levels and live
        counters are keyed by it, so they restart when the calibration is replaced."""
        digest = hashlib.sha256(self.created.encode())
        for artifact in self.artifacts:
            digest.update(artifact.data_hash.encode())
        return digest.hexdigest()[:16]

    # ---- lookup ---------------------------------------------------------------------------

    def at(self, position: int) -> CalibrationArtifact | None:
        """The calibration of `position` (1-based), or None past the horizon."""
        bucket = self.buckets.index(position)
        return None if bucket is None else self.artifacts[bucket]

    # ---- storage --------------------------------------------------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": POSITIONAL_FORMAT,
            "model": self.model,
            "version": self.version,
            "backend": self.backend,
            "created": self.created,
            "calibration_id": self.calibration_id,
            "bucket_edges": list(self.buckets.edges),
            "positions": [artifact.to_json_dict() for artifact in self.artifacts],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), indent=2, sort_keys=True, allow_nan=False)

    def tensors(self) -> dict[str, Tensor]:
        # Cloned: buckets may share tensors (one artifact reused), which safetensors refuses.
        return {
            f"b{k}.{name}": tensor.clone()
            for k, artifact in enumerate(self.artifacts)
            for name, tensor in artifact.tensors().items()
        }

    def to_safetensors(self) -> bytes:
        return save_tensors(self.tensors())

    def to_files(self, serving: Mapping[str, Any] | None = None) -> tuple[bytes, bytes]:
        """(JSON bytes, safetensors bytes) as a model version stores them, with `serving`
        and the tensor file's sha256 in the JSON's `serving` object."""
        tensor_bytes = self.to_safetensors()
        meta = self.to_json_dict()
        tensors_sha256 = hashlib.sha256(tensor_bytes).hexdigest()
        meta[SERVING_KEY] = {**dict(serving or {}), "tensors_sha256": tensors_sha256}
        json_text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n"
        return json_text.encode("utf-8"), tensor_bytes

    @classmethod
    def from_serialized(cls, json_text: str, tensor_bytes: bytes) -> PositionalCalibration:
        return cls.from_parts(json.loads(json_text), load_tensors(tensor_bytes))

    @classmethod
    def from_parts(cls, meta: Any, tensors: dict[str, Tensor]) -> PositionalCalibration:
        if not isinstance(meta, dict) or meta.get("format") != POSITIONAL_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ValueError(
                f"unsupported calibration format {found!r}; expected {POSITIONAL_FORMAT} "
                "(calibration per position): run `neuroserve calibrate` again"
            )
        buckets = PositionBuckets(tuple(int(edge) for edge in meta["bucket_edges"]))
        artifacts = []
        for k, artifact_meta in enumerate(meta["positions"]):
            prefix = f"b{k}."
            own = {
                name[len(prefix) :]: tensor
                for name, tensor in tensors.items()
                if name.startswith(prefix)
            }
            artifacts.append(CalibrationArtifact.from_parts(artifact_meta, own))
        return cls(buckets, tuple(artifacts))


def fit_positional_calibration(
    logits: Sequence[ArrayLike],
    labels: Sequence[ArrayLike],
    buckets: PositionBuckets,
    model: str,
    version: str,
    backend: str,
    seed: int = 0,
    tune_fraction: float = DEFAULT_TUNE_FRACTION,
    raps_alpha: float = DEFAULT_RAPS_ALPHA,
    created: str | None = None,
    map_candidates: tuple[str, ...] = MAP_CANDIDATES,
) -> PositionalCalibration:
    """One artifact per bucket from that bucket's logits [N_k, C] and labels [N_k]; each
    bucket's map is the best of `map_candidates` (identity and temperature keep argmaxes).

    Each bucket's examples must be exchangeable with the answers served at its positions
    (e.g. for a classifier, the logits after exactly that many steps).
    """
    if len(logits) != len(buckets) or len(labels) != len(buckets):
        raise ValueError(
            f"{len(buckets)} buckets need as many logits and labels, got {len(logits)} and "
            f"{len(labels)}"
        )
    created = created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    artifacts = []
    for k, (bucket_logits, bucket_labels) in enumerate(zip(logits, labels, strict=True)):
        try:
            artifacts.append(
                fit_calibration_artifact(
                    bucket_logits,
                    bucket_labels,
                    model,
                    version,
                    backend,
                    seed=seed,
                    tune_fraction=tune_fraction,
                    raps_alpha=raps_alpha,
                    created=created,
                    map_candidates=map_candidates,
                )
            )
        except ValueError as error:
            raise ValueError(f"position {buckets.describe(k)}: {error}") from None
    return PositionalCalibration(buckets, tuple(artifacts))


def fit_stepwise_calibration(
    step_logits: Tensor,
    labels: ArrayLike,
    model: str,
    version: str,
    backend: str,
    seed: int = 0,
    **options: Any,
) -> PositionalCalibration:
    """A sequence classifier's calibration: step_logits [N, T, C] (the logits after every
    step), labels [N]; one bucket per step 1..T. The same seed splits every step's examples
    alike, so the conformal part is the same examples at every step."""
    if step_logits.ndim != 3:
        raise ValueError(f"step logits must have shape [N, T, C], got {tuple(step_logits.shape)}")
    n, steps, num_classes = step_logits.shape
    labels = as_labels(labels, n, num_classes)
    return fit_positional_calibration(
        [step_logits[:, t] for t in range(steps)],
        [labels] * steps,
        PositionBuckets.every_step(steps),
        model,
        version,
        backend,
        seed=seed,
        **options,
    )
