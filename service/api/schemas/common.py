"""What every wire schema shares: strict requests, model versions, score names, error bodies.

Requests reject unknown fields (a misspelt `"alpah"` should fail loudly, not be ignored) and
non-finite floats.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


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


ScoreName = Literal["lac", "aps", "aps_randomized", "raps", "raps_randomized", "topk"]
