"""Token generation routes: `WS /v1/generate` (streaming) and its non-streaming twin
`POST /v1/models/{name}/generate`. Both are thin adapters over `service.sessions.generation`.

The websocket protocol:
1. the client sends one JSON message, `GenerateMessage` (`model`, `prompt`, `max_tokens`,
   and optionally `temperature`, `alpha`, `score`, `session_id`, `stop`, `max_set_size`,
   `seed`, `version`, `backend`);
2. the server sends one `{"type": "token", ...}` message per generated token, then one
   `{"type": "done", "finish_reason", "session_id", "tokens", "text", "step", ...}` and
   closes with 1000;
3. a bad first message, or a request the server refuses, gets one
   `{"type": "error", "code", "message"}` and a close with 1008 (policy violation), or 1011
   when the server itself could not serve it (5xx-class errors).
Messages the client sends after the first are read (to notice a disconnect) and ignored.
With API keys configured, a connection without a key header sends its key as `api_key` in
the first message (`unauthorized`, 1008, when missing or unknown). A message over
`ws_max_message_bytes` is refused with 1009; more than `ws_max_messages_per_second` with 1008.
A client that disconnects ends the generation after the token being committed; the session
keeps exactly the prompt and the tokens committed so far.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing, suppress
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected, WebSocketState

from models.repository import ArtifactError, ModelNotFoundError
from service.api.auth import PrincipalDependency, authenticate_key
from service.api.limits import TokenBucket
from service.api.metrics_route import label_request
from service.api.route_helpers import ACCESS_ERRORS, TOO_LARGE, error_doc, get_dataplane
from service.api.schemas.generate import (
    GENERATE_EXAMPLES,
    GenerateMessage,
    GenerateOptions,
    GenerateResponse,
)
from service.api.schemas.parameters import LanguageModelName
from service.dataplane.plane import DataPlane
from service.errors import NeuroserveError, describe_validation_errors
from service.sessions.generation import GeneratedToken, GenerationDone, generate

logger = logging.getLogger("neuroserve.generate")

router = APIRouter(prefix="/v1", tags=["generation"])
DataPlaneDependency = Annotated[DataPlane, Depends(get_dataplane)]

POLICY_VIOLATION = 1008  # the client's request is refused
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011  # the server could not serve a valid request
FIRST_MESSAGE_TIMEOUT_S = 30.0


def _sessions(app_state: Any) -> Any:
    sessions = getattr(app_state, "sessions", None)
    if sessions is None:
        raise RuntimeError("the app has no session manager (app.state.sessions)")
    return sessions


# ---- the non-streaming twin -----------------------------------------------------------------


@router.post(
    "/models/{name}/generate",
    response_model=GenerateResponse,
    responses={
        **ACCESS_ERRORS,
        **error_doc(404, "Unknown model, version or session."),
        **error_doc(409, "The backend is not calibrated, or the session belongs to another model."),
        **TOO_LARGE,
        **error_doc(422, "Malformed request, or not a language model; the message says where."),
        **error_doc(503, "The state store (or the model's artifact) cannot serve right now."),
    },
    summary="Generate tokens (all at once)",
)
async def generate_all(
    name: LanguageModelName,
    body: Annotated[GenerateOptions, Body(openapi_examples=GENERATE_EXAMPLES)],
    request: Request,
    dataplane: DataPlaneDependency,
    principal: PrincipalDependency,
) -> GenerateResponse:
    """Generate from a language model and answer every token at once, each with its
    calibrated probability and conformal set of next tokens (`WS /v1/generate` streams them)."""
    tokens: list[dict[str, Any]] = []
    done: GenerationDone | None = None
    stream = generate(
        body,
        name,
        sessions=_sessions(request.app.state),
        dataplane=dataplane,
        owner=principal.owner,
    )
    async with aclosing(stream):
        async for event in stream:
            if isinstance(event, GeneratedToken):
                tokens.append(event.message())
            else:
                done = event
    if done is None:  # `generate` always ends with a GenerationDone
        raise RuntimeError("generation ended without a final message")
    label_request(request, model=done.model, backend=done.backend)
    answer = done.message()
    answer.pop("type")
    answer["tokens"] = tokens
    return GenerateResponse.model_validate(answer)


# ---- the websocket --------------------------------------------------------------------------


async def _first_message(websocket: WebSocket) -> GenerateMessage | None:
    """The parsed first message; None after answering a bad one (or a client that left)."""
    try:
        message = await asyncio.wait_for(websocket.receive(), FIRST_MESSAGE_TIMEOUT_S)
    except TimeoutError:
        await _refuse(websocket, "timeout", "no request within 30 s of connecting")
        return None
    if message["type"] == "websocket.disconnect":
        return None
    oversize = _oversize(websocket, message)
    if oversize is not None:
        await _refuse(websocket, "message_too_big", oversize, MESSAGE_TOO_BIG)
        return None
    text = message.get("text")
    if text is None and message.get("bytes") is not None:
        try:
            text = message["bytes"].decode("utf-8")
        except UnicodeDecodeError:
            await _refuse(websocket, "bad_input", "the first message must be UTF-8 JSON")
            return None
    try:
        payload = json.loads(text or "")
    except json.JSONDecodeError as error:
        await _refuse(websocket, "bad_input", f"the first message is not valid JSON: {error}")
        return None
    try:
        return GenerateMessage.model_validate(payload)
    except ValidationError as error:
        message_text = "invalid request: " + describe_validation_errors(error.errors())
        await _refuse(websocket, "bad_input", message_text)
        return None


async def _refuse(
    websocket: WebSocket, code: str, message: str, close_code: int = POLICY_VIOLATION
) -> None:
    """Send an error message and close; a client that already left is not an error."""
    with suppress(WebSocketDisconnect, WebSocketDisconnected, RuntimeError):
        await websocket.send_json({"type": "error", "code": code, "message": message})
        # A close reason may hold at most 123 bytes of UTF-8, whatever the characters.
        reason = message.encode()[:123].decode(errors="ignore")
        await websocket.close(close_code, reason=reason)


def _oversize(websocket: WebSocket, message: Any) -> str | None:
    """Why `message` is over NEUROSERVE_WS_MAX_MESSAGE_BYTES, or None when it fits."""
    limit = websocket.app.state.settings.ws_max_message_bytes
    text, data = message.get("text"), message.get("bytes")
    size = len(text.encode("utf-8")) if text is not None else len(data or b"")
    if size <= limit:
        return None
    return (
        f"a websocket message has {size} bytes; the limit is {limit} "
        "(NEUROSERVE_WS_MAX_MESSAGE_BYTES)"
    )


async def _watch_for_disconnect(websocket: WebSocket, gone: asyncio.Event) -> None:
    """Read (and ignore) what the client sends until it disconnects; a client that sends
    too much, or too often, is refused and counts as gone."""
    rate = websocket.app.state.settings.ws_max_messages_per_second
    bucket = TokenBucket(rate, max(rate, 1.0), time.monotonic)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            oversize = _oversize(websocket, message)
            if oversize is not None:
                gone.set()  # no token goes out after the refusal
                await _refuse(websocket, "message_too_big", oversize, MESSAGE_TOO_BIG)
                break
            if bucket.take() > 0.0:
                gone.set()
                await _refuse(
                    websocket,
                    "rate_limited",
                    f"more than {rate:g} websocket messages a second "
                    "(NEUROSERVE_WS_MAX_MESSAGES_PER_SECOND)",
                )
                break
    except (WebSocketDisconnect, WebSocketDisconnected, RuntimeError):
        pass
    gone.set()


@router.websocket("/generate")
async def generate_stream(websocket: WebSocket) -> None:
    await websocket.accept()
    request = await _first_message(websocket)
    if request is None:
        return
    try:
        principal = authenticate_key(websocket, request.api_key)
    except NeuroserveError as error:
        await _refuse(websocket, error.code, error.message)
        return
    gone = asyncio.Event()
    watcher = asyncio.create_task(_watch_for_disconnect(websocket, gone))
    app_state = websocket.app.state
    options = GenerateOptions.model_validate(request.model_dump(exclude={"model", "api_key"}))
    stream = generate(
        options,
        request.model,
        sessions=_sessions(app_state),
        dataplane=app_state.dataplane,
        owner=principal.owner,
    )
    try:
        async with aclosing(stream):
            async for event in stream:
                if gone.is_set():
                    return  # the token just committed stays in the session
                await websocket.send_json(event.message())
    except (WebSocketDisconnect, WebSocketDisconnected):
        return
    except NeuroserveError as error:
        close_code = INTERNAL_ERROR if error.status_code >= 500 else POLICY_VIOLATION
        await _refuse(websocket, error.code, error.message, close_code)
        return
    except ModelNotFoundError as error:
        await _refuse(websocket, "not_found", str(error.args[0] if error.args else error))
        return
    except ArtifactError as error:
        logger.error("model artifact error in generation: %s", error)
        message = f"model artifact could not be loaded: {error}"
        await _refuse(websocket, "artifact_error", message, INTERNAL_ERROR)
        return
    except Exception:
        logger.exception("generation failed for model %r", request.model)
        await _refuse(websocket, "internal_error", "internal server error", INTERNAL_ERROR)
        return
    finally:
        watcher.cancel()
    if websocket.application_state == WebSocketState.CONNECTED:
        with suppress(WebSocketDisconnect, WebSocketDisconnected, RuntimeError):
            await websocket.close(1000)
