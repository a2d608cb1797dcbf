"""Wire schemas of the native REST API (`/v1`) and the V2 health/metadata routes.

Requests reject unknown fields (a misspelt `"alpah"` should fail loudly, not be ignored) and
non-finite floats. The `inputs` of a predict request are checked against the model's own
input spec by the dataplane, which knows whether the model takes feature sequences or
prompt strings; the type given here documents both shapes in the OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SkipValidation,
    StrictInt,
    StrictStr,
)

from service.finetuning.job import BuiltinData, FinetuneSpec, InlineData


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


class PositionCalibration(BaseModel):
    model_config = ConfigDict(extra="allow")

    first: int = Field(description="First position (steps read, or tokens of context) covered.")
    last: int = Field(description="Last position covered.")
    n_conformal: int = Field(description="Calibration examples behind the conformal scores.")
    n_tune: int = Field(description="Calibration examples that fitted the map and RAPS.")
    map: dict[str, Any] = Field(description="The calibration map: identity, temperature, ...")
    metrics: dict[str, float] = Field(
        description="NLL, ECE, ... before and after the map, on the conformal examples."
    )


class BackendCalibration(BaseModel):
    model_config = ConfigDict(extra="allow")

    created: str
    calibration_id: str = Field(description="Changes with every fit; online levels restart.")
    horizon: int = Field(
        description="Last calibrated position: answers past it are uncalibrated (no set)."
    )
    positions: list[PositionCalibration] = Field(
        description="One calibration per position bucket (per step for classifiers)."
    )
    backend_options: dict[str, Any] = Field(description="Options the calibration ran with.")
    source: dict[str, Any] = Field(description="Where the calibration data came from.")
    report: dict[str, Any] = Field(
        default_factory=dict, description="What `neuroserve calibrate` measured on test data."
    )


class BackendInfo(BaseModel):
    name: str
    available: bool = Field(description="Whether the backend can run on this server.")
    reason: str | None = Field(None, description="Why it cannot, when it cannot.")
    calibrated: bool = Field(description="Whether this model version has its calibration.")
    calibration: BackendCalibration | None = None
    calibration_error: str | None = Field(None, description="A calibration file that is broken.")


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
    backends: list[BackendInfo] = Field(
        default_factory=list,
        description="Registered backends: does each run here, is this version calibrated on it.",
    )


# ---- predict --------------------------------------------------------------------------------


ScoreName = Literal["lac", "aps", "aps_randomized", "raps", "raps_randomized", "topk"]


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
    backend: str = Field(
        "torch",
        min_length=1,
        description="Hardware backend: torch, onnxruntime, analog_imc, stochastic or a plugin.",
    )
    backend_options: dict[str, Any] | None = Field(
        None,
        description='Options of the backend, e.g. {"t_inference": 3600} for analog_imc.',
        examples=[{"t_inference": 3600}],
    )
    version: VersionField = Field(None, description="Model version; the latest when null.")
    score: ScoreName | None = Field(
        None,
        description=(
            "Conformity score of the set; by default `raps` for classifiers and `lac` for "
            "language models. Randomised variants use one uniform number per prediction, drawn "
            "by the server (never the client) from the prediction id."
        ),
    )
    class_conditional: bool = Field(
        False, description="Per-class (Mondrian) quantiles: coverage holds within every class."
    )
    never_empty: bool | None = Field(
        None,
        description=(
            "Add the top label to an empty set. Default: yes (sets then over-cover a little), "
            "except with `online`; send false for the plain split-conformal set, which covers "
            "1 - alpha exactly and is empty when no label is plausible enough."
        ),
    )
    online: bool = Field(
        False,
        description=(
            "Build the set at the online (ACI) level of this API key, score, alpha and "
            "position, which the key's label feedback keeps adjusting towards 1 - alpha."
        ),
    )
    max_set_size: int | None = Field(
        None,
        ge=0,
        description="Abstain when the set holds more labels; the server's setting when null.",
    )
    seed: int | StrictStr | None = Field(
        None,
        description=(
            "Accepted for compatibility and ignored: the uniform draw of randomised scores is "
            "the server's, so that no client value can steer coverage (a warning says so)."
        ),
    )


class Prediction(BaseModel):
    id: str = Field(description="Unique id; quote it when sending a label back as feedback.")
    label: str = Field(description="Most probable class (or next token).")
    confidence: float = Field(description="Probability of `label`.")
    probabilities: list[float] = Field(
        description="Softmax probabilities in the order of the model's labels (or vocabulary)."
    )
    entropy: float = Field(description="Entropy of `probabilities` in nats.")
    calibrated: bool = Field(
        description=(
            "Probabilities and set come from the calibration of this model, version, backend, "
            "options and position; false: raw softmax and no set (the warnings say why)."
        )
    )
    position: int | None = Field(
        None, description="Steps read (or tokens of context) when this prediction was made."
    )
    prediction_set: list[str] | None = Field(
        None, description="Conformal prediction set at level 1 - alpha (calibrated answers)."
    )
    set_size: int | None = Field(None, description="Size of `prediction_set`.")
    abstain: bool | None = Field(
        None,
        description=(
            "True when the set does not single out one label: empty, or larger than "
            "`max_set_size` (1 by default)."
        ),
    )
    aci_alpha: float | None = Field(
        None, description="Online requests: the ACI level this set was built at."
    )

    @classmethod
    def of(cls, prediction: Any) -> Prediction:
        """The wire form of a `service.dataplane.predictions.ClassPrediction`: every field it
        shares."""
        return cls(**{name: getattr(prediction, name) for name in cls.model_fields})

    epistemic: float | None = Field(
        None,
        description=(
            "Sampling backends: mutual information between label and sample (nats), the "
            "epistemic part of `entropy`."
        ),
    )


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")

    sequences: int = Field(description="Sequences run.")
    steps: int = Field(description="Time steps run, summed over sequences.")
    compute_seconds: float = Field(description="Wall time of the model run.")
    macs: int | None = Field(None, description="Multiply-accumulates executed (dense work).")
    accumulates: int | None = Field(None, description="Accumulates driven by spikes.")
    spikes: int | None = Field(None, description="Spikes emitted.")
    neuron_steps: int | None = Field(None, description="Neuron updates.")
    sparsity: float | None = Field(None, description="spikes / neuron_steps (spiking models).")
    energy_joules: float | None = Field(
        None, description="Estimated energy on this backend (event-driven where it applies)."
    )
    dense_equivalent_energy_joules: float | None = Field(
        None, description="The same work counted as dense multiply-accumulates."
    )


class PredictResponse(BaseModel):
    model: str
    version: str
    backend: str
    calibrated: bool = Field(description="Whether confidence and sets come from calibration.")
    alpha: float | None = Field(
        None,
        description="The requested miscoverage (the target of the online levels when online).",
    )
    score: str | None = Field(None, description="Conformity score of the sets.")
    predictions: list[Prediction]
    usage: Usage
    warnings: list[str] = Field(
        default_factory=list,
        description="Why an answer may not carry its usual guarantee (uncalibrated, options).",
    )


# ---- feedback and calibration status --------------------------------------------------------


class FeedbackRequest(StrictRequest):
    prediction_id: str = Field(min_length=1, description="`id` of an earlier prediction.")
    label: StrictStr | StrictInt = Field(
        description="The true label: a label name (as predictions name them) or its index."
    )


class FeedbackResponse(BaseModel):
    prediction_id: str
    model: str
    version: str
    backend: str
    label: str
    correct: bool = Field(description="The prediction's top label was the true one.")
    covered: bool | None = Field(
        None, description="The served prediction set held the label (null: no set)."
    )
    aci_alpha: float | None = Field(
        None,
        description=(
            "Online predictions: the level it was served at (its key's, or its session's), "
            "after this label."
        ),
    )
    coverage: float | None = Field(
        None, description="Running coverage of this calibration's served sets with feedback."
    )
    feedback_count: int = Field(description="Labels received for this calibration.")


class CalibrationStatus(BaseModel):
    model: str
    version: str
    backend: str
    fit: BackendCalibration = Field(description="The calibration artifact's fit.")
    live: dict[str, Any] | None = Field(
        None,
        description="Feedback so far: coverage, accuracy, and the caller's online (ACI) levels.",
    )


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


# ---- token generation (`WS /v1/generate`, `POST /v1/models/{name}/generate`) ----------------


MAX_SEED = 2**63 - 1


def _seed_from_text(value: object) -> object:
    # Seeds reach 2**63, beyond the 2**53 that JSON numbers carry exactly in most clients.
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return value


SeedField = Annotated[
    Annotated[int, Field(ge=0, le=MAX_SEED)] | None, BeforeValidator(_seed_from_text)
]


def _stop_as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


class GenerateOptions(StrictRequest):
    """How to generate: the body of `POST /v1/models/{name}/generate`."""

    prompt: str = Field(
        min_length=1,
        description="Text fed to the model before generating (continues the session if given).",
    )
    max_tokens: int = Field(ge=1, description="Most tokens to generate.")
    temperature: float = Field(
        1.0,
        ge=0.0,
        description=(
            "Tokens are drawn from the reported (calibrated) distribution raised to 1/T and "
            "renormalised; 0 is greedy."
        ),
    )
    alpha: float | None = Field(
        None, gt=0.0, lt=1.0, description="Miscoverage level of the next-token sets."
    )
    score: ScoreName | None = Field(
        None, description="Conformal score; the session's when omitted."
    )
    session_id: str | None = Field(
        None, min_length=1, description="Continue this session; a new session when omitted."
    )
    stop: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=64)]], BeforeValidator(_stop_as_list)
    ] = Field(
        default_factory=list,
        max_length=8,
        description="Stop once the generated text contains one of these strings (kept in it).",
    )
    max_set_size: int | None = Field(
        None, ge=1, description="Abstain (stop) when the next-token set has more tokens."
    )
    seed: SeedField = Field(
        None,
        description=(
            "Seed of the token sampling (an integer 0..2**63-1, or the same as a decimal "
            "string, as the done message returns it); the server picks one when omitted. It "
            "never touches the conformal sets."
        ),
    )
    version: VersionField = Field(None, description="Model version for a new session.")
    backend: str | None = Field(None, min_length=1, description="Backend for a new session.")


class GenerateMessage(GenerateOptions):
    """The first message on `WS /v1/generate`."""

    model: str = Field(min_length=1, description="A language model's name.")
    api_key: str | None = Field(
        None,
        min_length=1,
        description="The API key, when the connection did not send one in its headers.",
    )


class GeneratedTokenOut(BaseModel):
    type: Literal["token"] = "token"
    index: int = Field(description="Position among the generated tokens, from 0.")
    token: str
    token_id: int = Field(description="Index of `token` in the model's vocabulary.")
    probability: float = Field(
        description="Probability of `token` under the reported next-token distribution."
    )
    sampling_probability: float = Field(
        description="Probability of `token` under the distribution it was drawn from "
        "(the reported one at temperature 1; 1.0 when greedy)."
    )
    top_token: str = Field(description="The most probable next token.")
    top_probability: float = Field(description="Its probability.")
    prediction_set: list[str] | None = Field(None, description="Conformal set of next tokens.")
    set_size: int | None = None
    in_set: bool | None = Field(None, description="Whether `token` is in `prediction_set`.")
    calibrated: bool = Field(
        description="The distribution and set come from the calibration of this context length."
    )
    position: int | None = Field(None, description="Tokens of context the answer was made at.")
    entropy: float = Field(description="Entropy of the next-token distribution, nats.")
    id: str = Field(description="Prediction id, for feedback with the true next token.")


class GenerationDoneOut(BaseModel):
    type: Literal["done"] = "done"
    finish_reason: Literal["length", "stop", "abstain"]
    session_id: str = Field(description="Pass it back to continue from here.")
    model: str
    version: str
    backend: str
    tokens: int = Field(description="Tokens generated.")
    text: str = Field(description="The generated text.")
    step: int = Field(description="The session's total steps (prompts and tokens consumed).")
    seed: str = Field(description="The sampling seed, as a decimal string.")
    calibrated: bool = Field(description="Every token's answer was calibrated.")
    uncalibrated_tokens: int = Field(
        description="Tokens answered past the calibrated context length (no set)."
    )
    warnings: list[str] = Field(default_factory=list)
    usage: dict[str, Any]


class GenerateResponse(BaseModel):
    """The whole generation at once: the streamed messages' content."""

    finish_reason: Literal["length", "stop", "abstain"]
    session_id: str
    model: str
    version: str
    backend: str
    text: str
    tokens: list[GeneratedTokenOut]
    step: int
    seed: str
    calibrated: bool
    uncalibrated_tokens: int
    warnings: list[str] = Field(default_factory=list)
    usage: dict[str, Any]


