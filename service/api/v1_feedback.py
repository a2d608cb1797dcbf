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

from fastapi import APIRouter, Depends, Query, Request

from service.api.auth import get_principal
from service.api.metrics_route import label_request
from service.api.route_helpers import error_doc, get_dataplane
from service.api.schemas.feedback import CalibrationStatus, FeedbackRequest, FeedbackResponse
from service.dataplane.plane import TORCH_BACKEND, DataPlane

router = APIRouter(prefix="/v1", tags=["feedback"])

DataPlaneDependency = Annotated[DataPlane, Depends(get_dataplane)]


@router.post(
    "/feedback",
    response_model=FeedbackResponse,
    responses={
        **error_doc(404, "Unknown prediction id, or older than the feedback window."),
        **error_doc(409, "This prediction already received its label."),
        **error_doc(422, "The label is not one of the model's labels."),
    },
    summary="Send the true label of an earlier prediction",
)
async def feedback(
    body: FeedbackRequest, request: Request, dataplane: DataPlaneDependency
) -> FeedbackResponse:
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
        **error_doc(422, "Unknown backend."),
    },
    summary="Calibration fit and live coverage of a model on a backend",
)
async def calibration_status(
    name: str,
    request: Request,
    dataplane: DataPlaneDependency,
    backend: Annotated[str, Query(min_length=1, description="Backend.")] = TORCH_BACKEND,
    version: Annotated[str | None, Query(description="Version; the latest when omitted.")] = None,
) -> CalibrationStatus:
    owner = get_principal(request).owner
    status = await dataplane.calibration_status(name, version, backend, owner)
    label_request(request, model=status["model"], backend=backend)
    return CalibrationStatus.model_validate(status)
