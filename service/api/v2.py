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
map onto sessions (see `run_sequence_step`). Unknown parameters are ignored, as the
protocol asks. Malformed requests get 400 with `{"error": "..."}`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from calibration.checks import check_alpha
from models.repository import ArtifactError, ModelCard
from service.api.auth import get_principal
from service.api.metrics_route import label_request
from service.api.route_helpers import get_dataplane
from service.api.schemas.common import V2ErrorResponse
from service.api.schemas.v2 import (
    Liveness,
    Readiness,
    ServerMetadata,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ModelReady,
    V2TensorMetadata,
)
from service.api.v2_codec import DecodedTensor, V2BadRequestError, decode_tensor, encode_tensor
from service.dataplane.inputs import encode_prompts
from service.dataplane.plane import TORCH_BACKEND, DataPlane
from service.dataplane.predictions import ClassPrediction, ConformalOptions
from service.errors import (
    BadInputError,
    NotCalibratedError,
    NotFoundError,
    ServiceUnavailableError,
    describe_validation_errors,
    value_errors_as,
)


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
# (see `run_sequence_step`) without claiming the whole of Triton's sequence extension.
EXTENSIONS: list[str] = []
FEATURES_INPUT = "input"
PROMPT_INPUT = "prompt"
OUTPUTS = ("label", "confidence", "probabilities", "prediction_set", "entropy", "prediction_id")
SEQUENCE_SESSION_PREFIX = "v2-sequence-"
_SEQUENCE_ID_TEXT = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": V2ErrorResponse, "description": "Malformed request; the message says where."},
    404: {"model": V2ErrorResponse, "description": "Unknown model, version or sequence."},
}


def server_version() -> str:
    try:
        return version(SERVER_NAME)
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


@router.get("", response_model=ServerMetadata, summary="Server metadata")
def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)


@router.get("/health/live", response_model=Liveness, summary="Liveness")
def live() -> Liveness:
    return Liveness(live=True)


@router.get(
    "/health/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Still starting up."}},
    summary="Readiness",
)
def ready(request: Request) -> Readiness | JSONResponse:
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
    "/models/{name}", response_model=V2ModelMetadata, responses=_ERRORS, summary="Model metadata"
)
@router.get(
    "/models/{name}/versions/{version}",
    response_model=V2ModelMetadata,
    responses=_ERRORS,
    summary="Model version metadata",
)
def model_metadata(
    name: str, dataplane: DataPlaneDependency, version: str | None = None
) -> V2ModelMetadata:
    card = dataplane.card(name, version)
    return _model_metadata(card, dataplane.versions(name))


@router.get(
    "/models/{name}/ready",
    response_model=V2ModelReady,
    responses={**_ERRORS, 503: {"model": V2ModelReady, "description": "Not loaded (yet)."}},
    summary="Model readiness",
)
@router.get(
    "/models/{name}/versions/{version}/ready",
    response_model=V2ModelReady,
    responses={**_ERRORS, 503: {"model": V2ModelReady, "description": "Not loaded (yet)."}},
    summary="Model version readiness",
)
async def model_ready(
    name: str, dataplane: DataPlaneDependency, version: str | None = None
) -> V2ModelReady | JSONResponse:
    """200 once the server has started and the model loads; 503 while starting up or when its
    artifact is broken (the server log says why); 404 for an unknown model or version."""
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


@dataclass(frozen=True)
class InferParameters:
    alpha: float | None
    score: str | None
    backend: str | None
    sequence_id: int | str | None  # None: a stateless request
    sequence_start: bool
    sequence_end: bool
    never_empty: bool | None = None  # None: the server's default (never empty)


