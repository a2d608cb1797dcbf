"""`inference.GRPCInferenceService`: the Open Inference Protocol over gRPC, a thin adapter over
the same V2 request checks, data plane and session plane as the HTTP routes (`service.api.v2`).

- ServerLive / ServerReady / ModelReady / ServerMetadata / ModelMetadata answer what the
  HTTP health and metadata routes answer.
- ModelInfer runs on the protocol-independent core of the HTTP route
  (`service.api.v2_infer.run_infer`): the same inputs, parameters and outputs; Triton's
  `sequence_id` / `sequence_start` / `sequence_end` step sessions on the session plane, so a
  sequence's answers equal the same chunks stepped through `/v1/sessions`.
- ModelStreamInfer (`service.api.v2_grpc.streaming`) streams generated tokens.
- ModelConfig, RepositoryIndex and ModelStatistics answer what the HTTP routes answer (the
  same documents, `service.api.v2_models`); the rest of Triton's service (shared memory,
  model control, tracing, logging) answers UNIMPLEMENTED.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format
from starlette.concurrency import run_in_threadpool
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from models.repository import ArtifactError, ModelCard
from service.api.auth import ANONYMOUS
from service.api.v2 import EXTENSIONS, SERVER_NAME, _model_metadata, server_version
from service.api.v2_grpc.calls import Call, CallError, CallGate, abort
from service.api.v2_grpc.tensors import decoded_inputs, parameter, parameters_dict, raw_outputs
from service.api.v2_infer import InferCall, run_infer
from service.api.v2_models import ServingLimits, model_config, model_statistics, repository_index
from service.api.v2_parameters import parse_parameters
from service.dataplane.plane import DataPlane
from service.sessions.plane import SessionManager

# A Triton client's request for an empty final response on a stream (`tritonclient.grpc`
# async_stream_infer(enable_empty_final_response=True)); every final response here is marked
# with FINAL_RESPONSE instead.
EMPTY_FINAL = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"
UNSERVED = (
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
    def __init__(
        self,
        dataplane: DataPlane,
        sessions: SessionManager,
        gate: CallGate,
        limits: ServingLimits,
    ) -> None:
        self.dataplane = dataplane
        self.sessions = sessions
        self.gate = gate
        self.limits = limits

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
        """Triton's model configuration, as `GET /v2/models/{name}/config` answers it; a
        language model's is also decoupled (ModelStreamInfer sends one response per token)."""
        async with self.call("ModelConfig", context) as call:
            card = self.dataplane.card(request.name, version_or_none(request.version))
            call.label(model=card.name)
            config = json_format.ParseDict(model_config(card, self.limits), mc.ModelConfig())
            if _is_language_model(card):
                config.model_transaction_policy.decoupled = True
            return pb.ModelConfigResponse(config=config)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        """Every version of every model, READY when its artifact loads (`ready`: only those)."""
        async with self.call("RepositoryIndex", context):
            index = await run_in_threadpool(repository_index, self.dataplane, request.ready)
            return json_format.ParseDict({"models": index}, pb.RepositoryIndexResponse())

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        """Inference statistics from the server's counters, as `GET /v2/models/.../stats`:
        every model without a name, every version of a model without a version."""
        async with self.call("ModelStatistics", context) as call:
            name, version = request.name or None, version_or_none(request.version)
            if name is not None:
                call.label(model=self.dataplane.card(name, version).name)
            stats = model_statistics(self.dataplane, name, version)
            return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    # ---- inference --------------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        async with self.call("ModelInfer", context) as call:
            return await self.infer(request, call)

    async def infer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        """One inference request, answered by the core `POST /v2/models/{name}/infer` uses."""
        parameters = parameters_dict(request.parameters)
        parameters.pop(EMPTY_FINAL, None)  # a streaming client's wish, no part of the answer
        answer = await run_infer(
            self.dataplane,
            self.sessions,
            InferCall(
                model=request.model_name,
                version=version_or_none(request.model_version),
                inputs=decoded_inputs(request),
                parameters=parse_parameters(parameters),
                outputs=[output.name for output in request.outputs] or None,
                owner=call.principal.owner,
            ),
        )
        call.label(model=answer.model, backend=answer.backend)
        response = pb.ModelInferResponse(
            model_name=answer.model, model_version=answer.version, id=request.id
        )
        for key, value in answer.parameters.items():
            response.parameters[key].CopyFrom(parameter(value))
        outputs, raw = raw_outputs(answer.outputs)
        response.outputs.extend(outputs)
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
            call = await self.gate.admit(self.method, self.context)
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
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served by neuroserve")

    handler.__name__ = method
    return handler


for _method in UNSERVED:
    setattr(InferenceServicer, _method, _unserved(_method))
