"""Open Inference Protocol (KServe V2) HTTP routes: server and model metadata, health,
inference (JSON and the binary tensor data extension), and Triton's model configuration,
repository index and statistics extensions.

Live means the process answers; ready means start-up (model preload) has finished. Stock
clients (`tritonclient.http`) only look at the status code: 200 for true, 503 for not ready.

Inference (`POST /v2/models/{name}[/versions/{v}]/infer`) decodes the request's tensors
(`service.api.v2_codec`) and parameters (`service.api.v2_parameters`) and runs the
protocol-independent core (`service.api.v2_infer.run_infer`), which documents the inputs
and outputs. A body with the `Inference-Header-Content-Length` header is that many bytes of
JSON followed by the binary inputs; outputs asked for as binary (`binary_data` per output,
else the request's `binary_data_output`) follow the JSON part of the answer the same way.
Malformed requests get 400 with `{"error": "..."}`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Coroutine
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import orjson
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
    V2_REPOSITORY_INDEX_EXAMPLES,
    Liveness,
    Readiness,
    ServerMetadata,
    V2InferenceStatistics,
    V2InferRequest,
    V2InferResponse,
    V2ModelConfig,
    V2ModelMetadata,
    V2ModelReady,
    V2RepositoryIndexRequest,
    V2RepositoryModel,
    V2RequestedOutput,
    V2TensorMetadata,
)
from service.api.v2_codec import (
    BINARY_HEADER,
    BinaryTail,
    V2BadRequestError,
    binary_tensor,
    decode_tensor,
    json_tensor,
    split_binary_body,
)
from service.api.v2_infer import InferAnswer, InferCall, run_infer
from service.api.v2_inputs import input_name
from service.api.v2_models import (
    ServingLimits,
    model_config,
    model_statistics,
    output_metadata,
    repository_index,
)
from service.api.v2_parameters import parse_parameters
from service.dataplane.plane import DataPlane
from service.errors import BadInputError, PayloadTooLargeError, describe_validation_errors


class _JsonPart(Request):
    """A V2 request whose body is read as JSON whatever its Content-Type (clients send
    `application/octet-stream` or none), cut to its JSON part when binary tensors follow
    it; those wait in `state.binary_tail`. FastAPI then parses it as any other JSON body."""

    def __init__(self, request: Request, json_part: bytes, tail: bytes | None) -> None:
        headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
        scope = {**request.scope, "headers": [*headers, (b"content-type", b"application/json")]}
        super().__init__(scope, request.receive)
        self._body = json_part
        self.state.binary_tail = tail


def binary_tail(request: Request) -> bytes | None:
    """The binary tensors that followed a request's JSON part (`_JsonPart`), else None. Read
    from the scope: `request.state` raises (and catches) an AttributeError when unset, which
    costs ~4 us on every JSON request."""
    return request.scope.get("state", {}).get("binary_tail")


# Content-Encoding -> zlib's wbits for it (the stock client's request_compression_algorithm).
_COMPRESSIONS = {"gzip": 31, "deflate": 15}


def _decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    """The body of a compressed request, at most `limit` bytes once inflated."""
    if encoding.strip().lower() == "identity":
        return body
    wbits = _COMPRESSIONS.get(encoding.strip().lower())
    if wbits is None:
        raise V2BadRequestError(
            f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or identity"
        )
    inflater = zlib.decompressobj(wbits=wbits)
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as error:
        raise V2BadRequestError(f"the body is not valid {encoding} data: {error}") from None
    if len(inflated) > limit:
        raise PayloadTooLargeError(
            f"the decompressed body exceeds {limit} bytes (NEUROSERVE_MAX_REQUEST_BYTES)"
        )
    return inflated


def _is_json(content_type: str | None) -> bool:
    return content_type is None or content_type.split(";")[0].strip().endswith("json")


class V2Route(APIRoute):
    """A route whose bad requests answer 400, the Open Inference Protocol's status for them
    (the native API's 422 comes from the shared handlers; the body format is chosen there),
    and whose body may carry binary tensors after its JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def v2_handler(request: Request) -> Response:
            try:
                header_length = request.headers.get(BINARY_HEADER)
                encoding = request.headers.get("content-encoding")
                plain_json = _is_json(request.headers.get("content-type"))
                if header_length is not None or encoding is not None or not plain_json:
                    body = await request.body()
                    if encoding is not None:
                        limit = request.app.state.settings.max_request_bytes
                        body = _decompressed(body, encoding, limit)
                    json_part, tail = split_binary_body(body, header_length)
                    request = _JsonPart(request, json_part, tail)
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
# Triton's sequence parameters are honoured (`service.api.v2_sequences`) without claiming the
# whole of its sequence extension (no implicit state tensors, no control inputs); of the
# model repository extension only the index is offered, so it is not claimed either.
EXTENSIONS: list[str] = ["binary_tensor_data", "model_configuration", "statistics"]
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


# ---- inference statistics (before /models/{name}: "stats" is no model name here) -------------


@router.get(
    "/models/stats",
    response_model=V2InferenceStatistics,
    responses=V2_ACCESS_ERRORS,
    summary="Inference statistics of every model",
)
def all_statistics(dataplane: DataPlaneDependency) -> dict[str, Any]:
    """Per model version: successful and failed V2 inference requests (HTTP and gRPC) with
    their summed durations, rows answered and the time of the last one, since start-up."""
    return model_statistics(dataplane)


@router.get(
    "/models/{name}/stats",
    response_model=V2InferenceStatistics,
    responses=_NOT_FOUND,
    summary="Inference statistics of a model",
)
def statistics_of_model(name: ModelName, dataplane: DataPlaneDependency) -> dict[str, Any]:
    """Every version of one model; see `GET /v2/models/stats`."""
    return model_statistics(dataplane, name)


@router.get(
    "/models/{name}/versions/{version}/stats",
    response_model=V2InferenceStatistics,
    responses=_NOT_FOUND,
    summary="Inference statistics of a model version",
)
def statistics_of_version(
    name: ModelName, version: VersionPath, dataplane: DataPlaneDependency
) -> dict[str, Any]:
    """One model version; see `GET /v2/models/stats`."""
    return model_statistics(dataplane, name, version)


# ---- model metadata and readiness -----------------------------------------------------------


def _model_metadata(card: ModelCard, versions: list[str]) -> V2ModelMetadata:
    config = card.config
    if config["input"]["kind"] == "tokens":
        inputs = [V2TensorMetadata(name=input_name(card), datatype="BYTES", shape=[-1])]
    else:
        features = int(config["input"]["features"])
        inputs = [
            V2TensorMetadata(name=input_name(card), datatype="FP32", shape=[-1, -1, features])
        ]
    outputs = [
        V2TensorMetadata(name=name, datatype=datatype, shape=shape)
        for name, datatype, shape in output_metadata(card)
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

_OUTPUT_PARAMETERS = ("binary_data",)


def _binary_outputs(outputs: list[V2RequestedOutput] | None, default: bool) -> set[str] | bool:
    """Which outputs go back as binary data: the names whose `binary_data` says so (else
    `default`, the request's `binary_data_output`); True for every output when the request
    names none and asked for binary output."""
    if outputs is None:
        return default
    binary = set()
    for i, output in enumerate(outputs):
        parameters = output.parameters or {}
        unknown = sorted(set(parameters) - set(_OUTPUT_PARAMETERS))
        if unknown:
            reason = (
                "; Triton's classification extension is not offered (the label, "
                "probabilities and prediction_set outputs carry it)"
                if "classification" in unknown
                else "; shared memory is not offered"
                if any(key.startswith("shared_memory") for key in unknown)
                else ""
            )
            raise V2BadRequestError(
                f"outputs[{i}] ({output.name!r}).parameters {unknown} not supported{reason} "
                "(an output takes only binary_data)"
            )
        choice = parameters.get("binary_data", default)
        if not isinstance(choice, bool):
            raise V2BadRequestError(
                f"outputs[{i}] ({output.name!r}).parameters.binary_data must be true or false"
            )
        if choice:
            binary.add(output.name)
    return binary


def _infer_response(
    answer: InferAnswer, request_id: str | None, binary: set[str] | bool
) -> Response:
    """The answer as JSON, or as JSON followed by the binary outputs' bytes."""
    head: dict[str, Any] = {"model_name": answer.model, "model_version": answer.version}
    if request_id is not None:
        head["id"] = request_id
    if answer.parameters:
        head["parameters"] = answer.parameters
    tails: list[bytes] = []
    entries = []
    for tensor in answer.outputs:
        if binary is True or (isinstance(binary, set) and tensor.name in binary):
            entry, raw = binary_tensor(tensor)
            tails.append(raw)
            entries.append(entry)
        else:
            entries.append(json_tensor(tensor))
    head["outputs"] = entries
    # Every value is a finite number, a bool or a str, so orjson writes what json would.
    json_part = orjson.dumps(head)
    if not tails:
        return Response(json_part, media_type="application/json")
    return Response(
        json_part + b"".join(tails),
        media_type="application/octet-stream",
        headers={BINARY_HEADER: str(len(json_part))},
    )


async def _infer(
    request: Request, body: V2InferRequest, name: str, version: str | None
) -> Response:
    """The infer routes' work. They are hot routes (`service.api.fast_paths`): a JSON request
    may reach them without FastAPI's layers or `V2Route`'s handler, so the app's objects come
    from the request and a bad input is a 400 here, as `V2Route` makes it."""
    try:
        return await _answer_infer(request, body, name, version)
    except BadInputError as error:
        raise V2BadRequestError(error.message) from None


async def _answer_infer(
    request: Request, body: V2InferRequest, name: str, version: str | None
) -> Response:
    tail = binary_tail(request)
    binary_part = BinaryTail(tail) if tail is not None else None
    if not isinstance(body.inputs, list) or not body.inputs:
        raise V2BadRequestError("inputs must be a non-empty list of tensors")
    inputs = [
        decode_tensor(tensor, f"inputs[{i}]", binary_part) for i, tensor in enumerate(body.inputs)
    ]
    if binary_part is not None:
        binary_part.check_consumed()
    params = parse_parameters(body.parameters)
    binary = _binary_outputs(body.outputs, params.binary_data_output)
    call = InferCall(
        model=name,
        version=version,
        inputs=inputs,
        parameters=params,
        outputs=None if body.outputs is None else [output.name for output in body.outputs],
        owner=get_principal(request).owner,
    )
    state = request.app.state
    answer = await run_infer(state.dataplane, getattr(state, "sessions", None), call)
    label_request(request, model=answer.model, backend=answer.backend)
    return _infer_response(answer, body.id, binary)


_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "JSON; or, when outputs are asked for as binary data, the JSON part (its byte "
            "length in the Inference-Header-Content-Length header) followed by their bytes."
        ),
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **error_doc(400, "Malformed request; the message says where.", V2ErrorResponse),
    **V2_ACCESS_ERRORS,
    **error_doc(404, "Unknown model, version or sequence.", V2ErrorResponse),
    **error_doc(409, "No prediction set: not calibrated on the backend.", V2ErrorResponse),
    **error_doc(413, TOO_LARGE_DESCRIPTION, V2ErrorResponse),
    **error_doc(503, "The model's artifact or the state store cannot serve now.", V2ErrorResponse),
}
InferBody = Annotated[V2InferRequest, Body(openapi_examples=V2_INFER_EXAMPLES)]