class GenerationErrorOut(BaseModel):
    type: Literal["error"] = "error"
    code: str
    message: str


# ---- fine-tuning jobs (`/v1/finetune/jobs`) -------------------------------------------------


def _refuse_server_paths(value: object) -> object:
    if isinstance(value, dict) and "path" in value:
        raise ValueError(
            "naming a file on the server (`path`) is not allowed; send the .npz itself as `base64`"
        )
    return value


class NpzUpload(StrictRequest):
    """An `.npz` dataset sent with the job (its format: `models/userdata.py`)."""

    kind: Literal["npz"]
    base64: str = Field(
        min_length=1,
        description="The file's bytes, base64-encoded (NEUROSERVE_MAX_UPLOAD_BYTES decoded).",
    )


JobData = Annotated[
    InlineData | BuiltinData | Annotated[NpzUpload, BeforeValidator(_refuse_server_paths)],
    Field(discriminator="kind"),
]


class FinetuneJobRequest(FinetuneSpec):
    """A fine-tuning job: the fine-tuning spec (`service.finetuning.job.FinetuneSpec`), with an
    `.npz` dataset sent in the body instead of named by path."""

    data: JobData = Field(
        description=(
            "Examples inline, a built-in dataset under a named shift, or an .npz (base64)."
        ),
        examples=[{"kind": "builtin", "name": "digits-seq", "shift": "translated"}],
    )


FinetuneJobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class FinetuneJobProgress(BaseModel):
    stage: str | None = Field(
        None, description="loading, tuning, calibrating, publishing, done or cancelled."
    )
    step: int = Field(description="Optimisation steps done.")
    total_steps: int = Field(description="Steps the job will run at most.")
    loss: float | None = Field(None, description="Training loss at the latest step.")
    validation_accuracy: float | None = Field(
        None, description="Accuracy on the held-out validation split at the latest evaluation."
    )
    best_step: int | None = Field(
        None, description="Step of the best validation so far: the checkpoint to publish."
    )
    eta_seconds: float | None = Field(
        None, description="Estimated seconds until the last step, from the pace so far."
    )


class FinetuneJob(BaseModel):
    """A fine-tuning job: where it stands, and how it ended."""

    job_id: str
    status: FinetuneJobStatus = Field(
        description="queued -> running -> succeeded | failed | cancelled."
    )
    model: str = Field(description="The model being tuned.")
    created_at: str | None = Field(None, description="ISO 8601 time of submission (UTC).")
    started_at: str | None = Field(None, description="When the current (or last) run began.")
    ended_at: str | None = Field(None, description="When the job ended.")
    progress: FinetuneJobProgress | None = None
    result: dict[str, Any] | None = Field(
        None,
        description=(
            "When succeeded: the new version and the metrics before and after tuning "
            "(the fine-tuning module's result, as JSON)."
        ),
    )
    error: str | None = Field(None, description="When failed: what went wrong.")
    cancel_requested: bool = Field(
        False, description="A cancel was asked for; a running job stops at its next step."
    )
    attempts: int = Field(0, description="Runs started (more than one after a retry).")


