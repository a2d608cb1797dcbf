"""gRPC tensors and parameters of the Open Inference Protocol, as the JSON forms the rest of
the V2 code reads and writes (`service.api.v2_codec`), so one decoder checks every request.

A request input carries its elements either in `contents` (typed repeated fields:
`fp32_contents`, `int_contents`, `bytes_contents`, ...) or, for every input at once, in
`raw_input_contents` (one little-endian byte string per input; BYTES elements each behind a
4-byte little-endian length; FP16 only travels raw). `tritonclient.grpc` sends raw by
default. Responses always carry raw outputs (`raw_output_contents`), as Triton does.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from service.api.v2_codec import FLOAT_TYPES, INT_TYPES, V2BadRequestError

# The typed field that carries each datatype in `InferTensorContents`.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# Little-endian element types of the raw form (BYTES is length-prefixed instead).
RAW_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(kind).newbyteorder("<")
    for name, kind in {**FLOAT_TYPES, **INT_TYPES, "BOOL": np.bool_}.items()
}
_LENGTH = struct.Struct("<I")


# ---- parameters -----------------------------------------------------------------------------


def parameters_dict(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A proto parameter map as the plain values the JSON form would carry."""
    values: dict[str, Any] = {}
    for key, parameter in parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        if which is None:
            raise V2BadRequestError(f"parameters.{key} has no value")
        values[key] = getattr(parameter, which)
    return values


def parameter(value: Any) -> pb.InferParameter:
    """A plain value (bool, int, float or str) as a proto parameter."""
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


# ---- request inputs -------------------------------------------------------------------------


def json_inputs(request: pb.ModelInferRequest) -> list[dict[str, Any]]:
    """Every input of `request` in the JSON form, for the decoder and checks of that form
    (`v2_infer.decoded_input`)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise V2BadRequestError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input (or typed contents for every input)"
        )
    tensors = []
    for i, tensor in enumerate(request.inputs):
        where = f"inputs[{i}] ({tensor.name!r})"
        shape = [int(size) for size in tensor.shape]
        data = (
            _raw_elements(raw[i], tensor.datatype, shape, where)
            if raw
            else _typed_elements(tensor, where)
        )
        tensors.append(
            {"name": tensor.name, "datatype": tensor.datatype, "shape": shape, "data": data}
        )
    return tensors


def _typed_elements(tensor: pb.ModelInferRequest.InferInputTensor, where: str) -> list[Any]:
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        if tensor.datatype in RAW_DTYPES:  # FP16: no typed field exists for it
            raise V2BadRequestError(f"{where}: {tensor.datatype} travels in raw_input_contents")
        return []  # an unknown datatype: decode_tensor names it
    elements = list(getattr(tensor.contents, field))
    if tensor.datatype == "BYTES":
        return [_text(element, where) for element in elements]
    return elements


def _raw_elements(raw: bytes, datatype: str, shape: Sequence[int], where: str) -> list[Any]:
    if datatype == "BYTES":
        return [_text(element, where) for element in _length_prefixed(raw, where)]
    dtype = RAW_DTYPES.get(datatype)
    if dtype is None:
        return []  # an unknown datatype: decode_tensor names it
    expected = math.prod(shape) * dtype.itemsize if all(size > 0 for size in shape) else None
    if expected is not None and len(raw) != expected:
        raise V2BadRequestError(
            f"{where}: raw contents hold {len(raw)} bytes; shape {list(shape)} of {datatype} "
            f"needs {expected}"
        )
    if len(raw) % dtype.itemsize:
        raise V2BadRequestError(
            f"{where}: raw contents hold {len(raw)} bytes, not a whole number of {datatype}"
        )
    return np.frombuffer(raw, dtype=dtype).tolist()


def _length_prefixed(raw: bytes, where: str) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise V2BadRequestError(f"{where}: raw BYTES contents end inside a length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise V2BadRequestError(
                f"{where}: raw BYTES element {len(elements)} claims {length} bytes; "
                f"{len(raw) - offset} are left"
            )
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def _text(element: bytes, where: str) -> str:
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError:
        raise V2BadRequestError(f"{where}: BYTES elements must be UTF-8 text") from None


# ---- response outputs -----------------------------------------------------------------------


def raw_outputs(
    tensors: Sequence[Mapping[str, Any]],
) -> tuple[list[pb.ModelInferResponse.InferOutputTensor], list[bytes]]:
    """JSON-form output tensors (`v2_codec.encode_tensor`) as output metadata and raw bytes."""
    outputs, raw = [], []
    for tensor in tensors:
        datatype = tensor["datatype"]
        outputs.append(
            pb.ModelInferResponse.InferOutputTensor(
                name=tensor["name"], datatype=datatype, shape=tensor["shape"]
            )
        )
        raw.append(raw_bytes(datatype, tensor["data"]))
    return outputs, raw


def raw_bytes(datatype: str, flat: Sequence[Any]) -> bytes:
    """Flat row-major elements in the raw form."""
    if datatype == "BYTES":
        encoded = [e.encode("utf-8") if isinstance(e, str) else e for e in flat]
        return b"".join(_LENGTH.pack(len(element)) + element for element in encoded)
    return np.asarray(flat, dtype=RAW_DTYPES[datatype]).tobytes()
