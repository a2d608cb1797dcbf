"""Open Inference Protocol (KServe V2) routes: server and model metadata, health, inference.

Live means the process answers; ready means start-up (model preload) has finished. Stock
clients (`tritonclient.http`) only look at the status code: 200 for true, 503 for not ready.

Inference (`POST /v2/models/{name}[/versions/{v}]/infer`) takes JSON tensors:
- feature models: one input `input`, FP16/FP32/FP64 or INT*/UINT*, shape [N, T, F];
- language models: one input `prompt`, BYTES, shape [N] (or [N, 1]) of prompt strings.
Outputs, all returned unless the request's `outputs` names a subset:
- `label` BYTES [N] (the label text, not its index: labels are strings in the model card),
- `confidence` FP32 [N], `probabilities` FP32 [N, C] (in the order of the model's labels),
- `prediction_set` BOOL [N, C] (membership of each label; only where the answer has a set),
- `entropy` FP32 [N] (nats), `prediction_id` BYTES [N] (quote it in `POST /v1/feedback`).
Request parameters: `alpha`, `score`, `backend`, and Triton's sequence parameters
`sequence_id` (int or string; 0 and "" mean none), `sequence_start`, `sequence_end`, which
map onto sessions (`service.api.v2_sequences`). Unknown parameters are ignored, as the
protocol asks. Malformed requests get 400 with `{"error": "..."}`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from models.repository import ArtifactError, ModelCard
from service.api.auth import get_principal
from service.api.metrics_route import label_request
from service.api.route_helpers import (
    TOO_LARGE_DESCRIPTION,
    V2_ACCESS_ERRORS,
    error_doc,
    get_dataplane,
)
from service.api.schemas.common import V2ErrorResponse
from service.api.schemas.parameters import ModelName, VersionPath
from service.api.schemas.v2 import (
    V2_INFER_EXAMPLES,
    Liveness,
    Readiness,
    ServerMetadata,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ModelReady,
    V2TensorMetadata,
)
from service.api.v2_codec import V2BadRequestError
from service.api.v2_infer import (
    FEATURES_INPUT,
    PROMPT_INPUT,
    conformal_options,
    decoded_input,
    encode_predictions,
    feature_batch,
    parse_parameters,
    prompt_batch,
    requested_outputs,
)
from service.api.v2_sequences import run_sequence_step, sequence_sessions
from service.dataplane.plane import TORCH_BACKEND, DataPlane
from service.errors import BadInputError, describe_validation_errors


class V2Route(APIRoute):
    """A route whose bad requests answer 400, the Open Inference Protocol's status for them
    (the native API's 422 comes from the shared handlers; the body format is chosen there)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def v2_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as error:
                message = "invalid request: " + describe_validation_errors(error.errors())
                raise V2BadRequestError(message) from None
            except BadInputError as error:
                raise V2BadRequestError(error.message) from None

        return v2_handler


# Stock clients (tritonclient) post JSON without a Content-Type header: parse it anyway.
router = APIRouter(prefix="/v2", tags=["v2"], route_class=V2Route, strict_content_type=False)
DataPlaneDependency = Annotated[DataPlane, Depends(get_dataplane)]

SERVER_NAME = "neuroserve"
# Optional protocol extensions advertised: none. Triton's sequence parameters are honoured
# (`service.api.v2_sequences`) without claiming the whole of Triton's sequence extension.
EXTENSIONS: list[str] = []
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    **V2_ACCESS_ERRORS,
    **error_doc(404, "Unknown model or version.", V2ErrorResponse),
}
_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": V2ModelReady, "description": "Not loaded (yet), or its artifact is broken."}
}


def server_version() -> str:
    try:
        return version(SERVER_NAME)
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


@router.get(
    "", response_model=ServerMetadata, responses=V2_ACCESS_ERRORS, summary="Server metadata"
)
def server_metadata() -> ServerMetadata:
    """The server's name, version and protocol extensions."""
    return ServerMetadata(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)


