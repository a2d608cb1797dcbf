"""Native REST routes for late labels and calibration monitoring.

- `POST /v1/feedback` matches a label to an earlier prediction: running coverage and
  reliability counters and the online (ACI) level move (see `service.dataplane.feedback`).
- `GET /v1/models/{name}/calibration?backend=&version=` shows a backend's calibration fit
  (NLL, ECE, ... before and after the map) beside the live, feedback-driven coverage and ACI
  level.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request

from service.api.auth import get_principal
from service.api.metrics_route import label_request
from service.api.route_helpers import ACCESS_ERRORS, TOO_LARGE, error_doc, get_dataplane
from service.api.schemas.feedback import (
    FEEDBACK_EXAMPLES,
    CalibrationStatus,
    FeedbackRequest,
    FeedbackResponse,
)
from service.api.schemas.parameters import BackendQuery, ClassifierName, VersionQuery
from service.dataplane.plane import TORCH_BACKEND, DataPlane

router = APIRouter(prefix="/v1", tags=["feedback"], responses=ACCESS_ERRORS)

DataPlaneDependency = Annotated[DataPlane, Depends(get_dataplane)]
_STORE_UNAVAILABLE = error_doc(
    503, "The state store (feedback and live counters) cannot be reached."
)


@router.post(
    "/feedback",
    response_model=FeedbackResponse,
    responses={
        **error_doc(404, "Unknown prediction id, or older than the feedback window."),
        **error_doc(409, "This prediction already received its label."),
        **TOO_LARGE,
        **error_doc(422, "Malformed body, or the label is not one of the model's labels."),
        **_STORE_UNAVAILABLE,
    },
    summary="Send the true label of an earlier prediction",
)
async def feedback(
    body: Annotated[FeedbackRequest, Body(openapi_examples=FEEDBACK_EXAMPLES)],
    request: Request,
    dataplane: DataPlaneDependency,
) -> FeedbackResponse:
    """Match a label that arrived later to a prediction: running coverage, reliability
    counters and the online (ACI) level move."""
    owner = get_principal(request).owner  # predictions belong to the key that asked
    result = await dataplane.submit_feedback(body.prediction_id, body.label, owner)
    label_request(request, model=result.model, backend=result.backend)
    return FeedbackResponse(**asdict(result))


@router.get(
    "/models/{name}/calibration",
    response_model=CalibrationStatus,
    responses={
        **error_doc(404, "Unknown model or version."),
        **error_doc(409, "The model is not calibrated on this backend."),
        **error_doc(422, "Unknown or empty backend."),
        **_STORE_UNAVAILABLE,
    },
    summary="Calibration fit and live coverage of a model on a backend",
)
async def calibration_status(
    name: ClassifierName,
    request: Request,
    dataplane: DataPlaneDependency,
    backend: BackendQuery = TORCH_BACKEND,
    version: VersionQuery = None,
) -> CalibrationStatus:
    """The calibration artifact's fit (NLL, ECE, ... before and after the map) beside the
    coverage that label feedback has measured since, and the caller's online levels."""
    owner = get_principal(request).owner
    status = await dataplane.calibration_status(name, version, backend, owner)
    label_request(request, model=status["model"], backend=backend)
    return CalibrationStatus.model_validate(status)
