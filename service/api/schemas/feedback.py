"""Wire schemas of label feedback (`POST /v1/feedback`) and of calibration status."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, StrictInt, StrictStr

from service.api.schemas.common import StrictRequest
from service.api.schemas.models import BackendCalibration


class FeedbackRequest(StrictRequest):
    prediction_id: str = Field(min_length=1, description="`id` of an earlier prediction.")
    label: StrictStr | StrictInt = Field(
        description="The true label: a label name (as predictions name them) or its index."
    )


# Bodies of `POST /v1/feedback`: `prediction_id` is the `id` of a prediction this server made
# (each prediction of predict, a session step, V2 infer or generation has one).
FEEDBACK_EXAMPLES: dict[str, Any] = {
    "by-name": {
        "summary": "The true label of a digits prediction, by name",
        "value": {"prediction_id": "<the id of an earlier prediction>", "label": "0"},
    },
    "by-index": {
        "summary": "The same, by the label's index in the model's labels",
        "value": {"prediction_id": "<the id of an earlier prediction>", "label": 0},
    },
}


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