@router.get("/health/live", response_model=Liveness, summary="Liveness")
def live() -> Liveness:
    """200 while the process answers (open without an API key)."""
    return Liveness(live=True)


@router.get(
    "/health/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Still starting up."}},
    summary="Readiness",
)
def ready(request: Request) -> Readiness | JSONResponse:
    """200 once start-up (model preload) has finished and the state store answers; 503
    before (open without an API key)."""
    dataplane = getattr(request.app.state, "dataplane", None)
    is_ready = dataplane is not None and dataplane.ready
    if not is_ready:
        return JSONResponse(Readiness(ready=False).model_dump(), status_code=503)
    return Readiness(ready=True)


# ---- model metadata and readiness -----------------------------------------------------------


def _model_metadata(card: ModelCard, versions: list[str]) -> V2ModelMetadata:
    config = card.config
    n_classes = len(
        config["labels"] if config["task"] == "classification" else config["vocabulary"]
    )
    if config["input"]["kind"] == "tokens":
        inputs = [V2TensorMetadata(name=PROMPT_INPUT, datatype="BYTES", shape=[-1])]
    else:
        features = int(config["input"]["features"])
        inputs = [V2TensorMetadata(name=FEATURES_INPUT, datatype="FP32", shape=[-1, -1, features])]
    outputs = [
        V2TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
        V2TensorMetadata(name="confidence", datatype="FP32", shape=[-1]),
        V2TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, n_classes]),
        V2TensorMetadata(name="prediction_set", datatype="BOOL", shape=[-1, n_classes]),
        V2TensorMetadata(name="entropy", datatype="FP32", shape=[-1]),
        V2TensorMetadata(name="prediction_id", datatype="BYTES", shape=[-1]),
    ]
    return V2ModelMetadata(
        name=card.name,
        versions=versions,
        platform=f"neuroserve_{config['architecture']}",
        inputs=inputs,
        outputs=outputs,
    )


@router.get(
    "/models/{name}", response_model=V2ModelMetadata, responses=_NOT_FOUND, summary="Model metadata"
)
def model_metadata(name: ModelName, dataplane: DataPlaneDependency) -> V2ModelMetadata:
    """The latest version's input and output tensors (names, datatypes, shapes)."""
    return _model_metadata(dataplane.card(name), dataplane.versions(name))


@router.get(
    "/models/{name}/versions/{version}",
    response_model=V2ModelMetadata,
    responses=_NOT_FOUND,
    summary="Model version metadata",
)
def model_version_metadata(
    name: ModelName, version: VersionPath, dataplane: DataPlaneDependency
) -> V2ModelMetadata:
    """One version's input and output tensors (names, datatypes, shapes)."""
    return _model_metadata(dataplane.card(name, version), dataplane.versions(name))


@router.get(
    "/models/{name}/ready",
    response_model=V2ModelReady,
    responses={**_NOT_FOUND, **_NOT_READY},
    summary="Model readiness",
)
async def model_ready(
    name: ModelName, dataplane: DataPlaneDependency
) -> V2ModelReady | JSONResponse:
    """200 once the server has started and the latest version loads; 503 while starting up or
    when its artifact is broken (the server log says why)."""
    return await _model_ready(dataplane, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    response_model=V2ModelReady,
    responses={**_NOT_FOUND, **_NOT_READY},
    summary="Model version readiness",
)
async def model_version_ready(
    name: ModelName, version: VersionPath, dataplane: DataPlaneDependency
) -> V2ModelReady | JSONResponse:
    """200 once the server has started and this version loads; 503 while starting up or when
    its artifact is broken (the server log says why)."""
    return await _model_ready(dataplane, name, version)


async def _model_ready(
    dataplane: DataPlane, name: str, version: str | None
) -> V2ModelReady | JSONResponse:
    card = dataplane.card(name, version)
    answer = V2ModelReady(name=card.name, version=card.version, ready=False)
    if not dataplane.ready:
        return JSONResponse(answer.model_dump(), status_code=503)
    try:
        await run_in_threadpool(dataplane.repository.load, card.name, card.version)
    except ArtifactError:
        return JSONResponse(answer.model_dump(), status_code=503)
    return answer.model_copy(update={"ready": True})


