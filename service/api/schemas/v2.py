"""Wire schemas of the Open Inference Protocol (V2) routes: server metadata, health, models,
inference."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

# ---- V2 server metadata and health ----------------------------------------------------------


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
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
