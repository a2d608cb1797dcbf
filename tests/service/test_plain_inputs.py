"""The fast parse of plain JSON features (`service.dataplane.inputs.plain_rows`) agrees with
the strict validator, which stays the reference for everything else: value for value (bit for
bit) where both accept, message for message where they refuse. For session chunks [T, F] and
for prediction batches [N, T, F]."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
import torch

from service.dataplane import inputs as dataplane_inputs
from service.dataplane.inputs import InputLimits, feature_tensor, plain_rows
from service.errors import BadInputError
from service.sessions import inputs as session_inputs
from service.sessions.inputs import ChunkSpec, check_chunk, parse_chunk

FEATURES = 4
SPEC = ChunkSpec(kind="features", features=FEATURES, vocabulary=None, labels=["a", "b"])
LIMITS = InputLimits(max_batch_size=8, max_sequence_length=16)
F32_MAX = float(np.finfo(np.float32).max)
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


def session_chunk(rows: object) -> torch.Tensor:
    return check_chunk(parse_chunk(rows, SPEC, 16), SPEC, 16)


def prediction_batch(sequences: object) -> torch.Tensor:
    return feature_tensor(sequences, FEATURES, LIMITS)


def outcome(parse: Callable[[object], torch.Tensor], value: object) -> torch.Tensor | str:
    try:
        return parse(value)
    except BadInputError as error:
        return str(error)


def strict_outcome(parse: Callable[[object], torch.Tensor], value: object) -> torch.Tensor | str:
    """The reference: the same parse with the fast path turned off."""
    with pytest.MonkeyPatch.context() as patch:
        for module in (dataplane_inputs, session_inputs):
            patch.setattr(module, "plain_rows", lambda rows, features: False)
        return outcome(parse, value)


def random_rows(rng: random.Random, length: int) -> list:
    rows = [[rng.uniform(-5, 5) for _ in range(FEATURES)] for _ in range(length)]
    if rows and rng.random() < 0.5:
        t, f = rng.randrange(len(rows)), rng.randrange(FEATURES)
        rows[t][f] = rng.choice(ODD_VALUES)
    if rows and rng.random() < 0.1:
        rows[rng.randrange(len(rows))] = rows[0][:3]  # a short row
    return rows


def assert_agree(want: torch.Tensor | str, got: torch.Tensor | str) -> None:
    if isinstance(want, str):
        assert got == want
    else:
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        assert got.shape == want.shape
        assert got.view(torch.int32).equal(want.view(torch.int32))  # bit for bit, -0.0 too


@pytest.mark.parametrize("seed", range(300))
def test_session_chunks_parse_alike_both_ways(seed: int) -> None:
    rng = random.Random(seed)
    rows: object = random_rows(rng, rng.randint(0, 3))
    if rng.random() < 0.05:
        rows = tuple(rows)  # not a list
    assert_agree(strict_outcome(session_chunk, rows), outcome(session_chunk, rows))


@pytest.mark.parametrize("seed", range(300))
def test_prediction_batches_parse_alike_both_ways(seed: int) -> None:
    rng = random.Random(1000 + seed)
    length = rng.randint(0, 3)
    sequences: list = [random_rows(rng, length) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.15:
        sequences[-1] = random_rows(rng, length + 1)  # ragged
    if rng.random() < 0.05:
        sequences[0] = "text"
    assert_agree(strict_outcome(prediction_batch, sequences), outcome(prediction_batch, sequences))


def test_plain_rows_are_what_the_fast_path_takes() -> None:
    assert plain_rows([[1, 2.5, -3, 0.0]], 4)
    assert plain_rows([], 4)  # no rows: the callers check lengths themselves
    odd = (
        [[True, 1, 1, 1]],
        [[1, 1, 1]],
        [(1, 1, 1, 1)],
        [[float("nan"), 1, 1, 1]],
        [[4e38, 1, 1, 1]],
    )
    for rows in odd:
        assert not plain_rows(rows, 4), rows
    assert not plain_rows(((1, 1, 1, 1),), 4)
