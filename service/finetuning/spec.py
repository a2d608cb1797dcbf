"""What a fine-tuning job is asked and what it reports: `FinetuneSpec` validates every
hyper-parameter (its pydantic errors name the field: the API's 422); `ProgressEvent` and
`FinetuneResult` are JSON-able pydantic models. `service.finetuning.job` runs the job."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from calibration.scores import SCORE_NAMES
from hardware_backends.analog_imc import AnalogIMCOptions
from hardware_backends.base import parse_options
from models.finetune import canonical_targets
from models.repository import is_safe_name
from models.zo import ZOConfig

MAX_INLINE_EXAMPLES = 10_000
DEFAULT_TARGETS = "all"
# Chip-in-the-loop defaults where they differ from torch's (bench/zo_shift.py measured them):
# the input adapter is digital, so the chip stays programmed and a perturbation pair differs
# only by the perturbation (the crossbar weights would be reprogrammed per call, and the
# norms' loss differences need ε 0.2 to clear the chip's noise floor); 16 numbers take a far
# larger rate than 135,306 do, and travel from s = 1 to s = -1 in a few hundred steps.
CHIP_DEFAULTS = {
    "parameters": "input",
    "lr": 0.05,
    "schedule": "constant",
    "n_perturbations": 2,
    "steps": 1000,
    "eval_every": 100,
}
BACKEND_DEFAULTS: dict[str, dict[str, Any]] = {"torch": {}, "analog_imc": CHIP_DEFAULTS}
MAX_INLINE_VALUES = 2_000_000  # floats in one inline request (about 16 MB of JSON)

# ---- the job's specification -----------------------------------------------------------------

_Strict = ConfigDict(extra="forbid", frozen=True)


class InlineData(BaseModel):
    """Examples in the request: inputs [N, T, F] (finite numbers) and integer labels [N]."""

    model_config = _Strict
    kind: Literal["inline"]
    inputs: list[list[list[pydantic.FiniteFloat]]] = Field(max_length=MAX_INLINE_EXAMPLES)
    labels: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_INLINE_EXAMPLES)

    @pydantic.model_validator(mode="after")
    def _consistent_shapes(self) -> InlineData:
        if not self.inputs:
            raise ValueError("inputs must hold at least one example")
        steps, features = len(self.inputs[0]), len(self.inputs[0][0]) if self.inputs[0] else 0
        if steps < 1 or features < 1:
            raise ValueError("every example needs at least one step of at least one feature")
        for i, sequence in enumerate(self.inputs):
            if len(sequence) != steps or any(len(row) != features for row in sequence):
                raise ValueError(f"inputs[{i}] is not [{steps}, {features}] like inputs[0]")
        if len(self.inputs) * steps * features > MAX_INLINE_VALUES:
            raise ValueError(f"inputs hold more than {MAX_INLINE_VALUES} numbers; upload a .npz")
        if len(self.labels) != len(self.inputs):
            raise ValueError(f"{len(self.labels)} labels for {len(self.inputs)} input sequences")
        return self


class BuiltinData(BaseModel):
    """A shipped dataset, optionally under one of its named shifts."""

    model_config = _Strict
    kind: Literal["builtin"]
    name: Literal["digits-seq"] = "digits-seq"
    variant: Literal["rows", "pixels"] = "rows"
    shift: Literal["gaussian_noise", "inverted", "translated"] | None = None
    shift_seed: int = Field(0, ge=0, le=2**31 - 1)


class NpzData(BaseModel):
    """An uploaded `.npz` file (see `models.userdata` for its format)."""

    model_config = _Strict
    kind: Literal["npz"]
    path: str = Field(min_length=5, pattern=r"\.npz$")


def _eps(value: Any) -> float | str:
    """ "auto" or a finite number in [1e-7, 1] (one error, located at `eps`)."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"eps must be 'auto' or a number in [1e-7, 1], got {value!r}")
    if not 1e-7 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"eps must be 'auto' or a number in [1e-7, 1], got {value}")
    return float(value)


Eps = Annotated[
    float | Literal["auto"],
    pydantic.PlainValidator(_eps),
    pydantic.WithJsonSchema(
        {"anyOf": [{"type": "number", "minimum": 1e-7, "maximum": 1.0}, {"const": "auto"}]}
    ),
]

DataSpec = Annotated[InlineData | BuiltinData | NpzData, Field(discriminator="kind")]


