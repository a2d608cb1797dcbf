"""`inference.GRPCInferenceService`: the Open Inference Protocol over gRPC, a thin adapter over
the same V2 request checks, data plane and session plane as the HTTP routes (`service.api.v2`).

- ServerLive / ServerReady / ModelReady / ServerMetadata / ModelMetadata answer what the
  HTTP health and metadata routes answer.
- ModelInfer takes the HTTP route's inputs, parameters and outputs (see `service.api.v2`);
  Triton's `sequence_id` / `sequence_start` / `sequence_end` run on the session plane
  (`service.api.v2_sequences`), so a sequence's answers equal the same chunks stepped through
  `/v1/sessions`.
- ModelStreamInfer (`service.api.v2_grpc.streaming`) streams generated tokens.
- ModelConfig and RepositoryIndex describe the models; the rest of Triton's service
  (statistics, shared memory, model control, tracing, logging) answers UNIMPLEMENTED.
"""

from __future__ import annotations

from typing import Any

import grpc
from starlette.concurrency import run_in_threadpool
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from models.repository import ArtifactError, ModelCard
from service.api.auth import ANONYMOUS
from service.api.v2 import EXTENSIONS, SERVER_NAME, _model_metadata, server_version
from service.api.v2_grpc.calls import Call, CallError, CallGate, abort
from service.api.v2_grpc.tensors import json_inputs, parameter, parameters_dict, raw_outputs
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
from service.api.v2_sequences import run_sequence_step
from service.dataplane.plane import TORCH_BACKEND, DataPlane
from service.sessions.plane import SessionManager

# A Triton client's request for an empty final response on a stream (`tritonclient.grpc`
# async_stream_infer(enable_empty_final_response=True)); every final response here is marked
# with FINAL_RESPONSE instead.
EMPTY_FINAL = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"
# Triton's datatypes in a model configuration (BYTES is TYPE_STRING there).
CONFIG_TYPES = {"BYTES": mc.TYPE_STRING, "BOOL": mc.TYPE_BOOL, "FP32": mc.TYPE_FP32}
UNSERVED = (
    "ModelStatistics",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)


