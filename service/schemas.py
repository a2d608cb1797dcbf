"""Wire schemas of the native REST API (`/v1`) and the V2 health/metadata routes.

Requests reject unknown fields (a misspelt `"alpah"` should fail loudly, not be ignored) and
non-finite floats. The `inputs` of a predict request are checked against the model's own
input spec by the dataplane, which knows whether the model takes feature sequences or
prompt strings; the type given here documents both shapes in the OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SkipValidation


def _version_as_text(value: object) -> object:
    # Versions are directory names ("1", "2", ...); accept the JSON number 1 as well.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


VersionField = Annotated[str | None, BeforeValidator(_version_as_text)]


class StrictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---- errors ---------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable error kind, e.g. `not_found`, `bad_input`.")
    message: str = Field(description="What went wrong, written for the caller.")


class ErrorResponse(BaseModel):
    """Error body of every `/v1` route."""

    error: ErrorDetail


class V2ErrorResponse(BaseModel):
    """Error body of every `/v2` route (Open Inference Protocol)."""

    error: str


# ---- models ---------------------------------------------------------------------------------


class InputSpec(BaseModel):
    """What a model accepts: feature sequences [N, T, F] or token prompts."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["features", "tokens"]
    features: int | None = Field(None, description="F, features per time step (kind=features).")
    dtype: str | None = None
    value_range: list[float] | None = Field(
        None, description="[low, high] the training inputs spanned (informative, not enforced)."
    )
    vocab_size: int | None = Field(None, description="Vocabulary size (kind=tokens).")


class ModelSummary(BaseModel):
    name: str
    task: Literal["classification", "language-model"]
    architecture: str
    latest_version: str
    versions: list[str]


class ModelList(BaseModel):
    models: list[ModelSummary]


class ModelInfo(BaseModel):
    name: str
    version: str = Field(description="The version described here.")
    latest_version: str
    versions: list[str]
    task: Literal["classification", "language-model"]
    architecture: str
    labels: list[str] | None = Field(None, description="Class labels (classification).")
    vocabulary: list[str] | None = Field(None, description="Tokens (language models).")
    input: InputSpec
    metrics: dict[str, Any] = Field(default_factory=dict)
    dataset: Any = None
    provenance: dict[str, Any] = Field(default_factory=dict)


# ---- predict --------------------------------------------------------------------------------


class PredictRequest(StrictRequest):
    """Stateless prediction on whole sequences."""

    # Checked by the dataplane against the model's input spec, which decides between the two.
    inputs: SkipValidation[list[list[list[float]]] | list[str]] = Field(
        description=(
            "Feature models: a batch of sequences, shape [N, T, F] (N sequences of T time "
            "steps of F numbers; all sequences the same length). Language models: a list of "
            "non-empty prompt strings; the prediction is the next token after each prompt."
        ),
        examples=[[[[0.0, 3.0, 12.0, 16.0, 9.0, 0.0, 0.0, 0.0]]], ["the quick brown"]],
    )
    alpha: float = Field(
        0.1, gt=0.0, lt=1.0, description="Miscoverage level of the conformal prediction set."
    )
    backend: str = Field("torch", min_length=1, description="Hardware backend to run on.")
    version: VersionField = Field(None, description="Model version; the latest when null.")
    score: Literal["lac", "aps", "raps"] = Field("aps", description="Conformal score.")


class Prediction(BaseModel):
    id: str = Field(description="Unique id; quote it when sending a label back as feedback.")
    label: str = Field(description="Most probable class (or next token).")
    confidence: float = Field(description="Probability of `label`.")
    probabilities: list[float] = Field(
        description="Softmax probabilities in the order of the model's labels (or vocabulary)."
    )
    entropy: float = Field(description="Entropy of `probabilities` in nats.")
    prediction_set: list[str] | None = Field(
        None, description="Conformal prediction set at level 1 - alpha (calibrated models)."
    )
    set_size: int | None = Field(None, description="Size of `prediction_set`.")
    abstain: bool | None = Field(None, description="True when the set is too wide to decide.")


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")

    sequences: int = Field(description="Sequences run.")
    steps: int = Field(description="Time steps run, summed over sequences.")
    compute_seconds: float = Field(description="Wall time of the model run.")


class PredictResponse(BaseModel):
    model: str
    version: str
    backend: str
    calibrated: bool = Field(description="Whether confidence and sets come from calibration.")
    predictions: list[Prediction]
    usage: Usage


# ---- V2 server metadata and health ----------------------------------------------------------


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool
