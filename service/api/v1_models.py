"""Native REST routes for models: list, describe, predict (`/v1/models...`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response

from models.imported import model_origin
from models.repository import ModelCard
from service.api.auth import get_principal
from service.api.metrics_route import label_request
from service.api.route_helpers import (
    ACCESS_ERRORS,
    TOO_LARGE,
    error_doc,
    get_dataplane,
)
from service.api.schemas.models import (
    PREDICT_EXAMPLES,
    BackendInfo,
    InputSpec,
    ModelInfo,
    ModelList,
    ModelSummary,
    PredictRequest,
    PredictResponse,
)
from service.api.schemas.parameters import ModelName, VersionQuery
from service.dataplane.plane import DataPlane
from service.dataplane.predictions import (
    IGNORED_SEED_WARNING,
    ConformalOptions,
)

router = APIRouter(prefix="/v1", tags=["models"], responses=ACCESS_ERRORS)

DataPlaneDependency = Annotated[DataPlane, Depends(get_dataplane)]
_NOT_FOUND = error_doc(404, "Unknown model or version.")
_BAD_INPUT: dict[int | str, dict[str, Any]] = {
    **TOO_LARGE,
    **error_doc(422, "Malformed input; the message says where and how to fix it."),
}
_PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    **error_doc(409, "The model is not calibrated on this backend (`neuroserve calibrate`)."),
    **error_doc(
        503, "The backend cannot run on this server, or the model's artifact cannot be loaded."
    ),
}


def _summary(card: ModelCard, versions: list[str]) -> ModelSummary:
    return ModelSummary(
        name=card.name,
        task=card.config["task"],
        architecture=card.config["architecture"],
        latest_version=card.version,  # the cards listed are the latest versions
        versions=versions,
    )


@router.get("/models", response_model=ModelList, summary="List models")
def list_models(dataplane: DataPlaneDependency) -> ModelList:
    """Every model this server serves, with its task, architecture and versions."""
    cards = dataplane.list_models()
    return ModelList(models=[_summary(card, dataplane.versions(card.name)) for card in cards])


@router.get(
    "/models/{name}", response_model=ModelInfo, responses=_NOT_FOUND, summary="Describe a model"
)
def model_info(
    name: ModelName, dataplane: DataPlaneDependency, version: VersionQuery = None
) -> ModelInfo:
    """A model version's labels or vocabulary, input shape, metrics, provenance, and which
    backends run it here with a calibration."""
    card = dataplane.card(name, version)
    config = card.config
    versions = dataplane.versions(name)
    return ModelInfo(
        name=card.name,
        version=card.version,
        latest_version=dataplane.card(name).version,
        versions=versions,
        task=config["task"],
        architecture=config["architecture"],
        labels=config.get("labels"),
        vocabulary=config.get("vocabulary"),
        input=InputSpec.model_validate(config["input"]),
        metrics=config.get("metrics") or {},
        dataset=config.get("dataset"),
        provenance=config.get("provenance") or {},
        origin=model_origin(config),
        backends=[BackendInfo.model_validate(info) for info in dataplane.backend_infos(card)],
    )


@router.post(
    "/models/{name}/predict",
    response_model=PredictResponse,
    responses={**_NOT_FOUND, **_BAD_INPUT, **_PREDICT_ERRORS},
    summary="Predict on whole sequences",
)
async def predict(
    name: ModelName,
    body: Annotated[PredictRequest, Body(openapi_examples=PREDICT_EXAMPLES)],
    request: Request,
) -> Response:
    """Calibrated predictions with conformal prediction sets for a batch of whole sequences
    (stateless; use sessions to feed a sequence step by step)."""
    # A hot route (service.api.fast_paths calls it directly): no dependencies.
    dataplane: DataPlane = request.app.state.dataplane
    conformal = ConformalOptions(
        alpha=body.alpha,
        score=body.score,
        class_conditional=body.class_conditional,
        never_empty=body.never_empty,
        online=body.online,
        max_set_size=body.max_set_size,
    )
    batch = await dataplane.predict(
        dataplane.card(name, body.version),
        body.inputs,
        backend=body.backend,
        backend_options=body.backend_options,
        conformal=conformal,
        owner=get_principal(request).owner,
    )
    label_request(request, model=batch.model, backend=batch.backend)
    warnings = list(batch.warnings)
    if body.seed is not None:
        warnings.append(IGNORED_SEED_WARNING)
    return Response(PredictResponse.json_of(batch, warnings), media_type="application/json")