def version_or_none(version: str) -> str | None:
    return version or None  # proto strings are "" when unset


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, sessions: SessionManager, gate: CallGate) -> None:
        self.dataplane = dataplane
        self.sessions = sessions
        self.gate = gate

    # ---- health and metadata ----------------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        call = Call("ServerLive", ANONYMOUS)  # open, like /v2/health/live
        with call.guard():
            return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        call = Call("ServerReady", ANONYMOUS)
        with call.guard():
            return pb.ServerReadyResponse(ready=self.dataplane.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """True once the server has started and the model loads (a broken artifact: false)."""
        async with self.call("ModelReady", context) as call:
            card = self.dataplane.card(request.name, version_or_none(request.version))
            call.label(model=card.name)
            if not self.dataplane.ready:
                return pb.ModelReadyResponse(ready=False)
            try:
                await run_in_threadpool(self.dataplane.repository.load, card.name, card.version)
            except ArtifactError:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        async with self.call("ServerMetadata", context):
            return pb.ServerMetadataResponse(
                name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS
            )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        async with self.call("ModelMetadata", context) as call:
            card = self.dataplane.card(request.name, version_or_none(request.version))
            call.label(model=card.name)
            metadata = _model_metadata(card, self.dataplane.versions(card.name))

            def tensors(described: list[Any]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
                return [
                    pb.ModelMetadataResponse.TensorMetadata(
                        name=t.name, datatype=t.datatype, shape=t.shape
                    )
                    for t in described
                ]

            return pb.ModelMetadataResponse(
                name=metadata.name,
                versions=metadata.versions,
                platform=metadata.platform,
                inputs=tensors(metadata.inputs),
                outputs=tensors(metadata.outputs),
            )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        """Triton's model configuration: full shapes (max_batch_size 0: the batch is the
        first dimension), sequence batching (every model is stateful), and a decoupled
        transaction policy for language models (ModelStreamInfer sends one response per
        token)."""
        async with self.call("ModelConfig", context) as call:
            card = self.dataplane.card(request.name, version_or_none(request.version))
            call.label(model=card.name)
            metadata = _model_metadata(card, self.dataplane.versions(card.name))
            config = mc.ModelConfig(
                name=card.name,
                platform=metadata.platform,
                backend=SERVER_NAME,
                max_batch_size=0,
                input=[
                    mc.ModelInput(name=t.name, data_type=CONFIG_TYPES[t.datatype], dims=t.shape)
                    for t in metadata.inputs
                ],
                output=[
                    mc.ModelOutput(name=t.name, data_type=CONFIG_TYPES[t.datatype], dims=t.shape)
                    for t in metadata.outputs
                ],
                sequence_batching=mc.ModelSequenceBatching(),
            )
            if _is_language_model(card):
                config.model_transaction_policy.decoupled = True
            return pb.ModelConfigResponse(config=config)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        """Every version of every model, READY when its artifact loads (`ready`: only those)."""
        async with self.call("RepositoryIndex", context):
            index = await run_in_threadpool(self._repository_index)
            if request.ready:
                index = [entry for entry in index if entry.state == "READY"]
            return pb.RepositoryIndexResponse(models=index)

    def _repository_index(self) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        repository = self.dataplane.repository
        index = []
        for name in repository.list_models():
            for version in repository.versions(name):
                entry = pb.RepositoryIndexResponse.ModelIndex(name=name, version=version)
                try:
                    repository.load(name, version)
                    entry.state = "READY"
                except (ArtifactError, ValueError) as error:
                    entry.state, entry.reason = "UNAVAILABLE", str(error)
                index.append(entry)
        return index

    # ---- inference --------------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        async with self.call("ModelInfer", context) as call:
            return await self.infer(request, call)

    async def infer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        """One inference request, as `POST /v2/models/{name}/infer` answers it."""
        dataplane = self.dataplane
        version = version_or_none(request.model_version)
        card = dataplane.card(request.model_name, version)
        call.label(model=card.name)
        parameters = parameters_dict(request.parameters)
        parameters.pop(EMPTY_FINAL, None)  # a streaming client's wish, no part of the answer
        params = parse_parameters(parameters)
        tokens = _is_language_model(card)
        labels = card.config["vocabulary"] if tokens else card.config["labels"]
        tensor = decoded_input(json_inputs(request), PROMPT_INPUT if tokens else FEATURES_INPUT)
        requested = requested_outputs(list(request.outputs) or None)
        backend = params.backend or TORCH_BACKEND
        response_parameters: dict[str, Any] = {}
        owner = call.principal.owner
        if params.sequence_id is not None:
            predictions, response_parameters, backend = await run_sequence_step(
                self.sessions, owner, dataplane, card, tensor, params, params.sequence_id, version
            )
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
                owner=owner,
            )
            predictions = batch.predictions
        call.label(backend=backend)

        def describe_uncalibrated() -> str:
            return (
                f"no prediction_set: model {card.name!r} version {card.version} has no "
                f"calibration for backend {backend!r}; run `neuroserve calibrate {card.name} "
                f"--backend {backend}`"
            )

        outputs = encode_predictions(
            predictions, labels, requested, len(request.outputs) > 0, describe_uncalibrated
        )
        response = pb.ModelInferResponse(
            model_name=card.name, model_version=card.version, id=request.id
        )
        for key, value in response_parameters.items():
            response.parameters[key].CopyFrom(parameter(value))
        tensors, raw = raw_outputs(outputs)
        response.outputs.extend(tensors)
        response.raw_output_contents.extend(raw)
        return response

    # ---- admission ----------------------------------------------------------------------

    def call(self, method: str, context: grpc.aio.ServicerContext) -> _AdmittedCall:
        return _AdmittedCall(self.gate, method, context)


class _AdmittedCall:
    """`async with servicer.call(method, context) as call:` admits the caller (key, rate),
    records the request, and aborts with the error's gRPC status and message."""

    def __init__(self, gate: CallGate, method: str, context: grpc.aio.ServicerContext) -> None:
        self.gate, self.method, self.context = gate, method, context
        self._guard: Any = None

    async def __aenter__(self) -> Call:
        try:
            call = self.gate.admit(self.method, self.context)
        except CallError as error:
            await abort(self.context, error)
        self._guard = call.guard()
        self._guard.__enter__()
        return call

    async def __aexit__(self, kind: Any, error: BaseException | None, trace: Any) -> None:
        try:
            self._guard.__exit__(kind, error, trace)
        except CallError as answered:
            await abort(self.context, answered)


def _is_language_model(card: ModelCard) -> bool:
    return card.config["input"]["kind"] == "tokens"


def _unserved(method: str) -> Any:
    async def handler(self: InferenceServicer, request: Any, context: Any) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method} is not served by neuroserve (see GET /metrics for its counters)"
            if method == "ModelStatistics"
            else f"{method} is not served by neuroserve",
        )

    handler.__name__ = method
    return handler


for _method in UNSERVED:
    setattr(InferenceServicer, _method, _unserved(_method))
