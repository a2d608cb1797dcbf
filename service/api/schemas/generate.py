"""Wire schemas of token generation (`WS /v1/generate`, `POST /v1/models/{name}/generate`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field

from service.api.schemas.common import ScoreName, StrictRequest, VersionField

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


# Bodies of `POST /v1/models/{name}/generate` (a language model's name in the path).
GENERATE_EXAMPLES: dict[str, Any] = {
    "sampled": {
        "summary": "32 characters after a prompt, sampled at temperature 0.8 with a fixed seed",
        "value": {"prompt": "The quick brown ", "max_tokens": 32, "temperature": 0.8, "seed": 7},
    },
    "greedy-until-unsure": {
        "summary": "Greedy; stop at a full stop, or abstain once 3+ characters are plausible",
        "value": {
            "prompt": "Once upon a time",
            "max_tokens": 64,
            "temperature": 0,
            "stop": ["."],
            "max_set_size": 3,
        },
    },
}


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
