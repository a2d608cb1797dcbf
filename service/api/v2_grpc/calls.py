"""What every gRPC call goes through, as every HTTP request goes through the middlewares:
the API key check, the per-key request rate, the request metrics, and errors answered with
the gRPC status that matches their HTTP status and the same message.

Keys travel in the call's metadata under the HTTP header names (`authorization: Bearer
<key>` or `x-api-key: <key>`); ServerLive and ServerReady stay open, like /v2/health/*.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NoReturn

import grpc

from service.api.auth import (
    ANONYMOUS,
    KeyRing,
    Principal,
    UnauthorizedError,
    presented_key,
    unauthorized_message,
)
from service.api.error_handlers import ErrorAnswer, answer_for
from service.api.limits import KeyRates
from service.errors import NeuroserveError
from service.metrics import record_request

SERVICE = "inference.GRPCInferenceService"
PROTOCOL = "grpc"

# The gRPC code of each HTTP status the server answers with.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(http_status: int) -> grpc.StatusCode:
    return STATUS_CODES.get(http_status, grpc.StatusCode.INTERNAL)


def v2_status(http_status: int) -> int:
    """The status the V2 HTTP routes answer with: a malformed request is 400 there (the
    native API's 422 is the Open Inference Protocol's 400)."""
    return 400 if http_status == 422 else http_status


class CallError(Exception):
    """An error already turned into its answer (raised by `Call.guard`)."""

    def __init__(self, answer: ErrorAnswer) -> None:
        super().__init__(answer.message)
        self.answer = answer


@dataclass
class Call:
    """One request: its method, the caller, and the labels its metrics are recorded under."""

    method: str  # e.g. "ModelInfer"
    principal: Principal
    model: str = ""
    backend: str = ""
    started: float = field(default_factory=time.perf_counter)

    @property
    def route(self) -> str:
        return f"/{SERVICE}/{self.method}"

    def label(self, *, model: str | None = None, backend: str | None = None) -> None:
        if model is not None:
            self.model = model
        if backend is not None:
            self.backend = backend

    def record(self, http_status: int) -> None:
        # The model is labelled only once its card was found: a made-up name makes no series.
        seconds = time.perf_counter() - self.started
        status = v2_status(http_status)
        record_request(self.route, self.model, self.backend, status, seconds, PROTOCOL)

    def refuse(self, error: NeuroserveError) -> NoReturn:
        answer = answer_for(error, self.route)
        self.record(answer.status_code)
        raise CallError(answer) from None

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Record the request, and turn any error into a `CallError` carrying its answer."""
        try:
            yield
        except CallError as error:
            self.record(error.answer.status_code)
            raise
        except Exception as error:
            answer = answer_for(error, self.route)
            self.record(answer.status_code)
            raise CallError(answer) from error
        self.record(200)


class CallGate:
    """Admits calls: the key (when keys are configured), then the key's request rate."""

    def __init__(self, keys: KeyRing, rates: KeyRates) -> None:
        self.keys = keys
        self.rates = rates

    def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        """The caller, or UnauthorizedError (401) for a missing or unknown key."""
        if not self.keys.enabled:
            return ANONYMOUS
        metadata = context.invocation_metadata() or ()
        headers = {
            key.lower().encode("latin-1"): value.encode("latin-1")
            for key, value in metadata
            if isinstance(value, str)
        }
        key = presented_key(headers)
        principal = self.keys.verify(key)
        if principal is None:
            raise UnauthorizedError(unauthorized_message(key))
        return principal

    async def admit(self, method: str, context: grpc.aio.ServicerContext) -> Call:
        """A `Call` for an authenticated caller within its rate; a refusal is recorded and
        raised as a `CallError`."""
        call = Call(method, ANONYMOUS)
        try:
            call.principal = self.principal(context)
            await self.rates.check(call.principal.name)
        except NeuroserveError as error:
            call.refuse(error)
        return call

    async def admit_each(self, call: Call) -> Call:
        """A further request on an admitted stream: the same caller, its own rate token."""
        each = Call(call.method, call.principal)
        try:
            await self.rates.check(each.principal.name)
        except NeuroserveError as error:
            each.refuse(error)
        return each


async def abort(context: grpc.aio.ServicerContext, error: CallError) -> NoReturn:
    """End the call with the error's gRPC status and the message HTTP would send."""
    await context.abort(grpc_status(error.answer.status_code), error.answer.message)
    raise AssertionError("ServicerContext.abort returns only by raising")