def parse_parameters(parameters: dict[str, Any] | None) -> InferParameters:
    """The request parameters we use, type-checked; every other parameter is ignored."""
    parameters = parameters or {}
    alpha = parameters.get("alpha")
    if alpha is not None:
        with value_errors_as(V2BadRequestError, prefix="parameters."):
            check_alpha(alpha)
    for key in ("score", "backend"):
        value = parameters.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise V2BadRequestError(f"parameters.{key} must be a non-empty string, got {value!r}")
    sequence_id = parameters.get("sequence_id")
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str | None):
        raise V2BadRequestError(
            f"parameters.sequence_id must be an integer or a string, got {sequence_id!r}"
        )
    if isinstance(sequence_id, int) and sequence_id < 0:
        raise V2BadRequestError(f"parameters.sequence_id must be >= 0, got {sequence_id}")
    if (
        isinstance(sequence_id, str)
        and sequence_id
        and not _SEQUENCE_ID_TEXT.fullmatch(sequence_id)
    ):
        raise V2BadRequestError(
            f"parameters.sequence_id {sequence_id!r} must be 1-128 letters, digits, '.', '_', "
            "':' or '-'"
        )
    never_empty = parameters.get("never_empty")
    if never_empty is not None and not isinstance(never_empty, bool):
        raise V2BadRequestError(
            f"parameters.never_empty must be true or false, got {never_empty!r}"
        )
    flags = {}
    for key in ("sequence_start", "sequence_end"):
        value = parameters.get(key, False)
        if not isinstance(value, bool):
            raise V2BadRequestError(f"parameters.{key} must be true or false, got {value!r}")
        flags[key] = value
    if sequence_id in (0, "", None):  # Triton's convention: 0 / "" is "not a sequence"
        if flags["sequence_start"] or flags["sequence_end"]:
            raise V2BadRequestError(
                "parameters.sequence_start/sequence_end need a non-zero parameters.sequence_id"
            )
        sequence_id = None
    return InferParameters(
        alpha=float(alpha) if alpha is not None else None,
        score=parameters.get("score"),
        backend=parameters.get("backend"),
        sequence_id=sequence_id,
        never_empty=never_empty,
        **flags,
    )


def _decoded_input(inputs: Any, expected_name: str) -> DecodedTensor:
    if not isinstance(inputs, list) or not inputs:
        raise V2BadRequestError("inputs must be a non-empty list of tensors")
    decoded = [decode_tensor(tensor, f"inputs[{i}]") for i, tensor in enumerate(inputs)]
    names = [tensor.name for tensor in decoded]
    unknown = [name for name in names if name != expected_name]
    if unknown or len(names) != 1:
        raise V2BadRequestError(
            f"this model takes exactly one input named {expected_name!r}; got {names} "
            "(see GET /v2/models/{name} for its inputs)"
        )
    return decoded[0]


def _feature_batch(tensor: DecodedTensor, n_features: int) -> np.ndarray:
    """[N, T, F] float64 values of a numeric input, or 400 naming the problem."""
    if tensor.datatype in ("BYTES", "BOOL"):
        raise V2BadRequestError(
            f"input {tensor.name!r} has datatype {tensor.datatype}; this model takes numbers "
            "(FP32, FP64, FP16 or INT*/UINT*)"
        )
    if len(tensor.shape) != 3 or tensor.shape[2] != n_features:
        raise V2BadRequestError(
            f"input {tensor.name!r} has shape {list(tensor.shape)}; this model takes "
            f"[N, T, {n_features}] (N sequences of T steps of {n_features} features)"
        )
    return np.asarray(tensor.values, dtype=np.float64)  # [N, T, F]


def _prompt_batch(tensor: DecodedTensor) -> list[str]:
    if tensor.datatype != "BYTES":
        raise V2BadRequestError(
            f"input {tensor.name!r} has datatype {tensor.datatype}; this language model takes "
            "BYTES prompt strings"
        )
    if not (len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)):
        raise V2BadRequestError(
            f"input {tensor.name!r} has shape {list(tensor.shape)}; prompts are [N] (or [N, 1])"
        )
    return list(tensor.values)


