"""Open Inference Protocol (KServe V2) tensors: decoding, validation and encoding, in the JSON
form and in the binary tensor data extension.

A V2 JSON tensor is `{"name", "datatype", "shape", "data"}`. `data` holds the elements in
row-major order, either flat (`[1, 2, 3, 4]` for shape [2, 2]) or nested like the shape
(`[[1, 2], [3, 4]]`). Decoding checks, in this order, so the first problem is the one
reported: the datatype is known, the shape is a list of positive integers, the nesting and
element count match the shape, every element has the datatype's JSON type (numbers for
FP*/INT*/UINT*, true/false for BOOL, strings for BYTES), integers fit their type, and
floats are finite and fit their width (`NaN`, which Python's JSON parser accepts, is named).

Binary tensors (Triton's binary tensor data extension, the default of `tritonclient.http`):
the HTTP body is the JSON request followed by raw tensor bytes, the JSON's length in bytes in
the `Inference-Header-Content-Length` header. A binary input has
`parameters.binary_data_size` (its byte count) and no `data`; the tensors' bytes follow one
another in the order of the inputs. Raw bytes are little-endian, row-major, without padding:
a BOOL is one byte (0 or 1), a BYTES element a 4-byte little-endian length and its bytes, a
BF16 the top half of a float32. gRPC's `raw_input_contents` / `raw_output_contents` use the
same layout, so `decode_raw_tensor` and `tensor_bytes` serve both protocols.

Every problem raises `V2BadRequestError` (HTTP 400, body `{"error": "..."}`), the status the
protocol uses for a malformed request.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from service.dataplane.inputs import plain_numbers
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
# BF16 has no JSON form and no numpy type: binary only, widened to float32 on decoding.
DATATYPES = (*NUMERIC_TYPES, "BF16", "BOOL", "BYTES")
# Raw layouts of the binary form: little-endian, the datatype's native width.
RAW_DTYPES: dict[str, np.dtype] = {
    **{
        name: np.dtype(kind).newbyteorder("<")
        for name, kind in {**FLOAT_TYPES, **INT_TYPES}.items()
    },
    "BF16": np.dtype("<u2"),
    "BOOL": np.dtype("u1"),
}
BINARY_HEADER = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"
_BYTES_LENGTH = struct.Struct("<I")  # the 4-byte length before each BYTES element
# JSON floats/integers (bool is a separate Python type, so true/false are not numbers here).
_NUMBER_TYPES = {int, float}
_SHOWN_PROBLEMS = 3


class V2BadRequestError(NeuroserveError):
    """A malformed Open Inference Protocol request: 400 with `{"error": message}`."""

    status_code = 400
    code = "bad_request"


class DecodedTensor(NamedTuple):  # a tuple: one per input per request
    name: str
    datatype: str
    shape: tuple[int, ...]
    # An array of `shape` for numeric and BOOL tensors: float32 for FP32 (and BF16, widened),
    # float64 for FP16 and FP64, int64 (uint64) for integers, bool; a flat list of str for
    # BYTES (JSON strings; bytes that are not text cannot travel in the JSON form).
    values: np.ndarray | list[str]


# ---- decoding -------------------------------------------------------------------------------


class BinaryTail:
    """The raw bytes after a request's JSON header, handed out tensor by tensor in order."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def take(self, size: int, where: str) -> bytes:
        if self.offset + size > len(self.data):
            left = len(self.data) - self.offset
            raise V2BadRequestError(
                f"{where}.parameters.{BINARY_SIZE} is {size} but only {left} bytes of binary "
                "data are left after the JSON header"
            )
        chunk = bytes(self.data[self.offset : self.offset + size])
        self.offset += size
        return chunk

    def check_consumed(self) -> None:
        left = len(self.data) - self.offset
        if left:
            raise V2BadRequestError(
                f"the request has {left} bytes of binary data that no input's "
                f"parameters.{BINARY_SIZE} accounts for ({BINARY_HEADER} may be wrong)"
            )


