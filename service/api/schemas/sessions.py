"""Wire schemas of sessions (`/v1/sessions`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, Field, SkipValidation

from service.api.schemas.common import ScoreName, StrictRequest, VersionField
from service.api.schemas.models import DIGIT_ZERO, Prediction, Usage, prediction_json, usage_json

if TYPE_CHECKING:
    from service.sessions.types import StepOutcome


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


# Bodies of `POST /v1/sessions`.
SESSION_CREATE_EXAMPLES: dict[str, Any] = {
    "digits-lru": {
        "summary": "A digits session that may stop reading early once its set is one label",
        "value": {
            "model": "digits-lru",
            "alpha": 0.1,
            "ttl_seconds": 600,
            "early_decision": {"max_set_size": 1},
        },
    },
    "charlm-selective": {
        "summary": "A language-model session (feed it text; generate from it)",
        "value": {"model": "charlm-selective", "alpha": 0.1},
    },
}


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


# Bodies of `POST /v1/sessions/{session_id}/step`: each goes with a session of the model it is
# named after (created from that `SESSION_CREATE_EXAMPLES` entry).
SESSION_STEP_EXAMPLES: dict[str, Any] = {
    "digits-lru": {
        "summary": "The next 4 rows of a digit (a digits session)",
        "value": {"inputs": DIGIT_ZERO[:4], "return_steps": False},
    },
    "charlm-selective": {
        "summary": "Text for a language-model session (one step per character)",
        "value": {"inputs": "The quick brown "},
    },
}


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

    @staticmethod
    def json_of(outcome: StepOutcome) -> bytes:
        """`of(outcome)` written as JSON directly: the hot route's answer. Building and dumping
        the models costs several times more; `of` stays the reference (the tests compare)."""
        info = outcome.info
        last, steps = outcome.answer
        body = {
            "session_id": info.session_id,
            "model": info.model,
            "version": info.version,
            "backend": info.backend,
            "step": info.step,
            "expires_at": info.expires_at,
            "calibrated": last.calibrated,
            "alpha": last.alpha,
            "score": last.conformal.score if last.conformal is not None else None,
            "prediction": prediction_json(last.predictions[0]),
            "step_predictions": (
                None if steps is None else [prediction_json(p) for p in steps.predictions]
            ),
            "decision": (
                None
                if outcome.decision is None
                else EarlyDecision(**outcome.decision).model_dump(mode="json")
            ),
            "usage": usage_json({**outcome.usage, "sequences": 1}),
            "warnings": list(last.warnings),
        }
        return orjson.dumps(body)

    @classmethod
    def of(cls, outcome: StepOutcome) -> SessionStepResponse:
        """The wire form of a step the session plane answered."""
        info = outcome.info
        last, steps = outcome.answer
        return cls(
            session_id=info.session_id,
            model=info.model,
            version=info.version,
            backend=info.backend,
            step=info.step,
            expires_at=info.expires_at,
            calibrated=last.calibrated,
            alpha=last.alpha,
            score=last.conformal.score if last.conformal is not None else None,
            prediction=Prediction.of(last.predictions[0]),
            step_predictions=(
                None if steps is None else [Prediction.of(p) for p in steps.predictions]
            ),
            usage=Usage(**{**outcome.usage, "sequences": 1}),
            warnings=last.warnings,
            decision=None if outcome.decision is None else EarlyDecision(**outcome.decision),
        )