@router.post(
    "/models/{name}/infer",
    response_model=V2InferResponse,
    responses=_INFER_RESPONSES,
    summary="Inference (JSON or binary tensors)",
)
async def infer(name: ModelName, body: InferBody, request: Request) -> Response:
    """Calibrated predictions with conformal prediction sets, from JSON tensors or the binary
    tensor data extension (the default of `tritonclient.http`: the JSON part's byte length in
    `Inference-Header-Content-Length`, binary inputs marked by `parameters.binary_data_size`).
    Outputs: label, confidence, probabilities, prediction_set, set_size, abstain, entropy,
    prediction_id. Every `/v1` predict option is a parameter; Triton's sequence parameters
    feed a session step by step (docs/V2_PROTOCOL.md)."""
    return await _infer(request, body, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=V2InferResponse,
    responses=_INFER_RESPONSES,
    summary="Inference on one model version (JSON or binary tensors)",
)
async def infer_version(
    name: ModelName, version: VersionPath, body: InferBody, request: Request
) -> Response:
    """Inference on one model version (see the route without `/versions/{version}`)."""
    return await _infer(request, body, name, version)


# ---- model configuration and repository index -----------------------------------------------


def serving_limits(request: Request) -> ServingLimits:
    settings = request.app.state.settings
    return ServingLimits(
        max_batch_size=settings.max_batch_size,
        session_ttl_seconds=settings.session_ttl_seconds,
        batch_window_ms=settings.batch_window_ms,
    )