def _requested_outputs(outputs: list[Any] | None) -> list[str]:
    if outputs is None:
        return list(OUTPUTS)
    names: list[str] = []
    for output in outputs:
        if output.name not in OUTPUTS:
            raise V2BadRequestError(
                f"unknown output {output.name!r}; this model's outputs are {list(OUTPUTS)}"
            )
        if output.name not in names:
            names.append(output.name)
    return names


def encode_predictions(
    predictions: Sequence[ClassPrediction],
    labels: Sequence[str],
    requested: list[str],
    explicit: bool,
    describe_uncalibrated: Callable[[], str],
) -> list[dict[str, Any]]:
    """The response tensors for `requested` outputs, in that order.

    `prediction_set` needs every prediction to carry a set: when one does not (an
    uncalibrated model served under NEUROSERVE_ALLOW_UNCALIBRATED), it is left out of a
    default response and refused (409) when the request asked for it by name.
    """
    has_sets = all(p.prediction_set is not None for p in predictions)
    if "prediction_set" in requested and not has_sets:
        if explicit:
            notes = [p.note for p in predictions if p.note is not None]
            raise NotCalibratedError(
                f"no prediction_set: {notes[0]}" if notes else describe_uncalibrated()
            )
        requested = [name for name in requested if name != "prediction_set"]
    index = {label: i for i, label in enumerate(labels)}
    tensors = []
    for name in requested:
        if name == "label":
            tensors.append(encode_tensor(name, "BYTES", [p.label for p in predictions]))
        elif name == "confidence":
            tensors.append(encode_tensor(name, "FP32", [p.confidence for p in predictions]))
        elif name == "probabilities":
            tensors.append(encode_tensor(name, "FP32", [p.probabilities for p in predictions]))
        elif name == "entropy":
            tensors.append(encode_tensor(name, "FP32", [p.entropy for p in predictions]))
        elif name == "prediction_id":
            tensors.append(encode_tensor(name, "BYTES", [p.id for p in predictions]))
        else:
            mask = np.zeros((len(predictions), len(labels)), dtype=bool)  # [N, C]
            for row, prediction in enumerate(predictions):
                mask[row, [index[label] for label in prediction.prediction_set or []]] = True
            tensors.append(encode_tensor(name, "BOOL", mask))
    return tensors


def sequence_session_id(sequence_id: int | str) -> str:
    """The session behind a V2 sequence id (the session manager namespaces it further)."""
    return f"{SEQUENCE_SESSION_PREFIX}{sequence_id}"


def _sessions(request: Request) -> Any:
    sessions = getattr(request.app.state, "sessions", None)
    if sessions is None:
        raise ServiceUnavailableError("sequences need the session manager, which is not running")
    return sessions


def _conformal(params: InferParameters, alpha: float | None, score: str | None) -> ConformalOptions:
    """The request's conformal options over the given defaults (BadInputError when invalid)."""
    chosen = {
        "alpha": params.alpha if params.alpha is not None else alpha,
        "score": params.score or score,
        "never_empty": params.never_empty,
    }
    return ConformalOptions(**{key: value for key, value in chosen.items() if value is not None})


