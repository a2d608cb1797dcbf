"""Open Inference Protocol (KServe V2) JSON tensors: decoding, validation and encoding.

A V2 JSON tensor is `{"name", "datatype", "shape", "data"}`. `data` holds the elements in
row-major order, either flat (`[1, 2, 3, 4]` for shape [2, 2]) or nested like the shape
(`[[1, 2], [3, 4]]`). Decoding checks, in this order, so the first problem is the one
reported: the datatype is known, the shape is a list of positive integers, the nesting and
element count match the shape, every element has the datatype's JSON type (numbers for
FP*/INT*/UINT*, true/false for BOOL, strings for BYTES), integers fit their type, and
floats are finite and fit their width (`NaN`, which Python's JSON parser accepts, is named).

Every problem raises `V2BadRequestError` (HTTP 400, body `{"error": "..."}`), the status the
protocol uses for a malformed request. Only the JSON form is supported: the binary tensor
data extension (`Inference-Header-Content-Length`) is refused with a message saying so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import NeuroserveError

FLOAT_TYPES: dict[str, Any] = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
INT_TYPES: dict[str, Any] = {
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
}
NUMERIC_TYPES = (*FLOAT_TYPES, *INT_TYPES)
DATATYPES = (*NUMERIC_TYPES, "BOOL", "BYTES")
# JSON floats/integers (bool is a separate Python type, so true/false are not numbers here).
_NUMBER_TYPES = {int, float}
_SHOWN_PROBLEMS = 3


class V2BadRequestError(NeuroserveError):
    """A malformed Open Inference Protocol request: 400 with `{"error": message}`."""

    status_code = 400
    code = "bad_request"


@dataclass(frozen=True)
class DecodedTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    # float64/int64/bool array of `shape` for numeric and BOOL tensors; a flat list of str
    # for BYTES (JSON strings; bytes that are not text cannot travel in the JSON form).
    values: np.ndarray | list[str]


# ---- decoding -------------------------------------------------------------------------------


def decode_tensor(tensor: Any, where: str) -> DecodedTensor:
    """One request tensor (already JSON-parsed) as a checked `DecodedTensor`.

    `where` names the tensor in messages, e.g. "inputs[0]".
    """
    if not isinstance(tensor, dict):
        raise V2BadRequestError(f"{where} must be an object, got {type(tensor).__name__}")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise V2BadRequestError(f"{where}.name must be a non-empty string")
    where = f"{where} ({name!r})"
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise V2BadRequestError(
            f"{where}.datatype {datatype!r} is not a V2 datatype; use one of {list(DATATYPES)}"
        )
    shape = _checked_shape(tensor.get("shape"), where)
    if "data" not in tensor:
        raise V2BadRequestError(
            f"{where} has no data; only the JSON tensor form is supported (send data inline)"
        )
    flat = flatten_data(tensor["data"], shape, where)
    if datatype == "BYTES":
        return DecodedTensor(name, datatype, shape, _checked_strings(flat, where))
    if datatype == "BOOL":
        _check_element_types(flat, {bool}, "true or false", where)
        return DecodedTensor(name, datatype, shape, np.array(flat, dtype=bool).reshape(shape))
    if datatype in INT_TYPES:
        _check_element_types(flat, {int}, "integers", where)
        return DecodedTensor(name, datatype, shape, _checked_ints(flat, datatype, where, shape))
    _check_element_types(flat, _NUMBER_TYPES, "numbers", where)
    return DecodedTensor(name, datatype, shape, _checked_floats(flat, datatype, where, shape))


def _checked_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not shape:
        raise V2BadRequestError(f"{where}.shape must be a non-empty list of integers")
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise V2BadRequestError(
                f"{where}.shape {shape} must hold positive integers (no empty or -1 dimensions "
                "in a request)"
            )
    return tuple(shape)


def flatten_data(data: Any, shape: Sequence[int], where: str) -> list[Any]:
    """The elements of flat or shape-nested `data` in row-major order, checked against `shape`."""
    if not isinstance(data, list):
        raise V2BadRequestError(f"{where}.data must be a list, got {type(data).__name__}")
    expected = math.prod(shape)
    nested = len(shape) > 1 and any(isinstance(item, list) for item in data)
    if not nested:
        if len(data) != expected:
            raise V2BadRequestError(
                f"{where}.data has {len(data)} elements but shape {list(shape)} needs {expected}"
            )
        _check_leaves(data, where)
        return data
    level: list[Any] = [data]
    for depth, size in enumerate(shape):
        for item in level:
            if not isinstance(item, list) or len(item) != size:
                found = f"{len(item)} entries" if isinstance(item, list) else "a single value"
                raise V2BadRequestError(
                    f"{where}.data is nested but does not match shape {list(shape)}: "
                    f"dimension {depth} should have {size} entries, found {found}"
                )
        level = [element for item in level for element in item]
    _check_leaves(level, where)
    return level


def _check_leaves(elements: list[Any], where: str) -> None:
    if any(isinstance(element, list | dict) for element in elements):
        raise V2BadRequestError(
            f"{where}.data nests deeper than its shape: elements must be single values"
        )


def _check_element_types(
    elements: list[Any], allowed: set[type], description: str, where: str
) -> None:
    if set(map(type, elements)) <= allowed:
        return
    bad = [i for i, element in enumerate(elements) if type(element) not in allowed]
    shown = ", ".join(f"element {i} is {elements[i]!r}" for i in bad[:_SHOWN_PROBLEMS])
    raise V2BadRequestError(f"{where}.data must hold {description}: {shown}")


def _checked_strings(elements: list[Any], where: str) -> list[str]:
    _check_element_types(elements, {str}, "strings (BYTES in the JSON form)", where)
    return elements


def _checked_ints(elements: list[int], datatype: str, where: str, shape: tuple) -> np.ndarray:
    info = np.iinfo(INT_TYPES[datatype])
    low, high = min(elements), max(elements)
    if low < info.min or high > info.max:
        value = low if low < info.min else high
        raise V2BadRequestError(
            f"{where}.data value {value} does not fit {datatype} ([{info.min}, {info.max}])"
        )
    return np.array(elements, dtype=np.int64 if datatype != "UINT64" else np.uint64).reshape(shape)


def _checked_floats(elements: list[float], datatype: str, where: str, shape: tuple) -> np.ndarray:
    try:
        values = np.array(elements, dtype=np.float64)  # [prod(shape)]
    except OverflowError:  # an integer beyond float64, e.g. 10**400
        raise V2BadRequestError(f"{where}.data holds an integer too large for {datatype}") from None
    finite = np.isfinite(values)
    if not finite.all():
        i = int(np.argmin(finite))
        raise V2BadRequestError(
            f"{where}.data element {i} is {elements[i]!r}: values must be finite numbers"
        )
    limit = float(np.finfo(FLOAT_TYPES[datatype]).max)
    too_large = np.abs(values) > limit
    if too_large.any():
        i = int(np.argmax(too_large))
        raise V2BadRequestError(
            f"{where}.data element {i} is {elements[i]!r}, outside the {datatype} range "
            f"(|x| <= {limit:.6g})"
        )
    return values.reshape(shape)


# ---- encoding -------------------------------------------------------------------------------


def encode_tensor(name: str, datatype: str, values: np.ndarray | Sequence[Any]) -> dict[str, Any]:
    """A response tensor in the JSON form: flat row-major `data` plus its `shape`."""
    if datatype not in DATATYPES:
        raise ValueError(f"unknown V2 datatype {datatype!r}")
    if datatype == "BYTES":
        strings = list(values)
        return {"name": name, "datatype": datatype, "shape": [len(strings)], "data": strings}
    array = np.asarray(values)
    if datatype in FLOAT_TYPES:
        array = array.astype(FLOAT_TYPES[datatype])
    elif datatype in INT_TYPES:
        array = array.astype(INT_TYPES[datatype])
    else:
        array = array.astype(bool)
    # tolist() turns float32 into the Python float of the same value, so clients that parse
    # into FP32 get back exactly the server's numbers.
    return {
        "name": name,
        "datatype": datatype,
        "shape": list(array.shape),
        "data": array.reshape(-1).tolist(),
    }
