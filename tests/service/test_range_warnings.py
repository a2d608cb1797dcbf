"""Warnings for inputs far outside a model's training range: the batch form (one pass over a
micro-batch) says for each request exactly what the per-request form says."""

from __future__ import annotations

import random

import pytest
import torch

from service.dataplane.inputs import out_of_range_warning, out_of_range_warnings

VALUE_RANGE = (0.0, 16.0)


@pytest.mark.parametrize("seed", range(50))
def test_the_batch_form_agrees_with_one_request_at_a_time(seed: int) -> None:
    rng = random.Random(seed)
    counts = [rng.randint(1, 3) for _ in range(rng.randint(1, 6))]
    x = torch.rand(sum(counts), 5, 8) * 16  # [N, T, F] inside the range
    for _ in range(rng.randint(0, 3)):  # a few values far outside, in some requests
        x[rng.randrange(x.shape[0]), rng.randrange(5), rng.randrange(8)] = rng.choice([-9.0, 30.0])
    want, start = [], 0
    for count in counts:
        want.append(out_of_range_warning(x[start : start + count], VALUE_RANGE))
        start += count
    assert out_of_range_warnings(x, VALUE_RANGE, counts) == want
    assert out_of_range_warnings(x, None, counts) == [None] * len(counts)


def test_a_request_far_outside_is_named_alone() -> None:
    x = torch.full((3, 2, 4), 8.0)
    x[1, 0, 0] = 40.0
    notes = out_of_range_warnings(x, VALUE_RANGE, [1, 1, 1])
    assert notes[0] is None and notes[2] is None
    assert notes[1] is not None and "inputs span [8, 40]" in notes[1]