async def run_sequence_step(
    request: Request,
    dataplane: DataPlane,
    card: ModelCard,
    tensor: DecodedTensor,
    params: InferParameters,
    sequence_id: int | str,
    url_version: str | None,
) -> tuple[list[ClassPrediction], dict[str, Any]]:
    """One request of a Triton-style sequence, as one step of a session.

    `sequence_start` creates the session (409 if that sequence is still open); a request
    without it continues one (404 if there is none); `sequence_end` deletes it after the
    answer is built. A sequence belongs to the model (and version) it started on, and every
    input is checked before a session is created.
    """
    sessions = _sessions(request)
    session_id = sequence_session_id(sequence_id)
    owner = get_principal(request).owner  # a sequence belongs to the key that started it
    if card.config["input"]["kind"] == "tokens":
        prompts = _prompt_batch(tensor)
        _check_single_sequence(len(prompts), sequence_id)
        (inputs,) = encode_prompts(prompts, card.config["vocabulary"], dataplane.limits)  # [T]
    else:
        batch = _feature_batch(tensor, int(card.config["input"]["features"]))  # [N, T, F]
        _check_single_sequence(batch.shape[0], sequence_id)
        inputs = torch.from_numpy(batch[0].astype(np.float32))  # [T, F]
    if params.sequence_start:
        backend = params.backend or TORCH_BACKEND
        _conformal(params, None, None)  # refuse a bad alpha/score before creating anything
        await run_in_threadpool(dataplane.calibration, card, backend)
        chosen = {"alpha": params.alpha, "score": params.score}
        info = await sessions.create(
            model=card.name,
            version=card.version,
            backend=backend,
            session_id=session_id,
            owner=owner,
            **{key: value for key, value in chosen.items() if value is not None},
        )
    else:
        try:
            info = await sessions.get(session_id, owner=owner)
        except NotFoundError:
            raise NotFoundError(
                f"no open sequence {sequence_id!r} (expired or never started); start "
                "one with parameters.sequence_start = true"
            ) from None
        if info.model != card.name or (url_version is not None and info.version != url_version):
            raise V2BadRequestError(
                f"sequence {sequence_id!r} belongs to model {info.model!r} version "
                f"{info.version}, not {card.name!r}"
                + (f" version {url_version}" if url_version is not None else "")
            )
        if params.backend is not None and params.backend != info.backend:
            raise V2BadRequestError(
                f"sequence {sequence_id!r} runs on backend {info.backend!r}; a sequence "
                f"cannot switch to {params.backend!r}"
            )
    label_request(request, model=card.name, backend=info.backend)
    conformal = _conformal(params, info.alpha, info.score)
    try:
        outcome = await sessions.step(session_id, inputs, owner=owner, conformal=conformal)
    except Exception:
        if params.sequence_start:  # a sequence that never took a step does not stay open
            await sessions.delete(session_id, owner=owner)
        raise
    last, _ = outcome.answer
    prediction = last.predictions[0]
    if params.sequence_end:
        await sessions.delete(session_id, owner=owner)
    sequence = {"sequence_id": sequence_id, "sequence_step": outcome.info.step}
    return [prediction], sequence


def _check_single_sequence(n: int, sequence_id: int | str) -> None:
    if n != 1:
        raise V2BadRequestError(
            f"a request of sequence {sequence_id!r} carries one sequence (first dimension 1), "
            f"got {n}"
        )


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
    tensor = _decoded_input(body.inputs, PROMPT_INPUT if tokens else FEATURES_INPUT)
    requested = _requested_outputs(body.outputs)
    backend = params.backend or TORCH_BACKEND
    response_parameters: dict[str, Any] = {}
    if params.sequence_id is not None:
        predictions, response_parameters = await run_sequence_step(
            request, dataplane, card, tensor, params, params.sequence_id, version
        )
    else:
        inputs: Any = (
            _prompt_batch(tensor)
            if tokens
            else _feature_batch(tensor, int(card.config["input"]["features"])).tolist()
        )
        batch = await dataplane.predict(
            card.name,
            inputs,
            version=card.version,
            backend=backend,
            conformal=_conformal(params, None, None),
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
    **_ERRORS,
    409: {"model": V2ErrorResponse, "description": "Sequence already open / not calibrated."},
}


@router.post(
    "/models/{name}/infer",
    response_model=V2InferResponse,
    responses=_INFER_RESPONSES,
    summary="Inference (JSON tensors)",
)
async def infer(
    name: str, body: V2InferRequest, request: Request, dataplane: DataPlaneDependency
) -> JSONResponse:
    return await _infer(request, body, dataplane, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=V2InferResponse,
    responses=_INFER_RESPONSES,
    summary="Inference on one model version (JSON tensors)",
)
async def infer_version(
    name: str,
    version: str,
    body: V2InferRequest,
    request: Request,
    dataplane: DataPlaneDependency,
) -> JSONResponse:
    return await _infer(request, body, dataplane, name, version)
