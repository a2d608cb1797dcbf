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
            "examples": [
                {
                    "name": "neuroserve",
                    "version": "0.1.0",
                    "extensions": ["binary_tensor_data", "model_configuration", "statistics"],
                }
            ]
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
    parameters: dict[str, Any] | None = Field(
        None,
        description=(
            "`binary_data_size`: the tensor's bytes follow the JSON part of the body (binary "
            "tensor data extension) instead of `data`."
        ),
    )
    data: list[Any] | None = Field(
        None, description="Row-major elements, flat or nested like `shape` (JSON tensors)."
    )


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: dict[str, Any] | None = Field(
        None,
        description=(
            "`binary_data`: true returns this output as binary data after the JSON part "
            "(default: the request's `binary_data_output`)."
        ),
    )


class V2InferRequest(BaseModel):
    """An Open Inference Protocol request: JSON, or JSON followed by binary tensors (its byte
    length in the `Inference-Header-Content-Length` header). The tensors are checked by
    `service.api.v2_codec` and the parameters by `service.api.v2_parameters`, which name
    each problem."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(None, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(
        None,
        description=(
            "Every option of `/v1/models/{name}/predict` (`alpha`, `score`, `backend`, "
            "`backend_options`, `class_conditional`, `never_empty`, `online`, `max_set_size`, "
            "`seed`), Triton's `sequence_id`, `sequence_start`, `sequence_end` (sessions; "
            "`ttl_seconds` at the start) and `binary_data_output`. Any other is refused (400)."
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
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_size` when the data follows the JSON part as bytes."
    )
    data: list[Any] | None = Field(None, description="Row-major elements (JSON outputs).")


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None,
        description=(
            "Sequence requests: `sequence_id` and `sequence_step` (the sequence's total time "
            "steps); `warnings` when an answer may not carry its usual guarantee."
        ),
    )
    outputs: list[V2ResponseTensor]


# ---- Triton's model configuration, repository and statistics extensions ---------------------


class V2ModelConfig(BaseModel):
    """Triton's model configuration (`inference.ModelConfig` in its JSON form)."""

    model_config = ConfigDict(extra="allow")

    name: str
    platform: str
    backend: str
    max_batch_size: int = Field(description="Most sequences in one request.")
    input: list[dict[str, Any]] = Field(description="dims leave out the batch dimension.")
    output: list[dict[str, Any]]
    sequence_batching: dict[str, Any] | None = Field(
        None, description="Stateful models: sequences keep their state between requests."
    )
    parameters: dict[str, Any] = Field(default_factory=dict)


class V2RepositoryIndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"ready": True}]})

    ready: bool = Field(False, description="Only the model versions that are ready.")


V2_REPOSITORY_INDEX_EXAMPLES: dict[str, Any] = {
    "ready": {"summary": "Only the model versions that load", "value": {"ready": True}},
    "all": {"summary": "Every model version, with why one is unavailable", "value": {}},
}


class V2RepositoryModel(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, or UNAVAILABLE when the version does not load.")
    reason: str = Field("", description="Why it is unavailable.")


class V2InferenceStatistics(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_stats": [
                        {
                            "name": "digits-lru",
                            "version": "1",
                            "last_inference": 1796193238497,
                            "inference_count": 4,
                            "execution_count": 2,
                            "inference_stats": {
                                "success": {"count": 2, "ns": 32551181},
                                "fail": {"count": 0, "ns": 0},
                            },
                            "batch_stats": [],
                            "memory_usage": [],
                        }
                    ]
                }
            ]
        }
    )

    model_stats: list[dict[str, Any]] = Field(
        description=(
            "Per model version: `inference_count` (rows answered), `execution_count` "
            "(requests), `last_inference` (unix ms) and `inference_stats.success` / `fail` "
            "(`count`, `ns`) of V2 inference over HTTP and gRPC since start-up; the finer "
            "phases (queue, compute_*) are not measured and stay 0."
        )
    )
