"""gRPC tensors and parameters of the Open Inference Protocol, decoded and encoded by the same
code as HTTP's (`service.api.v2_codec`), so one decoder checks every request.

A request input carries its elements either in `contents` (typed repeated fields:
`fp32_contents`, `int_contents`, `bytes_contents`, ...) or, for every input at once, in
`raw_input_contents` (one byte string per input, laid out as HTTP's binary tensor data:
little-endian, BYTES elements each behind a 4-byte length; FP16 and BF16 only travel raw).
`tritonclient.grpc` sends raw by default. Responses always carry raw outputs
(`raw_output_contents`), as Triton does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from service.api.v2_codec import (
    BINARY_SIZE,
    BinaryTail,
    DecodedTensor,
    OutputTensor,
    V2BadRequestError,
    decode_tensor,
    tensor_bytes,
)

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


def decoded_inputs(request: pb.ModelInferRequest) -> list[DecodedTensor]:
    """Every input of `request`, checked as HTTP checks a JSON tensor (typed contents) or a
    binary one (raw contents)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise V2BadRequestError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input (or typed contents for every input)"
        )
    if not request.inputs:
        raise V2BadRequestError("inputs must be a non-empty list of tensors")
    decoded = []
    for i, tensor in enumerate(request.inputs):
        json_form: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": [int(size) for size in tensor.shape],
        }
        if raw:
            json_form["parameters"] = {BINARY_SIZE: len(raw[i])}
            decoded.append(decode_tensor(json_form, f"inputs[{i}]", BinaryTail(raw[i])))
        else:
            json_form["data"] = _typed_elements(tensor, f"inputs[{i}] ({tensor.name!r})")
            decoded.append(decode_tensor(json_form, f"inputs[{i}]"))
    return decoded


def _typed_elements(tensor: pb.ModelInferRequest.InferInputTensor, where: str) -> list[Any]:
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        if tensor.datatype in ("FP16", "BF16"):  # no typed field exists for them
            raise V2BadRequestError(f"{where}: {tensor.datatype} travels in raw_input_contents")
        return []  # an unknown datatype: decode_tensor names it
    elements = list(getattr(tensor.contents, field))
    if tensor.datatype == "BYTES":
        return [_text(element, where) for element in elements]
    return elements


def _text(element: bytes, where: str) -> str:
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError:
        raise V2BadRequestError(f"{where}: BYTES elements must be UTF-8 text") from None


# ---- response outputs -----------------------------------------------------------------------


def raw_outputs(
    tensors: Sequence[OutputTensor],
) -> tuple[list[pb.ModelInferResponse.InferOutputTensor], list[bytes]]:
    """Output tensors as output metadata and raw bytes (HTTP's binary layout)."""
    outputs = [
        pb.ModelInferResponse.InferOutputTensor(
            name=tensor.name, datatype=tensor.datatype, shape=tensor.shape
        )
        for tensor in tensors
    ]
    return outputs, [tensor_bytes(tensor) for tensor in tensors]