# ---- sessions (`/v1/sessions`) --------------------------------------------------------------


class EarlyDecisionRequest(StrictRequest):
    """Ask every step at a calibrated checkpoint whether the session may stop reading."""

    max_set_size: int = Field(
        1, ge=1, description="Stop once the set at level alpha / K holds at most this many labels."
    )


class EarlyDecision(BaseModel):
    stop: bool = Field(description="The set is small enough (or this is the last checkpoint).")
    checkpoint: int = Field(description="The time step this decision was taken at.")
    prediction_set: list[str] = Field(description="The set at level alpha / K here.")
    guaranteed_coverage: float = Field(
        description="1 - alpha: the set at the first stop holds the label with this probability."
    )


class SessionCreateRequest(StrictRequest):
    """Start a stateful session: the model's recurrent state is kept between steps."""

    model: str = Field(min_length=1, description="Model name.")
    version: VersionField = Field(None, description="Model version; the latest when null.")
    backend: str = Field("torch", min_length=1, description="Hardware backend to run on.")
    alpha: float = Field(
        0.1, gt=0.0, lt=1.0, description="Miscoverage level of the conformal prediction sets."
    )
    score: ScoreName | None = Field(
        None,
        description="Conformal score of the sets; `raps` for classifiers, `lac` for language "
        "models when null.",
    )
    ttl_seconds: float | None = Field(
        None,
        gt=0.0,
        description="Idle time after which the session expires; the server default when null.",
    )
    options: dict[str, Any] | None = Field(
        None, description='Backend options, e.g. {"t_inference": 3600} for analog_imc.'
    )
    early_decision: EarlyDecisionRequest | None = Field(
        None,
        description=(
            "Sequential early decisions (calibrated classifiers): each step within the "
            "calibrated horizon says whether to stop, with coverage 1 - alpha at the stop."
        ),
    )
    online: bool = Field(
        False,
        description=(
            "Answer at the session's own online (ACI) level: labels of its predictions move "
            "it towards 1 - alpha."
        ),
    )
    never_empty: bool | None = Field(
        None,
        description="Add the top label to an empty set; default yes unless online.",
    )