class FinetuneSpec(BaseModel):
    """Everything a fine-tuning job needs; unknown keys and out-of-range values are refused."""

    model_config = _Strict
    model: str = Field(description="The model to tune.")
    version: str | None = Field(None, pattern=r"^[1-9][0-9]*$", description="Default: latest.")
    output_name: str | None = Field(None, description="Publish under this name (default: model).")
    data: DataSpec
    backend: Literal["torch", "analog_imc"] = "torch"
    backend_options: dict[str, Any] = Field(default_factory=dict)
    optimizer: Literal["mezo", "zo_sign", "zo_adam"] = "mezo"
    parameters: str = Field(
        DEFAULT_TARGETS,
        description="What to tune: targets joined by '+' from input (per-feature scale and bias "
        "in front of the encoder), norm, readout, lora<rank> (low-rank adapters on the "
        "recurrent and mixing matrices) and all (every parameter). On analog_imc the default "
        "is input, with lr 0.05 (constant), 2 perturbations, 1000 steps, eval_every 100.",
    )
    objective: Literal["cross_entropy", "zero_one"] = "cross_entropy"
    direction: Literal["gaussian", "rademacher"] = "gaussian"
    steps: int = Field(5000, ge=1, le=200_000)
    batch_size: int = Field(64, ge=1, le=4096)
    lr: float = Field(5e-4, gt=0.0, le=1.0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    min_lr_fraction: float = Field(0.0, ge=0.0, le=1.0)
    eps: Eps = Field(
        "auto",
        description="Perturbation size ε, or 'auto': measure the noise floor of the loss "
        "difference and take the smallest of 0.001, 0.002, 0.005, ..., 0.2 whose signal clears "
        "it four times (0.001 on torch, whose loss is deterministic).",
    )
    n_perturbations: int = Field(1, ge=1, le=64)
    common_noise: bool = Field(
        True,
        description="analog_imc: the two loss readings of a perturbation pair replay the same "
        "output-noise draws (common random numbers, which the simulator can do); false reads "
        "fresh noise every time, as a physical chip would. The ε probe measures the same way.",
    )
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_eps: float = Field(1e-8, gt=0.0, le=1.0)
    eval_every: int = Field(250, ge=1, le=200_000)
    patience: int | None = Field(None, ge=1, le=10_000)
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    calibration_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    alpha: float = Field(0.1, gt=0.0, lt=1.0)
    score: Literal[SCORE_NAMES] = "aps"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    promote: bool = Field(
        True,
        description="Ask to make the new version `latest`; it moves only when the held-out "
        "accuracy improved beyond its noise and the version is calibrated on every backend "
        "its base was (the result's `promotion` says what happened and why).",
    )
    promotion_z: float = Field(
        1.645,
        ge=0.0,
        le=10.0,
        description="How many standard errors of the held-out accuracy difference the "
        "improvement must exceed (1.645: one-sided 95%).",
    )

    @pydantic.model_validator(mode="before")
    @classmethod
    def _backend_defaults(cls, data: Any) -> Any:
        """Fields left out take their backend's defaults (`BACKEND_DEFAULTS`)."""
        backend = data.get("backend", "torch") if isinstance(data, dict) else None
        if isinstance(backend, str):  # anything else is the field validator's to refuse
            return {**BACKEND_DEFAULTS.get(backend, {}), **data}
        return data

    @pydantic.field_validator("parameters")
    @classmethod
    def _targets(cls, expression: str) -> str:
        return canonical_targets(expression)  # ValueError says which terms exist

    @pydantic.field_validator("model", "output_name")
    @classmethod
    def _safe_name(cls, name: str | None) -> str | None:
        if name is not None and not is_safe_name(name):
            raise ValueError("use 1-128 letters, digits, '.', '_' or '-' (no slashes or '..')")
        return name

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> FinetuneSpec:
        held_out = self.validation_fraction + self.calibration_fraction + self.test_fraction
        if held_out >= 0.9:
            raise ValueError(
                f"validation_fraction + calibration_fraction + test_fraction is {held_out:.3g}; "
                "keep it below 0.9 so that some data is left to tune on"
            )
        if self.backend == "torch" and self.backend_options:
            raise ValueError("backend 'torch' takes no backend_options (tuning runs on the CPU)")
        if self.backend == "analog_imc":
            parse_options(self.backend, AnalogIMCOptions, self.backend_options)
        return self

    @property
    def target_name(self) -> str:
        return self.output_name or self.model

    def zo_config(self, eps: float | None = None) -> ZOConfig:
        """The optimiser's settings; `eps` resolves an "auto" ε (the job measures it)."""
        if eps is None and self.eps == "auto":
            raise ValueError("eps is 'auto': pass the measured value")
        return ZOConfig(
            optimizer=self.optimizer,
            eps=self.eps if eps is None else eps,
            n_perturbations=self.n_perturbations,
            direction=self.direction,
            beta1=self.beta1,
            beta2=self.beta2,
            adam_eps=self.adam_eps,
        )

    def summary(self) -> dict[str, Any]:
        """The spec as JSON, inline examples replaced by their count (they can be megabytes)."""
        summary = self.model_dump(mode="json")
        if isinstance(self.data, InlineData):
            summary["data"] = {"kind": "inline", "examples": len(self.data.labels)}
        return summary


# ---- what the job reports --------------------------------------------------------------------

Stage = Literal["loading", "tuning", "calibrating", "publishing", "done", "cancelled"]
StopReason = Literal["steps", "patience", "diverged", "cancelled"]


class ProgressEvent(BaseModel):
    stage: Stage
    step: int = 0  # ZO steps done
    total_steps: int = 0
    train_loss: float | None = None  # mean of the last step's perturbed losses
    validation_accuracy: float | None = None  # at the latest evaluation
    best_step: int | None = None
    message: str = ""


class HeldOutMetrics(BaseModel):
    """A model with its calibration on the test split."""

    accuracy: float  # of the model's own argmax
    calibrated_accuracy: float  # of the calibrated argmax (vector scaling can move it)
    ece: float  # of the calibrated probabilities, 15 equal-width bins
    nll: float
    coverage: float  # fraction of test labels inside the conformal set
    mean_set_size: float
    n: int


class EvaluationPoint(BaseModel):
    step: int
    validation_accuracy: float
    validation_loss: float  # cross-entropy


class PromotionDecision(BaseModel):
    """Whether a job's version became `latest`, and why (`service.finetuning.promotion`)."""

    requested: bool  # the spec's `promote`
    promoted: bool
    reason: str
    latest: str | None = None  # the model's latest version after the job
    accuracy_before: float | None = None  # base, on the test split
    accuracy_after: float | None = None  # the new version, on the same examples
    improvement: float | None = None  # after - before
    standard_error: float | None = None  # of the paired difference (split-to-split noise)
    margin: float | None = None  # z * standard_error: the improvement must exceed it
    z: float
    n: int = 0  # test examples
    backends_required: list[str] = []  # the base version's calibrated backends
    backends_calibrated: list[str] = []  # the new version's
    calibration_errors: dict[str, str] = {}  # backend -> why it could not be calibrated


class FinetuneResult(BaseModel):
    """What a job did; JSON-able with `model_dump(mode="json")`."""

    model_config = ConfigDict(validate_assignment=True)
    status: Literal["completed", "cancelled"]
    model: str  # the published name
    version: str | None  # None when nothing was published
    base_model: str
    base_version: str
    backend: str
    steps_run: int
    best_step: int | None
    stop_reason: StopReason
    history: list[EvaluationPoint]
    before: HeldOutMetrics | None = None  # base model, base calibration refitted
    after: HeldOutMetrics | None = None  # the published checkpoint and its calibration
    alpha: float
    score: str
    split_sizes: dict[str, int]
    data_sha256: str
    tuned_parameters: int
    eps: float | None = None  # the perturbation size used (measured when the spec said auto)
    # The noise floor of one loss-difference estimate at that ε: the RMS disagreement of two
    # measurements of the same L+ - L- (same weights, other noise draws) / sqrt(2); 0 on torch.
    noise_floor: float | None = None
    eps_signal: float | None = None  # median |L+ - L-| at that ε, on the first tune batch
    # Standard deviation of one loss reading repeated at the same (base) weights with fresh
    # noise each time (the chip's output noise); 0 on torch. Measured with eps "auto".
    loss_noise: float | None = None
    trajectory_bytes: int | None = None
    wall_seconds: float = 0.0
    seed: int
    promotion: PromotionDecision | None = None  # None when nothing was published
