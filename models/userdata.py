"""A user's own data: an `.npz` of labelled sequences, or a text file for a language model.

`.npz` format (loaded with `allow_pickle=False`, so object arrays are refused):

- `inputs`: [N, T, F], any real numeric dtype (stored as float32), all values finite
- `labels`: [N], an integer dtype, values in 0..C-1
- `label_names` (optional): [C] strings; without it the classes are "0".."C-1" with
  C = max(label) + 1

Text files are read as UTF-8 and encoded with the fixed character vocabulary of
`models.charcorpus`; the last `holdout_fraction` of the text (moved forward to the next line
start when there is one) is the held-out split.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from models.charcorpus import CharCorpus
from models.datasets import SequenceDataset

REQUIRED_NPZ_KEYS = ("inputs", "labels")
OPTIONAL_NPZ_KEYS = ("label_names",)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: expected an .npz archive, found a single .npy array")
        with archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npz archive ({error})") from error
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ValueError(f"{path}: contains object arrays, which are refused") from error
        raise


def _check_inputs(path: Path, inputs: np.ndarray) -> np.ndarray:
    if inputs.ndim != 3 or 0 in inputs.shape:
        raise ValueError(
            f"{path}: 'inputs' must be a non-empty [N, T, F] array, got shape {inputs.shape}"
        )
    if inputs.dtype.kind not in "fiu":
        raise ValueError(f"{path}: 'inputs' must be real numbers, got dtype {inputs.dtype}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
        as_float32 = inputs.astype(np.float32)  # [N, T, F]
    if not np.isfinite(as_float32).all():
        count = int((~np.isfinite(as_float32)).sum())
        raise ValueError(
            f"{path}: 'inputs' has {count} non-finite values (NaN, inf, or beyond float32 range)"
        )
    return as_float32


def _check_labels(path: Path, labels: np.ndarray, n_examples: int) -> np.ndarray:
    if labels.ndim != 1 or labels.shape[0] != n_examples:
        raise ValueError(
            f"{path}: 'labels' must be [N] with N={n_examples} (one per input), got {labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: 'labels' must have an integer dtype, got {labels.dtype}")
    if labels.min() < 0:
        raise ValueError(f"{path}: 'labels' must be non-negative, found {labels.min()}")
    return labels.astype(np.int64)


def _label_names(path: Path, arrays: dict[str, np.ndarray], labels: np.ndarray) -> list[str]:
    if "label_names" not in arrays:
        n_classes = int(labels.max()) + 1
        if n_classes < 2:
            raise ValueError(
                f"{path}: 'labels' must contain at least 2 classes, max label is {labels.max()}"
            )
        return [str(index) for index in range(n_classes)]
    names = arrays["label_names"]
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise ValueError(
            f"{path}: 'label_names' must be a 1-D string array, got {names.dtype} {names.shape}"
        )
    names_list = [str(name) for name in names.tolist()]
    if len(names_list) < 2 or len(set(names_list)) != len(names_list):
        raise ValueError(
            f"{path}: 'label_names' must be at least 2 distinct names, got {names_list}"
        )
    if labels.max() >= len(names_list):
        raise ValueError(
            f"{path}: label {labels.max()} is out of range for {len(names_list)} label_names"
        )
    return names_list


def load_npz_dataset(path: str | Path) -> SequenceDataset:
    """Validate and load a user's labelled sequences; ValueError names every problem found."""
    path = Path(path)
    arrays = _read_npz(path)
    missing = [key for key in REQUIRED_NPZ_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"{path}: missing array(s) {missing}; found {sorted(arrays)}")
    unexpected = sorted(set(arrays) - set(REQUIRED_NPZ_KEYS) - set(OPTIONAL_NPZ_KEYS))
    if unexpected:
        raise ValueError(
            f"{path}: unexpected array(s) {unexpected}; allowed are "
            f"{list(REQUIRED_NPZ_KEYS + OPTIONAL_NPZ_KEYS)}"
        )
    inputs = _check_inputs(path, arrays["inputs"])
    labels = _check_labels(path, arrays["labels"], inputs.shape[0])
    names = _label_names(path, arrays, labels)
    return SequenceDataset.from_arrays(f"npz:{path.name}", inputs, labels, names)


def load_text_corpus(path: str | Path, holdout_fraction: float = 0.05) -> CharCorpus:
    """A user's UTF-8 text file as a character corpus with a held-out tail."""
    path = Path(path)
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not valid UTF-8 text ({error})") from error
    cut = int(len(text) * (1.0 - holdout_fraction))
    next_line = text.find("\n", cut)
    if 0 <= next_line < len(text) - 2:
        cut = next_line + 1
    return CharCorpus.from_texts(f"text:{path.name}", text[:cut], text[cut:])
