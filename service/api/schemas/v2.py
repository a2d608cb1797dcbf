"""Wire schemas of the Open Inference Protocol (V2) routes: server metadata, health, models,
inference."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

from service.api.schemas.models import DIGIT_ZERO

# ---- V2 server metadata and health ----------------------------------------------------------


class ServerMetadata(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "neuroserve", "version": "0.1.0", "extensions": []}]
        }
    )

    name: str
    version: str
    extensions: list[str]


class Liveness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"live": True}]})

    live: bool


class Readiness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"ready": True}]})

    ready: bool


# ---- V2 (Open Inference Protocol) model metadata and inference ------------------------------


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="V2 datatype: FP32, INT64, BOOL, BYTES, ...")
    shape: list[int] = Field(description="Dimensions; -1 where any size is accepted.")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ModelReady(BaseModel):
    name: str
    version: str
    ready: bool


class V2RequestTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] = Field(description="Row-major elements, flat or nested like `shape`.")


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: dict[str, Any] | None = Field(
        None, description="Accepted and ignored (outputs are always JSON)."
    )


class V2InferRequest(BaseModel):
    """An Open Inference Protocol request. Unknown keys and parameters are ignored; the
    tensors are checked by `service.api.v2_codec`, which names each problem."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(None, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(
        None,
        description=(
            "`alpha`, `score`, `backend`, `never_empty`; Triton's `sequence_id`, `sequence_start`, "
            "`sequence_end` map onto sessions. Others are ignored."
        ),
    )
    inputs: SkipValidation[list[V2RequestTensor]]
    outputs: list[V2RequestedOutput] | None = Field(
        None, description="The outputs to return; all of them when omitted."
    )


# Bodies of `POST /v2/models/{name}/infer`. An example named like a model goes with that model's
# name in the path (see `service.api.schemas.parameters`).
V2_INFER_EXAMPLES: dict[str, Any] = {
    "digits-lru": {
        "summary": "One handwritten digit: FP32 [1, 8, 8] (8 rows of 8 pixels)",
        "value": {
            "id": "digit-0",
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 8, 8],
                    "datatype": "FP32",
                    "data": [pixel for row in DIGIT_ZERO for pixel in row],
                }
            ],
            "parameters": {"alpha": 0.1},
            "outputs": [{"name": "label"}, {"name": "confidence"}, {"name": "prediction_set"}],
        },
    },
    "charlm-selective": {
        "summary": "The next character after a prompt: BYTES [1]",
        "value": {
            "inputs": [
                {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["The quick brown"]}
            ]
        },
    },
    "sequence": {
        "summary": "The first 4 rows of a digit as the start of a Triton sequence (a session)",
        "value": {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 4, 8],
                    "datatype": "FP32",
                    "data": [pixel for row in DIGIT_ZERO[:4] for pixel in row],
                }
            ],
            "parameters": {"sequence_id": 42, "sequence_start": True, "sequence_end": False},
        },
    },
}


class V2ResponseTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="For sequence requests: `sequence_id` and the session's total steps."
    )
    outputs: list[V2ResponseTensor]
