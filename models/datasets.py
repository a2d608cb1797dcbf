"""Labelled sequence datasets: the container every loader returns, its hash, and splitting.

A `SequenceDataset` is what training, calibration and evaluation consume for classification:
`inputs [N, T, F]` float32 and `labels [N]` long, with the label names and a sha256 of the
exact arrays so that provenance can name precisely the data a model saw. The concrete loaders
live beside this module: `models.digits` (scikit-learn digits as sequences),
`models.charcorpus` (a character corpus for language models) and `models.userdata`
(a user's `.npz` or text file).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def sha256_of_arrays(*arrays: np.ndarray) -> str:
    """sha256 over each array's dtype, shape and C-order bytes, in order.

    Dtype and shape are hashed too, so the same bytes viewed as another shape or type hash
    differently.
    """
    digest = hashlib.sha256()
    for array in arrays:
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
        digest.update(contiguous.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class SequenceDataset:
    """A classification dataset of equal-length sequences.

    Build it with `SequenceDataset.from_arrays`, which validates shapes and computes the hash.
    """

    name: str  # e.g. "digits-seq/rows/test" or "npz:my_data.npz/holdout"
    inputs: Tensor  # [N, T, F] float32
    labels: Tensor  # [N] long
    label_names: list[str]
    sha256: str
    value_range: tuple[float, float]  # (min, max) the inputs are expected to span

    @classmethod
    def from_arrays(
        cls,
        name: str,
        inputs: np.ndarray,
        labels: np.ndarray,
        label_names: list[str],
        value_range: tuple[float, float] | None = None,
    ) -> SequenceDataset:
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)  # [N, T, F]
        labels = np.ascontiguousarray(labels, dtype=np.int64)  # [N]
        if inputs.ndim != 3:
            raise ValueError(f"{name}: inputs must be [N, T, F], got shape {inputs.shape}")
        if labels.shape != (inputs.shape[0],):
            raise ValueError(
                f"{name}: labels must be [N] with N={inputs.shape[0]}, got shape {labels.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= len(label_names)):
            raise ValueError(
                f"{name}: labels must lie in 0..{len(label_names) - 1} "
                f"(one per label name), got {labels.min()}..{labels.max()}"
            )
        if value_range is None:
            value_range = (float(inputs.min()), float(inputs.max())) if inputs.size else (0, 0)
        return cls(
            name=name,
            inputs=torch.from_numpy(inputs),
            labels=torch.from_numpy(labels),
            label_names=list(label_names),
            sha256=sha256_of_arrays(inputs, labels),
            value_range=(float(value_range[0]), float(value_range[1])),
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self.inputs.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.inputs.shape[2])

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    def subset(self, indices: np.ndarray, name: str) -> SequenceDataset:
        """The rows at `indices`, re-hashed, keeping label names and the value range."""
        return SequenceDataset.from_arrays(
            name,
            self.inputs.numpy()[indices],
            self.labels.numpy()[indices],
            self.label_names,
            self.value_range,
        )


def split_dataset(
    dataset: SequenceDataset, holdout_fraction: float, seed: int = 0
) -> tuple[SequenceDataset, SequenceDataset]:
    """Seeded random split into (train, holdout); both parts are non-empty."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    n = len(dataset)
    n_holdout = int(round(n * holdout_fraction))
    if n_holdout < 1 or n_holdout >= n:
        raise ValueError(
            f"{dataset.name}: {n} examples cannot be split with holdout_fraction="
            f"{holdout_fraction} into two non-empty parts"
        )
    order = np.random.default_rng(seed).permutation(n)
    holdout = np.sort(order[:n_holdout])
    train = np.sort(order[n_holdout:])
    return (
        dataset.subset(train, f"{dataset.name}/train"),
        dataset.subset(holdout, f"{dataset.name}/holdout"),
    )
