"""The fast decoding of plain FP32 request tensors (`service.api.v2_codec.plain_float32_tensor`)
agrees with the general path (`decode_tensor_checked`), which stays the reference for
everything else: the same array, bit for bit and of the same dtype, where it decodes; where it
declines, `decode_tensor` is the general path itself, so it refuses with the same message."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from service.api.v2_codec import (
    DecodedTensor,
    V2BadRequestError,
    decode_tensor,
    decode_tensor_checked,
    plain_float32_tensor,
)
from tests.service.test_plain_inputs import F32_MAX
from tests.service.test_plain_inputs import ODD_VALUES as PLAIN_INPUT_ODD_VALUES

# The values that the fast parse of session and /predict features is tested on, and more.
ODD_VALUES = [
    *PLAIN_INPUT_ODD_VALUES,
    2**53 + 1,
    -F32_MAX,
    float(np.nextafter(F32_MAX, np.inf)),  # above float32's largest, still rounds to it
]


def outcome(decode: Any, tensor: Any) -> DecodedTensor | str:
    try:
        return decode(tensor, "inputs[0]")
    except V2BadRequestError as error:
        return str(error)


def random_tensor(rng: random.Random) -> Any:
    shape = [rng.randint(1, 3) for _ in range(rng.randint(1, 3))]
    data: Any = [rng.uniform(-20, 20) for _ in range(int(np.prod(shape)))]
    tensor: Any = {"name": "input", "datatype": "FP32", "shape": shape, "data": data}
    if rng.random() < 0.4:
        data[rng.randrange(len(data))] = rng.choice(ODD_VALUES)
    if rng.random() < 0.2:
        data[rng.randrange(len(data))] = rng.randint(-(2**40), 2**40)  # JSON ints
    if rng.random() < 0.1:
        data.pop()  # too few for the shape
    if rng.random() < 0.1:
        tensor["shape"] = rng.choice([[], [0], [-1], [True], [2.0], "2", None])
    if rng.random() < 0.1:
        tensor["datatype"] = rng.choice(["FP64", "FP16", "INT32", "BOOL", "fp32", None])
    if rng.random() < 0.1:
        tensor["parameters"] = rng.choice([None, {}, {"binary_data_size": 4}, {"x": 1}])
    if rng.random() < 0.05:
        tensor["name"] = rng.choice(["", None, 3])
    if rng.random() < 0.05:
        tensor["data"] = rng.choice([None, "1", tuple(data), [data]])
    if rng.random() < 0.03:
        tensor = rng.choice([[tensor], "tensor", None])
    return tensor


def assert_same(want: DecodedTensor | str, got: DecodedTensor | str) -> None:
    if isinstance(want, str):
        assert got == want
        return
    assert isinstance(got, DecodedTensor)
    assert (got.name, got.datatype, got.shape) == (want.name, want.datatype, want.shape)
    assert isinstance(got.values, np.ndarray) and got.values.dtype == want.values.dtype
    assert got.values.shape == want.values.shape
    assert got.values.tobytes() == want.values.tobytes()  # bit for bit, -0.0 too


def test_plain_tensors_decode_as_the_general_path_does() -> None:
    rng = random.Random(0)
    taken = 0
    for _ in range(2000):
        tensor = random_tensor(rng)
        taken += plain_float32_tensor(tensor) is not None
        assert_same(outcome(decode_tensor_checked, tensor), outcome(decode_tensor, tensor))
    assert 800 < taken < 1800  # both ways were exercised, each many times


@pytest.mark.parametrize(
    "data",
    [
        [1.5, -2, 0.0, F32_MAX],
        [-F32_MAX, 2**70, -0.0, 1e-46],
    ],
)
def test_the_usual_tensor_takes_the_fast_path(data: list) -> None:
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 2, 2], "data": data}
    fast = plain_float32_tensor(tensor)
    assert fast is not None and fast.values.dtype == np.float32
    assert_same(decode_tensor_checked(tensor, "inputs[0]"), fast)


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), 4e38, float(np.nextafter(F32_MAX, np.inf)), True, 10**400]
)
def test_values_the_fast_path_declines(value: Any) -> None:
    tensor = {"name": "input", "datatype": "FP32", "shape": [2], "data": [1.0, value]}
    assert plain_float32_tensor(tensor) is None
    with pytest.raises(V2BadRequestError, match=r"inputs\[0\] \('input'\)\.data"):
        decode_tensor(tensor, "inputs[0]")