# ---- inference ------------------------------------------------------------------------------


async def _infer(
    request: Request,
    body: V2InferRequest,
    dataplane: DataPlane,
    name: str,
    version: str | None,
) -> JSONResponse:
    if "inference-header-content-length" in request.headers:
        raise V2BadRequestError(
            "the binary tensor data extension is not supported: send JSON tensors "
            "(tritonclient: set_data_from_numpy(..., binary_data=False))"
        )
    card = dataplane.card(name, version)
    params = parse_parameters(body.parameters)
    tokens = card.config["input"]["kind"] == "tokens"
    labels = card.config["vocabulary"] if tokens else card.config["labels"]
    tensor = decoded_input(body.inputs, PROMPT_INPUT if tokens else FEATURES_INPUT)
    requested = requested_outputs(body.outputs)
    backend = params.backend or TORCH_BACKEND
    response_parameters: dict[str, Any] = {}
    if params.sequence_id is not None:
        predictions, response_parameters, backend = await run_sequence_step(
            sequence_sessions(request),
            get_principal(request).owner,
            dataplane,
            card,
            tensor,
            params,
            params.sequence_id,
            version,
        )
        label_request(request, model=card.name, backend=backend)
    else:
        inputs: Any = (
            prompt_batch(tensor)
            if tokens
            else feature_batch(tensor, int(card.config["input"]["features"])).tolist()
        )
        batch = await dataplane.predict(
            card.name,
            inputs,
            version=card.version,
            backend=backend,
            conformal=conformal_options(params, None, None),
            owner=get_principal(request).owner,
        )
        predictions = batch.predictions
        label_request(request, model=card.name, backend=backend)

    def describe_uncalibrated() -> str:
        return (
            f"no prediction_set: model {card.name!r} version {card.version} has no calibration "
            f"for backend {backend!r}; run `neuroserve calibrate {card.name} --backend {backend}`"
        )

    outputs = encode_predictions(
        predictions, labels, requested, body.outputs is not None, describe_uncalibrated
    )
    answer: dict[str, Any] = {"model_name": card.name, "model_version": card.version}
    if body.id is not None:
        answer["id"] = body.id
    if response_parameters:
        answer["parameters"] = response_parameters
    answer["outputs"] = outputs
    return JSONResponse(answer)


_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    **error_doc(400, "Malformed request; the message says where.", V2ErrorResponse),
    **V2_ACCESS_ERRORS,
    **error_doc(404, "Unknown model, version or sequence.", V2ErrorResponse),
    **error_doc(409, "Sequence already open, or not calibrated on the backend.", V2ErrorResponse),
    **error_doc(413, TOO_LARGE_DESCRIPTION, V2ErrorResponse),
    **error_doc(503, "The model's artifact or the state store cannot serve now.", V2ErrorResponse),
}
InferBody = Annotated[V2InferRequest, Body(openapi_examples=V2_INFER_EXAMPLES)]


@router.post(
    "/models/{name}/infer",
    response_model=V2InferResponse,
    responses=_INFER_RESPONSES,
    summary="Inference (JSON tensors)",
)
async def infer(
    name: ModelName, body: InferBody, request: Request, dataplane: DataPlaneDependency
) -> JSONResponse:
    """Calibrated predictions from JSON tensors, with conformal prediction sets; Triton's
    sequence parameters feed a session step by step."""
    return await _infer(request, body, dataplane, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=V2InferResponse,
    responses=_INFER_RESPONSES,
    summary="Inference on one model version (JSON tensors)",
)
async def infer_version(
    name: ModelName,
    version: VersionPath,
    body: InferBody,
    request: Request,
    dataplane: DataPlaneDependency,
) -> JSONResponse:
    """Inference on one model version (see the route without `/versions/{version}`)."""
    return await _infer(request, body, dataplane, name, version)
