"""scikit-learn's handwritten digits as sequences, with a fixed split and named shifts.

The 1797 8x8 images (values 0..16) ship inside scikit-learn, so nothing is downloaded.
Two sequence views of each image:

- "rows":   8 steps of 8 features (one image row per step), inputs [N, 8, 8]
- "pixels": 64 steps of 1 feature (row-major pixel by pixel), inputs [N, 64, 1]

Fixed split: `idx = numpy.random.default_rng(0).permutation(1797)`; train idx[:1000],
calibration idx[1000:1400], test idx[1400:] (397 images).

Shifts (for robustness and fine-tuning experiments), deterministic for every split:

- "gaussian_noise": add N(0, 4^2) per pixel, clip to 0..16 (seeded per split)
- "inverted":       16 - x
- "translated":     move each image by one pixel up, down, left or right (direction seeded
                    per image), filling the vacated row or column with 0

A shift is applied to the 8x8 image before it is laid out as a sequence, so the two
variants of one image see the same noise draw.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np

from models.datasets import SequenceDataset

SPLITS = ("train", "calibration", "test")
VARIANTS = ("rows", "pixels")
SHIFTS = ("gaussian_noise", "inverted", "translated")
N_IMAGES = 1797
PIXEL_MAX = 16.0
NOISE_STD = 4.0
LABEL_NAMES = [str(digit) for digit in range(10)]
_SPLIT_BOUNDS = {"train": (0, 1000), "calibration": (1000, 1400), "test": (1400, N_IMAGES)}


@lru_cache(maxsize=1)
def _all_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # lazy: ~1 s of start-up for every importer

    bunch = load_digits()
    images = bunch.images.astype(np.float32)  # [1797, 8, 8]
    labels = bunch.target.astype(np.int64)  # [1797]
    if images.shape != (N_IMAGES, 8, 8):
        raise RuntimeError(f"unexpected scikit-learn digits shape {images.shape}")
    return images, labels


def split_indices(split: str) -> np.ndarray:
    """Indices into scikit-learn's digit order for one split of the fixed permutation."""
    if split not in _SPLIT_BOUNDS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {SPLITS}")
    start, stop = _SPLIT_BOUNDS[split]
    return np.random.default_rng(0).permutation(N_IMAGES)[start:stop]


def _shift_rng(shift: str, split: str, seed: int) -> np.random.Generator:
    # crc32 rather than hash(): Python's str hash is salted per process.
    return np.random.default_rng([seed, zlib.crc32(shift.encode()), zlib.crc32(split.encode())])


def _translate_one_pixel(images: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Shift image i by one pixel: direction 0 up, 1 down, 2 left, 3 right; zero fill."""
    moved = np.zeros_like(images)  # [N, 8, 8]
    up, down, left, right = (directions == d for d in range(4))
    moved[up, :-1, :] = images[up, 1:, :]
    moved[down, 1:, :] = images[down, :-1, :]
    moved[left, :, :-1] = images[left, :, 1:]
    moved[right, :, 1:] = images[right, :, :-1]
    return moved


def apply_shift(images: np.ndarray, shift: str, split: str, seed: int = 0) -> np.ndarray:
    """A shifted copy of `images [N, 8, 8]`; `split` and `seed` pick the random draw."""
    if shift == "gaussian_noise":
        noise = _shift_rng(shift, split, seed).normal(0.0, NOISE_STD, size=images.shape)
        return np.clip(images + noise, 0.0, PIXEL_MAX).astype(np.float32)
    if shift == "inverted":
        return (PIXEL_MAX - images).astype(np.float32)
    if shift == "translated":
        directions = _shift_rng(shift, split, seed).integers(0, 4, size=images.shape[0])
        return _translate_one_pixel(images, directions)
    raise ValueError(f"unknown digits shift {shift!r}; expected one of {SHIFTS} or None")


def images_to_sequences(images: np.ndarray, variant: str) -> np.ndarray:
    """Lay out `images [N, 8, 8]` as sequences: rows -> [N, 8, 8], pixels -> [N, 64, 1]."""
    if variant == "rows":
        return np.ascontiguousarray(images)  # [N, 8, 8]
    if variant == "pixels":
        return images.reshape(images.shape[0], 64, 1)  # [N, 64, 1]
    raise ValueError(f"unknown digits variant {variant!r}; expected one of {VARIANTS}")


def load_digits_seq(
    split: str, variant: str = "rows", shift: str | None = None, seed: int = 0
) -> SequenceDataset:
    """One split of digits as sequences, optionally under a named shift.

    Raw pixel values 0..16 as float32 (no normalisation: models scale their own input).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown digits variant {variant!r}; expected one of {VARIANTS}")
    all_images, all_labels = _all_images()
    indices = split_indices(split)
    images = all_images[indices]  # [N, 8, 8]
    name = f"digits-seq/{variant}/{split}"
    if shift is not None:
        images = apply_shift(images, shift, split, seed)
        name += f"/{shift}" + (f"/seed{seed}" if seed else "")
    return SequenceDataset.from_arrays(
        name,
        images_to_sequences(images, variant),
        all_labels[indices],
        LABEL_NAMES,
        value_range=(0.0, PIXEL_MAX),
    )