class SessionResponse(BaseModel):
    session_id: str = Field(description="The handle for steps; keep it secret.")
    model: str
    version: str
    backend: str
    alpha: float
    score: str
    step: int = Field(description="Time steps consumed so far.")
    created_at: float = Field(description="Unix time of creation.")
    expires_at: float = Field(description="Unix time the session expires unless used again.")
    options: dict[str, Any] = Field(default_factory=dict, description="Backend options.")
    early_decision: EarlyDecisionRequest | None = Field(
        None, description="The session's early-decision settings, when it asked for them."
    )
    online: bool = Field(False, description="Answers at the session's own online level.")
    never_empty: bool | None = Field(None, description="As asked at creation.")


class SessionStepRequest(StrictRequest):
    """One chunk of the session's sequence."""

    # Checked against the session's model: features [T, F], or a string / token ids for LMs.
    inputs: SkipValidation[list[list[float]] | str | list[int]] = Field(
        description=(
            "Feature models: T time steps of F numbers, shape [T, F]. Language models: a "
            "string (one token per character) or a list of token ids."
        ),
        examples=[[[0.0, 3.0, 12.0, 16.0, 9.0, 0.0, 0.0, 0.0]], "the quick"],
    )
    return_steps: bool = Field(
        False, description="Also return the prediction after every step of the chunk."
    )


class SessionStepResponse(BaseModel):
    session_id: str
    model: str
    version: str
    backend: str
    step: int = Field(description="The session's total time steps after this chunk.")
    expires_at: float
    calibrated: bool = Field(
        description="Whether every prediction of this step comes from its position's calibration."
    )
    alpha: float | None = Field(None, description="The session's miscoverage level.")
    score: str | None = Field(None, description="Conformity score of the sets.")
    prediction: Prediction = Field(description="The prediction after the chunk's last step.")
    step_predictions: list[Prediction] | None = Field(
        None, description="One prediction per step of the chunk (when return_steps)."
    )
    decision: EarlyDecision | None = Field(
        None,
        description="Early decision at this step (sessions that asked, at calibrated checkpoints).",
    )
    usage: Usage
    warnings: list[str] = Field(
        default_factory=list,
        description="Why an answer may not carry its usual guarantee (uncalibrated, options).",
    )