@router.get(
    "/models/{name}/config",
    response_model=V2ModelConfig,
    responses=_NOT_FOUND,
    summary="Model configuration",
)
def model_configuration(
    name: ModelName, request: Request, dataplane: DataPlaneDependency
) -> dict[str, Any]:
    """Triton's model configuration of the latest version: inputs and outputs with their data
    types and dims (batch dimension left out), `max_batch_size`, and `sequence_batching`
    (every model is stateful)."""
    return model_config(dataplane.card(name), serving_limits(request))


@router.get(
    "/models/{name}/versions/{version}/config",
    response_model=V2ModelConfig,
    responses=_NOT_FOUND,
    summary="Model version configuration",
)
def model_version_configuration(
    name: ModelName, version: VersionPath, request: Request, dataplane: DataPlaneDependency
) -> dict[str, Any]:
    """Triton's model configuration of one model version."""
    return model_config(dataplane.card(name, version), serving_limits(request))


@router.post(
    "/repository/index",
    response_model=list[V2RepositoryModel],
    responses={
        **error_doc(400, "Malformed request; the message says where.", V2ErrorResponse),
        **V2_ACCESS_ERRORS,
    },
    summary="Model repository index",
)
async def repository_index_route(
    dataplane: DataPlaneDependency,
    body: Annotated[
        V2RepositoryIndexRequest | None, Body(openapi_examples=V2_REPOSITORY_INDEX_EXAMPLES)
    ] = None,
) -> list[dict[str, Any]]:
    """Every version of every model: READY when it loads, UNAVAILABLE (with the reason) when
    its artifact is broken. `{"ready": true}` lists only the ready ones; the body may be
    empty."""
    ready_only = body is not None and body.ready
    return await run_in_threadpool(repository_index, dataplane, ready_only)