def split_binary_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes | None]:
    """(JSON header, binary tail) of an HTTP request body; a body without the
    `Inference-Header-Content-Length` header is all JSON (tail None)."""
    if header_length is None:
        return body, None
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 <= length <= len(body):
        raise V2BadRequestError(
            f"header {BINARY_HEADER} is {header_length!r}: it must be the byte length of the "
            f"JSON part, between 0 and the body's {len(body)} bytes"
        )
    return body[:length], body[length:]


def decode_tensor(tensor: Any, where: str, binary: BinaryTail | None = None) -> DecodedTensor:
    """One request tensor (already JSON-parsed) as a checked `DecodedTensor`; a tensor with
    `parameters.binary_data_size` takes its bytes from `binary`, the request's binary tail.

    `where` names the tensor in messages, e.g. "inputs[0]".
    """
    plain = plain_float32_tensor(tensor)
    return plain if plain is not None else decode_tensor_checked(tensor, where, binary)


def plain_float32_tensor(tensor: Any) -> DecodedTensor | None:
    """The usual request tensor decoded at a fraction of the general path's cost: FP32, flat
    JSON numbers (floats or ints, not bools) within float32's range, no parameters. None for
    anything else, which `decode_tensor_checked` then decodes or refuses, naming the problem.
    Where it decodes, it gives what `decode_tensor_checked` gives, bit for bit (measured in a
    server: the general path costs ~10% of a one-digit V2 request)."""
    if type(tensor) is not dict or tensor.get("datatype") != "FP32" or "parameters" in tensor:
        return None
    name, shape, data = tensor.get("name"), tensor.get("shape"), tensor.get("data")
    if type(name) is not str or not name or type(shape) is not list or type(data) is not list:
        return None
    count = 1
    for size in shape:
        if type(size) is not int or size < 1:
            return None
        count *= size
    if not shape or len(data) != count or not plain_numbers(data):
        return None
    # Through float64, as the general path converts: the same float32 for every value.
    values = np.array(data, dtype=np.float64).astype(np.float32).reshape(shape)
    return DecodedTensor(name, "FP32", tuple(shape), values)


def decode_tensor_checked(
    tensor: Any, where: str, binary: BinaryTail | None = None
) -> DecodedTensor:
    """`decode_tensor` by the general path: every datatype and form, every check, and the
    reference for `plain_float32_tensor`."""
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
    size = _binary_size(tensor.get("parameters"), where)
    if size is not None:
        if "data" in tensor:
            raise V2BadRequestError(
                f"{where} has both data and parameters.{BINARY_SIZE}: send one or the other"
            )
        if binary is None:
            raise V2BadRequestError(
                f"{where} has parameters.{BINARY_SIZE} but the request has no binary part: "
                f"send the {BINARY_HEADER} header with the byte length of the JSON part"
            )
        return decode_raw_tensor(name, datatype, shape, binary.take(size, where), where)
    if "data" not in tensor:
        raise V2BadRequestError(
            f"{where} has no data: send it inline as JSON, or as binary data with "
            f"parameters.{BINARY_SIZE}"
        )
    if datatype == "BF16":
        raise V2BadRequestError(f"{where}: BF16 has no JSON form; send it as binary data")
    flat, kinds = flatten_data(tensor["data"], shape, where)
    if datatype == "BYTES":
        _check_element_types(flat, kinds, {str}, "strings (BYTES in the JSON form)", where)
        return DecodedTensor(name, datatype, shape, flat)
    if datatype == "BOOL":
        _check_element_types(flat, kinds, {bool}, "true or false", where)
        return DecodedTensor(name, datatype, shape, np.array(flat, dtype=bool).reshape(shape))
    if datatype in INT_TYPES:
        _check_element_types(flat, kinds, {int}, "integers", where)
        return DecodedTensor(name, datatype, shape, _checked_ints(flat, datatype, where, shape))
    _check_element_types(flat, kinds, _NUMBER_TYPES, "numbers", where)
    return DecodedTensor(name, datatype, shape, _checked_floats(flat, datatype, where, shape))


