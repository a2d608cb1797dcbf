"""Chunks of a session's inputs (`service.sessions.inputs`): the fast parse of plain feature
rows agrees with the strict validator, which stays the reference for everything else."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from service.errors import BadInputError
from service.sessions import inputs as chunk_inputs
from service.sessions.inputs import ChunkSpec, check_chunk, parse_chunk

SPEC = ChunkSpec(kind="features", features=4, vocabulary=None, labels=["a", "b"])
F32_MAX = float(np.finfo(np.float32).max)


def strictly(rows: object) -> torch.Tensor | str:
    """The reference: the strict path alone (no fast path), then the tensor checks."""
    original = chunk_inputs._plain_features
    chunk_inputs._plain_features = lambda rows, features: None
    try:
        return check_chunk(parse_chunk(rows, SPEC, 16), SPEC, 16)
    except BadInputError as error:
        return str(error)
    finally:
        chunk_inputs._plain_features = original


def fast(rows: object) -> torch.Tensor | str:
    try:
        return check_chunk(parse_chunk(rows, SPEC, 16), SPEC, 16)
    except BadInputError as error:
        return str(error)


ODD_VALUES = [
    True,
    "1.5",
    None,
    [1.0],
    float("nan"),
    float("inf"),
    -float("inf"),
    10**400,
    2**70,
    3e38,
    4e38,
    -4e38,
    F32_MAX,
    1e-46,
    -0.0,
    7,
]


def random_rows(rng: random.Random) -> object:
    rows = [[rng.uniform(-5, 5) for _ in range(4)] for _ in range(rng.randint(0, 3))]
    if rows and rng.random() < 0.7:
        t, f = rng.randrange(len(rows)), rng.randrange(4)
        rows[t][f] = rng.choice(ODD_VALUES)
    if rows and rng.random() < 0.1:
        rows[rng.randrange(len(rows))] = rows[0][:3]  # a short row
    if rng.random() < 0.05:
        rows = tuple(rows)  # not a list
    return rows


@pytest.mark.parametrize("seed", range(400))
def test_the_fast_parse_agrees_with_the_strict_one(seed: int) -> None:
    rows = random_rows(random.Random(seed))
    want, got = strictly(rows), fast(rows)
    if isinstance(want, str):
        assert got == want
    else:
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        assert got.view(torch.int32).equal(want.view(torch.int32))  # bit for bit, -0.0 too


def test_plain_rows_take_the_fast_path() -> None:
    assert chunk_inputs._plain_features([[1, 2.5, -3, 0.0]], 4) is not None
    for odd in (
        [[True, 1, 1, 1]],
        [[1, 1, 1]],
        [(1, 1, 1, 1)],
        [[float("nan"), 1, 1, 1]],
        [[4e38, 1, 1, 1]],
    ):
        assert chunk_inputs._plain_features(odd, 4) is None, odd
