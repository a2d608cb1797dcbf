"""`ModelStreamInfer`: a bidirectional stream of inference requests, answered in order.

- A language model's request generates tokens, Triton's decoupled way: one response per
  generated token, then one final response (parameter `triton_final_response` true) that
  carries no outputs and the generation's summary as parameters. The tokens come from the same
  generation loop as `WS /v1/generate` (`service.sessions.generation`), so the same seed gives
  the same tokens, probabilities and sets.
  The request: input `prompt` (BYTES, shape [1]) and parameters `max_tokens` (required),
  `temperature`, `alpha`, `score`, `seed`, `stop`, `max_set_size`, `session_id` (continue
  that session), `backend`; the version is the request's `model_version`.
  A token response's outputs (shape [1] unless said): `token`, `top_token`, `prediction_id`
  (BYTES), `token_id`, `position`, `set_size` (INT64), `probability`,
  `sampling_probability`, `top_probability`, `entropy` (FP64: exactly the websocket's
  numbers), `in_set`, `calibrated` (BOOL), and `prediction_set` (BYTES [k], the set's tokens);
  an output whose value is null on the websocket is left out. Parameter `index` counts tokens.
  The final response's parameters: `finish_reason`, `session_id`, `model`, `version`,
  `backend`, `tokens`, `text`, `step`, `seed`, `calibrated`, `uncalibrated_tokens`, and
  `warnings` and `usage` as JSON text.
- Any other model's request is one `ModelInfer`, answered by one response (marked final).

A refused request is answered in the stream by a response with `error_message` (the message
HTTP would send) and the stream goes on; a missing or unknown API key ends the stream with
UNAUTHENTICATED. A client that cancels mid-generation leaves the session holding exactly the
prompt and the tokens committed so far, as on the websocket.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from pydantic import ValidationError
from tritonclient.grpc import service_pb2 as pb

from service.api.schemas.generate import GenerateOptions
from service.api.v2_codec import output_tensor
from service.api.v2_grpc.calls import Call, CallError, abort
from service.api.v2_grpc.servicer import (
    EMPTY_FINAL,
    FINAL_RESPONSE,
    InferenceServicer,
    version_or_none,
)
from service.api.v2_grpc.tensors import decoded_inputs, parameter, parameters_dict, raw_outputs
from service.api.v2_inputs import PROMPT_INPUT, prompt_batch, single_input
from service.errors import BadInputError, describe_validation_errors
from service.sessions.generation import GeneratedToken, GenerationDone, generate

_DATATYPES = {bool: "BOOL", int: "INT64", float: "FP64", str: "BYTES"}


class StreamingServicer(InferenceServicer):
    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        try:
            stream = await self.gate.admit("ModelStreamInfer", context)
        except CallError as error:
            await abort(context, error)
        async for request in request_iterator:
            try:
                call = await self.gate.admit_each(stream)
                with call.guard():
                    card = self.dataplane.card(
                        request.model_name, version_or_none(request.model_version)
                    )
                    if card.config["input"]["kind"] != "tokens":
                        response = await self.infer(request, call)
                        response.parameters[FINAL_RESPONSE].CopyFrom(parameter(True))
                        yield pb.ModelStreamInferResponse(infer_response=response)
                        continue
                    async for response in self._generate(request, call):
                        yield pb.ModelStreamInferResponse(infer_response=response)
            except CallError as error:
                yield pb.ModelStreamInferResponse(error_message=error.answer.message)

    async def _generate(
        self, request: pb.ModelInferRequest, call: Call
    ) -> AsyncIterator[pb.ModelInferResponse]:
        options = generate_options(request)
        events = generate(
            options,
            request.model_name,
            sessions=self.sessions,
            dataplane=self.dataplane,
            owner=call.principal.owner,
        )
        async with aclosing(events):
            async for event in events:
                if isinstance(event, GeneratedToken):
                    yield token_response(request, event)
                else:
                    call.label(model=event.model, backend=event.backend)
                    yield final_response(request, event)


def generate_options(request: pb.ModelInferRequest) -> GenerateOptions:
    """The generation a stream request asks for, checked as the websocket checks its first
    message (unknown parameters are named)."""
    (prompt,) = _one_prompt(request)
    parameters = parameters_dict(request.parameters)
    parameters.pop(EMPTY_FINAL, None)
    if request.model_version:
        parameters["version"] = request.model_version
    try:
        return GenerateOptions.model_validate({**parameters, "prompt": prompt})
    except ValidationError as error:
        problems = [
            {**problem, "loc": ("parameters", *problem["loc"])}
            if problem["loc"] and problem["loc"][0] != "prompt"
            else problem
            for problem in error.errors()
        ]
        raise BadInputError("invalid request: " + describe_validation_errors(problems)) from None


def _one_prompt(request: pb.ModelInferRequest) -> list[str]:
    prompts = prompt_batch(single_input(decoded_inputs(request), PROMPT_INPUT))
    if len(prompts) != 1:
        raise BadInputError(
            f"a generation request carries one prompt (input {PROMPT_INPUT!r} of shape [1]), "
            f"got {len(prompts)}"
        )
    return prompts


def token_response(request: pb.ModelInferRequest, token: GeneratedToken) -> pb.ModelInferResponse:
    """One generated token: the websocket's token message as output tensors."""
    message = token.message()
    del message["type"]
    index = message.pop("index")
    message["prediction_id"] = message.pop("id")
    tensors = []
    for name, value in message.items():
        if value is None:
            continue
        if isinstance(value, list):
            tensors.append(output_tensor(name, "BYTES", value))
        else:
            tensors.append(output_tensor(name, _DATATYPES[type(value)], [value]))
    response = _response(request, final=False)
    response.parameters["index"].CopyFrom(parameter(index))
    outputs, raw = raw_outputs(tensors)
    response.outputs.extend(outputs)
    response.raw_output_contents.extend(raw)
    return response


def final_response(request: pb.ModelInferRequest, done: GenerationDone) -> pb.ModelInferResponse:
    """The end of a generation: its summary (the websocket's done message) as parameters."""
    message = done.message()
    del message["type"]
    response = _response(request, final=True)
    response.model_version = done.version
    for key, value in message.items():
        text = json.dumps(value) if isinstance(value, list | dict) else value
        response.parameters[key].CopyFrom(parameter(text))
    return response


def _response(request: pb.ModelInferRequest, *, final: bool) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    response.parameters[FINAL_RESPONSE].CopyFrom(parameter(final))
    return response
