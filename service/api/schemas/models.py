"""Wire schemas of the model routes (`/v1/models...`): listings, model info, predictions.

The `inputs` of a predict request are checked against the model's own input spec by the
dataplane, which knows whether the model takes feature sequences or prompt strings; the type
given here documents both shapes in the OpenAPI schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, SkipValidation, StrictStr

from service.api.schemas.common import ScoreName, StrictRequest, VersionField

# A handwritten zero from scikit-learn's digits (its first image), as the built-in digits models
# read it: 8 time steps (rows) of 8 features (pixel intensities 0..16).
DIGIT_ZERO: list[list[float]] = [
    [0, 0, 5, 13, 9, 1, 0, 0],
    [0, 0, 13, 15, 10, 15, 5, 0],
    [0, 3, 15, 2, 0, 11, 8, 0],
    [0, 4, 12, 0, 0, 8, 8, 0],
    [0, 5, 8, 0, 0, 9, 8, 0],
    [0, 4, 11, 0, 1, 12, 7, 0],
    [0, 2, 14, 5, 10, 12, 0, 0],
    [0, 0, 6, 13, 10, 0, 0, 0],
]

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
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "models": [
                        {
                            "name": "digits-lru",
                            "task": "classification",
                            "architecture": "lru",
                            "latest_version": "1",
                            "versions": ["1"],
                        }
                    ]
                }
            ]
        }
    )

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
    defaults: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "What the backend does where the options leave it open, e.g. analog_imc's "
            '{"weight_mapping": "rescaled"}.'
        ),
    )


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
    origin: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            'Where this version came from: {"kind": "built-in" | "trained" | "fine-tuned", '
            '"command"}, or {"kind": "imported", "format": "nir" | "onnx", "file", "sha256", '
            "...} for `neuroserve import` (sha256 of the source file)."
        ),
    )
    backends: list[BackendInfo] = Field(
        default_factory=list,
        description="Registered backends: does each run here, is this version calibrated on it.",
    )


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


# Bodies of `POST /v1/models/{name}/predict`. An example named like a model goes with that
# model's name in the path (see `service.api.schemas.parameters`).
PREDICT_EXAMPLES: dict[str, Any] = {
    "digits-lru": {
        "summary": "One handwritten digit (8 rows of 8 pixels), 90% prediction set",
        "value": {"inputs": [DIGIT_ZERO], "alpha": 0.1},
    },
    "charlm-selective": {
        "summary": "The next character after each of two prompts (language model)",
        "value": {"inputs": ["The quick brown fox", "Hello wor"], "alpha": 0.1},
    },
    "analog": {
        "summary": "The same digit on the simulated analog crossbar, plain split-conformal set",
        "value": {"inputs": [DIGIT_ZERO], "backend": "analog_imc", "never_empty": False},
    },
}


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
            "Sampling backends: the part of `entropy` (nats) that the samples' disagreement "
            "accounts for: `entropy` minus the mean entropy of the samples, each sample "
            "through the same calibration map as the answer; 0 <= epistemic <= entropy. "
            "With an identity map (or uncalibrated) it is the mutual information between "
            "label and sample."
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
    weight_mapping: Literal["rescaled", "raw"] | None = Field(
        None,
        description=(
            "analog_imc: the units the crossbar tiles computed in. 'rescaled' (the default): "
            "each tile's weights normalised to max |w| = 1, the scale applied digitally "
            "(aihwkit weight_scaling_omega = 1); 'raw': the weights' own units (aihwkit's "
            "default, omega = 0), where output noise and the ADC weigh more."
        ),
    )

    routed_macs: int | None = Field(
        None,
        description="The part of `macs` run in routers and the experts they chose "
        "(models with routed experts; 0 otherwise).",
    )
    skipped_macs: int | None = Field(
        None, description="MACs of the experts not chosen: not run and not in `macs`."
    )
    active_fraction: float | None = Field(
        None,
        description="macs / (macs + skipped_macs): the fraction of the model's work with "
        "every expert that ran (models with routed experts; null otherwise).",
    )


_PREDICTION_FIELDS = tuple(Prediction.model_fields)
_USAGE_FIELDS = tuple(Usage.model_fields)


def prediction_json(prediction: Any) -> dict[str, Any]:
    """`Prediction.of(prediction).model_dump()` without building the model: for answers
    written straight to JSON on hot routes (their values are already plain Python)."""
    return {name: getattr(prediction, name) for name in _PREDICTION_FIELDS}


def usage_json(usage: Mapping[str, Any]) -> dict[str, Any]:
    """`Usage(**usage).model_dump()` without the model: every declared field (null unless
    reported), then the extras the runner reported."""
    return {**dict.fromkeys(_USAGE_FIELDS), **usage}


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

    @classmethod
    def of(cls, batch: Any, warnings: list[str]) -> PredictResponse:
        """The wire form of a `service.dataplane.predictions.PredictionBatch`."""
        return cls(
            model=batch.model,
            version=batch.version,
            backend=batch.backend,
            calibrated=batch.calibrated,
            alpha=batch.alpha,
            score=batch.conformal.score if batch.conformal is not None else None,
            predictions=[Prediction.of(p) for p in batch.predictions],
            usage=Usage(**batch.usage),
            warnings=warnings,
        )

    @staticmethod
    def json_of(batch: Any, warnings: list[str]) -> bytes:
        """`of(batch, warnings)` written as JSON directly (the hot route's answer); `of` stays
        the reference, and the tests compare."""
        body = {
            "model": batch.model,
            "version": batch.version,
            "backend": batch.backend,
            "calibrated": batch.calibrated,
            "alpha": batch.alpha,
            "score": batch.conformal.score if batch.conformal is not None else None,
            "predictions": [prediction_json(p) for p in batch.predictions],
            "usage": usage_json(batch.usage),
            "warnings": list(warnings),
        }
        return orjson.dumps(body)
