"""Logits of the committed built-in digits classifiers, or a pytest skip when absent.

The fixed digits split (models.digits): train idx[:1000], calibration idx[1000:1400],
test idx[1400:], with idx = numpy.random.default_rng(0).permutation(1797); each image is
8 steps of 8 raw 0..16 features and the classifier's answer is its last step's logits.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

BUILTIN_CLASSIFIERS = ("digits-lru", "digits-snn", "digits-snn-lite")


@cache
def _split_logits(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from models.digits import load_digits_seq
        from models.repository import ModelRepository, default_repository_root
    except ImportError as error:
        pytest.skip(f"the models package cannot load built-in classifiers yet: {error}")
    root = default_repository_root()
    if not (root / name).is_dir():
        pytest.skip(f"built-in classifier {name!r} is not committed under {root} yet")
    model = ModelRepository(root).load(name).model
    dataset = load_digits_seq(split, variant="rows")
    with torch.no_grad():
        logits = model(dataset.inputs)[0][:, -1]  # [N, T, C] -> last step [N, C]
    return logits.to(torch.float64), dataset.labels


def builtin_logits(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C] float64, labels [N]) of classifier `name` on a digits split."""
    logits, labels = _split_logits(name, split)
    return logits.clone(), labels.clone()