def _binary_size(parameters: Any, where: str) -> int | None:
    """The tensor's `binary_data_size`, or None for a JSON tensor; other tensor parameters
    (Triton's shared memory) are refused by name."""
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise V2BadRequestError(f"{where}.parameters must be an object")
    unknown = sorted(set(parameters) - {BINARY_SIZE})
    if unknown:
        shared = any(key.startswith("shared_memory") for key in unknown)
        raise V2BadRequestError(
            f"{where}.parameters {unknown} not supported"
            + ("; shared memory is not offered: send the data in the request" if shared else "")
            + f" (an input tensor takes only {BINARY_SIZE})"
        )
    size = parameters.get(BINARY_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise V2BadRequestError(
            f"{where}.parameters.{BINARY_SIZE} must be a non-negative integer, got {size!r}"
        )
    return size


def decode_raw_tensor(
    name: str, datatype: str, shape: Sequence[int], raw: bytes, where: str
) -> DecodedTensor:
    """A tensor from its raw bytes (HTTP binary data or gRPC `raw_input_contents`), checked:
    the byte count fits the shape, floats are finite, BOOLs are 0 or 1, BYTES elements are
    well framed UTF-8 text (prompts are text)."""
    shape = tuple(shape)
    count = math.prod(shape)
    if datatype == "BYTES":
        return DecodedTensor(name, datatype, shape, _raw_strings(raw, count, where))
    if datatype not in RAW_DTYPES:
        raise V2BadRequestError(f"{where}.datatype {datatype!r} is not a V2 datatype")
    dtype = RAW_DTYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise V2BadRequestError(
            f"{where} has {len(raw)} bytes of binary data but shape {list(shape)} of "
            f"{datatype} needs {count * dtype.itemsize}"
        )
    values = np.frombuffer(raw, dtype=dtype)  # [prod(shape)]
    if datatype == "BOOL":
        if (values > 1).any():
            i = int(np.argmax(values > 1))
            raise V2BadRequestError(
                f"{where} BOOL element {i} is the byte {int(values[i])}: BOOL bytes are 0 or 1"
            )
        return DecodedTensor(name, datatype, shape, values.astype(bool).reshape(shape))
    if datatype in INT_TYPES:
        wide = np.uint64 if datatype == "UINT64" else np.int64
        return DecodedTensor(name, datatype, shape, values.astype(wide).reshape(shape))
    if datatype == "BF16":
        values = (values.astype(np.uint32) << 16).view(np.float32)  # bfloat16 = top of float32
    # FP32 (and BF16, widened) as native float32, what the models compute in; the rest float64.
    floats = values.astype(np.float32 if datatype in ("FP32", "BF16") else np.float64)
    finite = np.isfinite(floats)
    if not finite.all():
        i = int(np.argmin(finite))
        raise V2BadRequestError(
            f"{where} element {i} is {floats[i]}: values must be finite numbers"
        )
    return DecodedTensor(name, datatype, shape, floats.reshape(shape))


def _raw_strings(raw: bytes, count: int, where: str) -> list[str]:
    """`count` BYTES elements, each a 4-byte little-endian length and that many bytes."""
    strings, offset = [], 0
    for i in range(count):
        if offset + _BYTES_LENGTH.size > len(raw):
            raise V2BadRequestError(f"{where} binary BYTES data ends after {i} of {count} elements")
        (length,) = _BYTES_LENGTH.unpack_from(raw, offset)
        offset += _BYTES_LENGTH.size
        if offset + length > len(raw):
            raise V2BadRequestError(
                f"{where} binary BYTES element {i} claims {length} bytes; only "
                f"{len(raw) - offset} are left"
            )
        try:
            strings.append(raw[offset : offset + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise V2BadRequestError(f"{where} BYTES element {i} is not UTF-8 text") from None
        offset += length
    if offset != len(raw):
        raise V2BadRequestError(
            f"{where} binary BYTES data has {len(raw) - offset} bytes after its {count} elements"
        )
    return strings


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


_SCALAR_TYPES = {int, float, str, bool, type(None)}  # what JSON elements can be, short of nesting


def flatten_data(data: Any, shape: Sequence[int], where: str) -> tuple[list[Any], set[type]]:
    """The elements of flat or shape-nested `data` in row-major order, checked against
    `shape`, and the set of their types (what the datatype checks read)."""
    if not isinstance(data, list):
        raise V2BadRequestError(f"{where}.data must be a list, got {type(data).__name__}")
    expected = math.prod(shape)
    kinds = set(map(type, data))  # one pass at C speed: flat data of scalars is the usual case
    nested = (
        len(shape) > 1
        and not kinds <= _SCALAR_TYPES
        and any(isinstance(item, list) for item in data)
    )
    if not nested:
        if len(data) != expected:
            raise V2BadRequestError(
                f"{where}.data has {len(data)} elements but shape {list(shape)} needs {expected}"
            )
        if not kinds <= _SCALAR_TYPES:
            _check_leaves(data, where)
        return data, kinds
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
    return level, set(map(type, level))


def _check_leaves(elements: list[Any], where: str) -> None:
    if any(isinstance(element, list | dict) for element in elements):
        raise V2BadRequestError(
            f"{where}.data nests deeper than its shape: elements must be single values"
        )


def _check_element_types(
    elements: list[Any], kinds: set[type], allowed: set[type], description: str, where: str
) -> None:
    """BadRequest naming the first elements whose type is not `allowed` (`kinds`: the types
    of all of them)."""
    if kinds <= allowed:
        return
    bad = [i for i, element in enumerate(elements) if type(element) not in allowed]
    shown = ", ".join(f"element {i} is {elements[i]!r}" for i in bad[:_SHOWN_PROBLEMS])
    raise V2BadRequestError(f"{where}.data must hold {description}: {shown}")


def _checked_ints(elements: list[int], datatype: str, where: str, shape: tuple) -> np.ndarray:
    info = np.iinfo(INT_TYPES[datatype])
    low, high = min(elements), max(elements)
    if low < info.min or high > info.max:
        value = low if low < info.min else high
        raise V2BadRequestError(
            f"{where}.data value {value} does not fit {datatype} ([{info.min}, {info.max}])"
        )
    return np.array(elements, dtype=np.int64 if datatype != "UINT64" else np.uint64).reshape(shape)


_FLOAT_LIMITS = {name: float(np.finfo(dtype).max) for name, dtype in FLOAT_TYPES.items()}


def _checked_floats(elements: list[float], datatype: str, where: str, shape: tuple) -> np.ndarray:
    try:
        values = np.array(elements, dtype=np.float64)  # [prod(shape)]
    except OverflowError:  # an integer beyond float64, e.g. 10**400
        raise V2BadRequestError(f"{where}.data holds an integer too large for {datatype}") from None
    limit = _FLOAT_LIMITS[datatype]
    in_range = np.abs(values) <= limit  # False for NaN too: one pass checks both
    if not in_range.all():
        i = int(np.argmin(in_range))
        if not math.isfinite(values[i]):
            raise V2BadRequestError(
                f"{where}.data element {i} is {elements[i]!r}: values must be finite numbers"
            )
        raise V2BadRequestError(
            f"{where}.data element {i} is {elements[i]!r}, outside the {datatype} range "
            f"(|x| <= {limit:.6g})"
        )
    if datatype == "FP32":  # what the models compute in: converted once, here
        return values.astype(np.float32).reshape(shape)
    return values.reshape(shape)


# ---- encoding -------------------------------------------------------------------------------


class OutputTensor(NamedTuple):  # a tuple: built per output per request
    """A response tensor before it meets a wire: the HTTP JSON form (`encode_tensor`), the
    HTTP binary form and gRPC's `raw_output_contents` (`tensor_bytes`) are built from it."""

    name: str
    datatype: str
    # An array of the datatype; or its values row-major in a list, already of the datatype
    # (str for BYTES, float32-exact floats for FP32: `listed_tensor`).
    values: np.ndarray | list[Any]
    dims: tuple[int, ...] | None = None  # the shape of listed values; None: [len(values)]

    @property
    def shape(self) -> list[int]:
        if isinstance(self.values, list):
            return list(self.dims) if self.dims is not None else [len(self.values)]
        return list(self.values.shape)


_OUTPUT_DTYPES = {**FLOAT_TYPES, **INT_TYPES, "BOOL": np.dtype(bool)}


def output_tensor(name: str, datatype: str, values: np.ndarray | Sequence[Any]) -> OutputTensor:
    """`values` cast to `datatype` (BYTES: a list of str)."""
    if datatype not in DATATYPES or datatype == "BF16":
        raise ValueError(f"unknown output datatype {datatype!r}")
    if datatype == "BYTES":
        return OutputTensor(name, datatype, [str(value) for value in values])
    return OutputTensor(name, datatype, np.asarray(values, dtype=_OUTPUT_DTYPES[datatype]))


_LISTED_AS_THEY_ARE = frozenset(("BYTES", "BOOL", *INT_TYPES))  # FP32 is rounded first


def listed_tensor(
    name: str, datatype: str, values: list[Any], dims: tuple[int, ...] | None = None
) -> OutputTensor:
    """A response tensor of plain values, row-major, for JSON answers without numpy: BYTES
    str, BOOL bool, integer types int (in range), FP32 floats rounded to float32 here."""
    if datatype == "FP32":
        values = float32_list(values)
    elif datatype not in _LISTED_AS_THEY_ARE:
        raise ValueError(f"listed tensors take BYTES, BOOL, integers or FP32, not {datatype!r}")
    if dims is not None and math.prod(dims) != len(values):
        raise ValueError(f"{len(values)} values do not fill shape {list(dims)}")
    return OutputTensor(name, datatype, values, dims)


def float32_list(values: Sequence[float]) -> list[float]:
    """Each value rounded to the nearest float32, as Python floats (what `np.float32(x)` gives,
    at a fraction of numpy's per-call cost on a few values)."""
    layout = _float32_layout(len(values))
    return list(layout.unpack(layout.pack(*values)))


@functools.lru_cache(maxsize=256)
def _float32_layout(count: int) -> struct.Struct:
    """The packed layout of `count` float32s: compiled once per count (a few per model)."""
    return struct.Struct(f"<{count}f")


def encode_tensor(name: str, datatype: str, values: np.ndarray | Sequence[Any]) -> dict[str, Any]:
    """A response tensor in the JSON form: flat row-major `data` plus its `shape`."""
    return json_tensor(output_tensor(name, datatype, values))


def json_tensor(tensor: OutputTensor) -> dict[str, Any]:
    """The JSON form of a response tensor: flat row-major `data` and its `shape`."""
    if isinstance(tensor.values, list):
        data: list[Any] = tensor.values
    else:
        # tolist() turns float32 into the Python float of the same value, so clients that
        # parse into FP32 get back exactly the server's numbers.
        data = tensor.values.reshape(-1).tolist()
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape, "data": data}


def tensor_bytes(tensor: OutputTensor) -> bytes:
    """The raw bytes of a response tensor: the binary tensor data extension's layout, which
    is also gRPC's `raw_output_contents`."""
    if tensor.datatype == "BYTES":
        encoded = [text.encode("utf-8") for text in tensor.values]
        return b"".join(_BYTES_LENGTH.pack(len(item)) + item for item in encoded)
    return np.ascontiguousarray(tensor.values, dtype=RAW_DTYPES[tensor.datatype]).tobytes()


def binary_tensor(tensor: OutputTensor) -> tuple[dict[str, Any], bytes]:
    """The binary form of a response tensor: its JSON entry (no data, the byte count in
    `parameters.binary_data_size`) and the bytes that follow the JSON header."""
    raw = tensor_bytes(tensor)
    entry = {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": tensor.shape,
        "parameters": {BINARY_SIZE: len(raw)},
    }
    return entry, raw
