"""The Open Inference Protocol over gRPC with the stock Triton client (`tritonclient.grpc`, its
defaults: raw tensor contents) against a real `neuroserve serve` over the built-in models:
health and metadata, inference on every built-in model agreeing with the HTTP V2 and native
routes, Triton sequences equal to the same chunks stepped through `/v1/sessions` bit for bit,
a streamed generation equal to the websocket one for the same seed, and errors with the
gRPC status and the message HTTP sends. A second, in-process server with API keys, a rate
limit and a small request size checks that gRPC is held to the same rules as HTTP, and that
its requests are counted under `protocol="grpc"`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException
from websockets.sync.client import connect

from service.api.auth import hash_key
from service.app import create_app
from service.settings import Settings
from tests.conftest import free_tcp_port
from tests.service.conftest import TEST_SETTINGS, running_server
from tests.service.test_cli import COMMAND, cli_env

DIGITS = ("digits-lru", "digits-snn", "digits-snn-lite")
LANGUAGE_MODEL = "charlm-selective"
LANGUAGE_MODELS = (LANGUAGE_MODEL, "charlm-moe")  # every built-in language model
START_TIMEOUT_S = 60.0
STREAM_TIMEOUT_S = 60.0


# ---- the server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, str]]:
    """(HTTP base URL, gRPC address) of `neuroserve serve` over the built-in models."""
    http_port, grpc_port = free_tcp_port(), free_tcp_port()
    process = subprocess.Popen(
        [*COMMAND, "serve", "--port", str(http_port), "--grpc-port", str(grpc_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
    )
    base_url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(base_url):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("neuroserve serve did not start:\n" + process.communicate()[0])
            time.sleep(0.1)
        yield base_url, f"127.0.0.1:{grpc_port}"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            log, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            log, _ = process.communicate()
    assert f"gRPC (inference.GRPCInferenceService) listening on 127.0.0.1:{grpc_port}" in log


def _ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/v2/health/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def http_url(served: tuple[str, str]) -> str:
    return served[0]


@pytest.fixture
def client(served: tuple[str, str]) -> Iterator[triton.InferenceServerClient]:
    grpc_client = triton.InferenceServerClient(served[1])
    yield grpc_client
    grpc_client.close()


@pytest.fixture
def stub(served: tuple[str, str]) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    """The generated stub, for requests the Triton client does not build (typed contents)."""
    with grpc.insecure_channel(served[1]) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


# ---- helpers --------------------------------------------------------------------------------


def digit_chunks(n: int, steps: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 17, size=(steps, 8)).astype(np.float32) for _ in range(n)]


def features(batch: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)  # the default: raw contents
    return tensor


def prompts(*texts: str) -> triton.InferInput:
    tensor = triton.InferInput("prompt", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def v2_json(http_url: str, model: str, tensor: dict[str, Any], **body: Any) -> httpx.Response:
    return httpx.post(
        f"{http_url}/v2/models/{model}/infer", json={"inputs": [tensor], **body}, timeout=30
    )


def refusal(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refused:
        call()
    return refused.value


def status(code: grpc.StatusCode) -> str:
    return str(code)  # how InferenceServerException.status() names it


# ---- health and metadata --------------------------------------------------------------------


def test_health_and_metadata(client: triton.InferenceServerClient, http_url: str) -> None:
    assert client.is_server_live() and client.is_server_ready()
    for model in (*DIGITS, LANGUAGE_MODEL):
        assert client.is_model_ready(model)
        assert client.is_model_ready(model, model_version="1")
        metadata = client.get_model_metadata(model, as_json=True)
        over_http = httpx.get(f"{http_url}/v2/models/{model}").json()
        for tensor in metadata["inputs"] + metadata["outputs"]:  # proto JSON: int64 as text
            tensor["shape"] = [int(size) for size in tensor["shape"]]
        assert metadata == over_http
    server = client.get_server_metadata(as_json=True)
    over_http = httpx.get(f"{http_url}/v2").json()
    assert server == {key: value for key, value in over_http.items() if value != []}  # proto JSON
    assert server["name"] == "neuroserve"


def test_model_config_repository_index_and_statistics_equal_http(
    client: triton.InferenceServerClient, http_url: str
) -> None:
    for model in (*DIGITS, *LANGUAGE_MODELS):
        config = client.get_model_config(model).config
        over_http = httpx.get(f"{http_url}/v2/models/{model}/config").json()
        expected = json_format.ParseDict(over_http, mc.ModelConfig())
        # Only gRPC streams tokens, one response each: its language models are decoupled.
        if model in LANGUAGE_MODELS:
            expected.model_transaction_policy.decoupled = True
        assert config == expected
    index = client.get_model_repository_index(as_json=True)["models"]
    assert index == [
        {"name": name, "version": "1", "state": "READY"}
        for name in sorted((*DIGITS, *LANGUAGE_MODELS))
    ]
    client.infer("digits-snn", [features(np.stack(digit_chunks(2)))])
    stats = client.get_inference_statistics("digits-snn").model_stats
    over_http = httpx.get(f"{http_url}/v2/models/digits-snn/stats").json()
    assert stats == json_format.ParseDict(over_http, pb.ModelStatisticsResponse()).model_stats
    assert stats[0].inference_stats.success.count >= 1 and stats[0].inference_count >= 2


# ---- inference ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", DIGITS)
def test_infer_on_a_digits_model_equals_http_v2_and_the_native_route(
    client: triton.InferenceServerClient, http_url: str, model: str
) -> None:
    batch = np.stack(digit_chunks(3, steps=8, seed=1))  # [3, 8, 8]
    result = client.infer(model, [features(batch)], request_id="r-1")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (model, "1", "r-1")
    names = [output.name for output in response.outputs]
    assert names == ["label", "confidence", "probabilities", "prediction_set", "set_size",
                     "abstain", "entropy", "prediction_id"]  # fmt: skip
    json_tensor = {"name": "input", "datatype": "FP32", "shape": [3, 8, 8],
                   "data": batch.reshape(-1).tolist()}  # fmt: skip
    over_http = {o["name"]: o for o in v2_json(http_url, model, json_tensor).json()["outputs"]}
    for name in names[:-1]:  # all but the prediction ids, which differ per answer
        served = result.as_numpy(name)
        expected = over_http[name]
        assert list(served.shape) == expected["shape"], name
        if name == "label":
            assert [label.decode() for label in served] == expected["data"]
        else:  # FP32 and BOOL: the same numbers, bit for bit
            assert served.reshape(-1).tolist() == expected["data"], name
    native = httpx.post(
        f"{http_url}/v1/models/{model}/predict", json={"inputs": batch.tolist()}, timeout=30
    ).json()["predictions"]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32
    assert np.array_equal(probabilities, np.float32([p["probabilities"] for p in native]))
    sets = result.as_numpy("prediction_set")
    labels = [str(d) for d in range(10)]
    assert [[labels[i] for i in np.flatnonzero(row)] for row in sets] == [
        p["prediction_set"] for p in native
    ]


def test_the_stock_http_client_with_its_defaults_gets_the_same_answers_from_the_same_server(
    client: triton.InferenceServerClient, http_url: str
) -> None:
    """`tritonclient.http` with no non-default argument (binary tensors both ways) against the
    same `neuroserve serve`: every built-in model, config, index and statistics."""
    http = triton_http.InferenceServerClient(http_url.removeprefix("http://"))
    try:
        batch = np.stack(digit_chunks(2, steps=8, seed=4))  # [2, 8, 8]
        for model in DIGITS:
            over_http = triton_http.InferInput("input", list(batch.shape), "FP32")
            over_http.set_data_from_numpy(batch)
            answer = http.infer(model, [over_http])
            expected = client.infer(model, [features(batch)])
            for name in ("probabilities", "prediction_set", "set_size", "abstain"):
                assert np.array_equal(answer.as_numpy(name), expected.as_numpy(name)), name
        prompt = np.array([[b"the quick "]], dtype=np.object_)
        text = triton_http.InferInput("prompt", [1, 1], "BYTES")
        text.set_data_from_numpy(prompt)
        label = http.infer(LANGUAGE_MODEL, [text]).as_numpy("label")
        assert label.shape == (1,) and len(label[0]) == 1
        assert http.get_model_config("digits-lru")["name"] == "digits-lru"
        index = http.get_model_repository_index()
        assert {entry["name"] for entry in index} == {*DIGITS, *LANGUAGE_MODELS}
        stats = http.get_inference_statistics("digits-lru")["model_stats"]
        assert stats[0]["inference_stats"]["success"]["count"] >= 1
    finally:
        http.close()


def test_infer_on_the_language_model_answers_the_next_token(
    client: triton.InferenceServerClient, http_url: str
) -> None:
    texts = ("def add(a, b):", "import nu")
    result = client.infer(LANGUAGE_MODEL, [prompts(*texts)], outputs=[
        triton.InferRequestedOutput("label"), triton.InferRequestedOutput("probabilities")
    ])  # fmt: skip
    assert [o.name for o in result.get_response().outputs] == ["label", "probabilities"]
    json_tensor = {"name": "prompt", "datatype": "BYTES", "shape": [2], "data": list(texts)}
    over_http = v2_json(
        http_url,
        LANGUAGE_MODEL,
        json_tensor,
        outputs=[{"name": "label"}, {"name": "probabilities"}],
    ).json()["outputs"]
    assert [t.decode() for t in result.as_numpy("label")] == over_http[0]["data"]
    assert result.as_numpy("probabilities").reshape(-1).tolist() == over_http[1]["data"]
    assert result.as_numpy("probabilities").shape == (2, 97)


def test_typed_contents_equal_raw_contents(
    client: triton.InferenceServerClient, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    batch = np.stack(digit_chunks(2, seed=4))  # [2, 4, 8]
    raw = client.infer("digits-lru", [features(batch)]).as_numpy("probabilities")
    request = pb.ModelInferRequest(model_name="digits-lru")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(batch.shape))
    tensor.contents.fp32_contents.extend(batch.reshape(-1).tolist())
    response = stub.ModelInfer(request, timeout=30)
    index = [o.name for o in response.outputs].index("probabilities")
    typed = np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(2, 10)
    assert np.array_equal(typed, raw)
    # INT32 in typed contents is accepted like an INT32 JSON tensor.
    request = pb.ModelInferRequest(model_name="digits-lru")
    tensor = request.inputs.add(name="input", datatype="INT32", shape=list(batch.shape))
    tensor.contents.int_contents.extend(batch.astype(np.int32).reshape(-1).tolist())
    response = stub.ModelInfer(request, timeout=30)
    ints = np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(2, 10)
    assert np.array_equal(ints, raw)


# ---- sequences ------------------------------------------------------------------------------


def sequence_through_grpc(
    client: triton.InferenceServerClient, pieces: list[np.ndarray], sequence_id: int | str
) -> list[pb.ModelInferResponse]:
    results = []
    for i, piece in enumerate(pieces):
        result = client.infer(
            "digits-lru",
            [features(piece[None])],  # [1, T, 8]: one sequence per request
            sequence_id=sequence_id,
            sequence_start=i == 0,
            sequence_end=i == len(pieces) - 1,
        )
        results.append(result)
    return results


def native_session(http_url: str, pieces: list[np.ndarray]) -> list[dict[str, Any]]:
    with httpx.Client(base_url=http_url, timeout=30) as http:
        session = http.post("/v1/sessions", json={"model": "digits-lru"}).json()["session_id"]
        return [
            http.post(f"/v1/sessions/{session}/step", json={"inputs": piece.tolist()}).json()
            for piece in pieces
        ]


@pytest.mark.parametrize("sequence_id", [4242, "trial-7"])
def test_a_sequence_equals_the_same_chunks_through_v1_sessions_bit_for_bit(
    client: triton.InferenceServerClient, http_url: str, sequence_id: int | str
) -> None:
    pieces = digit_chunks(4, seed=2)
    results = sequence_through_grpc(client, pieces, sequence_id)
    for i, result in enumerate(results):
        parameters = result.get_response().parameters
        which = "int64_param" if isinstance(sequence_id, int) else "string_param"
        assert getattr(parameters["sequence_id"], which) == sequence_id
        assert parameters["sequence_step"].int64_param == 4 * (i + 1)
    native = native_session(http_url, pieces)
    assert [step["step"] for step in native] == [4, 8, 12, 16]
    served = np.stack([r.as_numpy("probabilities")[0] for r in results])  # [4, 10] float32
    assert np.array_equal(served, np.float32([s["prediction"]["probabilities"] for s in native]))
    assert [r.as_numpy("label")[0].decode() for r in results] == [
        s["prediction"]["label"] for s in native
    ]
    # The sequence ended with its last request: continuing it is NOT_FOUND, as HTTP says.
    refused = refusal(lambda: client.infer("digits-lru", [features(pieces[0][None])],
                                           sequence_id=sequence_id))  # fmt: skip
    assert refused.status() == status(grpc.StatusCode.NOT_FOUND)
    assert "no open sequence" in refused.message() and "v2-sequence" not in refused.message()


def test_a_sequence_over_the_stream_equals_one_over_unary_calls(
    client: triton.InferenceServerClient,
) -> None:
    pieces = digit_chunks(3, seed=5)
    unary = [r.as_numpy("probabilities") for r in sequence_through_grpc(client, pieces, 901)]
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, piece in enumerate(pieces):
            client.async_stream_infer(
                "digits-lru",
                [features(piece[None])],
                sequence_id=902,
                sequence_start=i == 0,
                sequence_end=i == len(pieces) - 1,
                enable_empty_final_response=i == 1,  # asked or not, each answer is final
            )
        streamed = []
        for _ in pieces:
            result, error = answers.get(timeout=STREAM_TIMEOUT_S)
            assert error is None, error
            assert result.get_response().parameters["triton_final_response"].bool_param
            streamed.append(result.as_numpy("probabilities"))
    finally:
        client.stop_stream()
    assert all(np.array_equal(a, b) for a, b in zip(unary, streamed, strict=True))


# ---- streamed generation --------------------------------------------------------------------


def grpc_generation(
    client: triton.InferenceServerClient, prompt: str, **parameters: Any
) -> tuple[list[Any], dict[str, Any]]:
    """Token results and the final response's parameters of one streamed generation."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(LANGUAGE_MODEL, [prompts(prompt)], parameters=parameters)
        tokens = []
        while True:
            result, error = answers.get(timeout=STREAM_TIMEOUT_S)
            assert error is None, error
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param:
                final = {
                    key: getattr(value, value.WhichOneof("parameter_choice"))
                    for key, value in response.parameters.items()
                }
                return tokens, final
            tokens.append(result)
    finally:
        client.stop_stream()


def token_message(result: Any) -> dict[str, Any]:
    """A token response as the websocket's token message."""
    response = result.get_response()
    message: dict[str, Any] = {"type": "token", "index": response.parameters["index"].int64_param}
    for output in response.outputs:
        values = result.as_numpy(output.name)
        name = "id" if output.name == "prediction_id" else output.name
        if output.name == "prediction_set":
            message[name] = [v.decode() for v in values]
        elif output.datatype == "BYTES":
            message[name] = values[0].decode()
        else:
            message[name] = values[0].item()
    return message


def test_a_streamed_generation_equals_the_websocket_one_for_the_same_seed(
    client: triton.InferenceServerClient, http_url: str
) -> None:
    request = {"prompt": "def main(", "max_tokens": 16, "seed": 7, "temperature": 0.8,
               "alpha": 0.2}  # fmt: skip
    with connect(http_url.replace("http://", "ws://") + "/v1/generate") as websocket:
        websocket.send(json.dumps({"model": LANGUAGE_MODEL, **request}))
        *ws_tokens, ws_done = [json.loads(message) for message in websocket]
    assert ws_done["type"] == "done" and len(ws_tokens) == 16
    parameters = {key: value for key, value in request.items() if key != "prompt"}
    tokens, final = grpc_generation(client, request["prompt"], **parameters)
    assert len(tokens) == 16
    for ws_token, result in zip(ws_tokens, tokens, strict=True):
        served = token_message(result)
        assert served.pop("id") != ws_token.pop("id")  # every answer has its own id
        expected = {key: value for key, value in ws_token.items() if value is not None}
        assert served == expected  # tokens, probabilities (FP64) and sets, exactly
    assert final.pop("triton_final_response") is True
    assert json.loads(final.pop("warnings")) == ws_done["warnings"]
    usage = json.loads(final.pop("usage"))
    assert usage["steps"] == ws_done["usage"]["steps"]
    assert final.pop("session_id") != ws_done["session_id"]
    expected_done = {key: ws_done[key] for key in final}
    assert final == expected_done  # text, finish_reason, step, seed, calibrated, ...
    assert final["text"] == "".join(t["token"] for t in ws_tokens)


def test_a_bad_generation_request_is_answered_in_the_stream_which_goes_on(
    client: triton.InferenceServerClient,
) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(
            LANGUAGE_MODEL, [prompts("x = ")], parameters={"max_tokens": 2, "temprature": 0.5}
        )
        result, error = answers.get(timeout=STREAM_TIMEOUT_S)
        assert result is None
        assert "parameters.temprature: Extra inputs are not permitted" in error.message()
        client.async_stream_infer(LANGUAGE_MODEL, [prompts("x = ")], parameters={"max_tokens": 1})
        results = [answers.get(timeout=STREAM_TIMEOUT_S) for _ in range(2)]
        assert all(error is None for _, error in results)
        assert results[1][0].get_response().parameters["finish_reason"].string_param == "length"
    finally:
        client.stop_stream()


# ---- errors ---------------------------------------------------------------------------------


def test_errors_carry_the_grpc_status_and_the_http_message(
    client: triton.InferenceServerClient, http_url: str
) -> None:
    batch = np.stack(digit_chunks(1))
    unknown = refusal(lambda: client.infer("no-such-model", [features(batch)]))
    assert unknown.status() == status(grpc.StatusCode.NOT_FOUND)
    http = v2_json(http_url, "no-such-model", {"name": "input", "datatype": "FP32",
                                                "shape": [1], "data": [0.0]})  # fmt: skip
    assert http.status_code == 404 and unknown.message() == http.json()["error"]
    unknown_ready = refusal(lambda: client.is_model_ready("no-such-model"))  # HTTP: 404
    assert unknown_ready.status() == status(grpc.StatusCode.NOT_FOUND)

    wrong = np.zeros((1, 4, 5), dtype=np.float32)  # five features where the model takes 8
    bad = refusal(lambda: client.infer("digits-lru", [features(wrong)]))
    assert bad.status() == status(grpc.StatusCode.INVALID_ARGUMENT)
    http = v2_json(http_url, "digits-lru", {"name": "input", "datatype": "FP32",
                                            "shape": [1, 4, 5], "data": [0.0] * 20})  # fmt: skip
    assert http.status_code == 400 and bad.message() == http.json()["error"]

    outputs = [triton.InferRequestedOutput("logits")]
    unknown_output = refusal(lambda: client.infer("digits-lru", [features(batch)], outputs=outputs))
    assert unknown_output.status() == status(grpc.StatusCode.INVALID_ARGUMENT)
    assert "unknown output 'logits'" in unknown_output.message()

    alpha = refusal(
        lambda: client.infer("digits-lru", [features(batch)], parameters={"alpha": 2.0})
    )
    assert alpha.status() == status(grpc.StatusCode.INVALID_ARGUMENT)
    assert "parameters.alpha" in alpha.message()


def test_raw_contents_that_do_not_fit_the_shape_are_refused(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    request = pb.ModelInferRequest(model_name="digits-lru")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4, 8])
    request.raw_input_contents.append(np.zeros(31, dtype="<f4").tobytes())
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == (  # as HTTP answers the same binary tensor
        "inputs[0] ('input') has 124 bytes of binary data but shape [1, 4, 8] of FP32 needs 128"
    )


# ---- keys, limits and metrics ---------------------------------------------------------------

KEYS = {"alice": "alice-secret-key", "bob": "bob-secret-key"}
RATE_BURST = 4


@pytest.fixture(scope="module")
def guarded(test_repository: Any) -> Iterator[tuple[str, str]]:
    """An in-process server with API keys, a per-key rate and a 64 KiB request limit."""
    settings = Settings(
        model_repository=test_repository.root,
        **TEST_SETTINGS,
        api_keys=[f"{name}:{hash_key(key)}" for name, key in KEYS.items()],
        rate_limit_per_second=0.001,
        rate_limit_burst=RATE_BURST,
    )
    app = create_app(settings)
    with running_server(app) as base_url:
        yield base_url, f"127.0.0.1:{app.state.grpc_port}"


def test_calls_without_a_valid_key_are_unauthenticated(guarded: tuple[str, str]) -> None:
    base_url, address = guarded
    client = triton.InferenceServerClient(address)
    batch = np.stack(digit_chunks(1))
    assert client.is_server_live() and client.is_server_ready()  # open, like /v2/health/*
    missing = refusal(lambda: client.get_model_metadata("tiny-digits"))
    assert missing.status() == status(grpc.StatusCode.UNAUTHENTICATED)
    http = httpx.get(f"{base_url}/v2/models/tiny-digits")
    assert http.status_code == 401 and missing.message() == http.json()["error"]
    wrong = refusal(lambda: client.infer("tiny-digits", [features(batch)],
                                         headers={"authorization": "Bearer guess"}))  # fmt: skip
    assert wrong.status() == status(grpc.StatusCode.UNAUTHENTICATED)
    assert wrong.message() == "unknown API key"
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    # The stream is refused when it opens: the request may find it closed already.
    with contextlib.suppress(InferenceServerException):
        client.async_stream_infer("tiny-charlm", [prompts("ab")], parameters={"max_tokens": 1})
    result, error = answers.get(timeout=STREAM_TIMEOUT_S)
    client.stop_stream()
    assert result is None and error.status() == status(grpc.StatusCode.UNAUTHENTICATED)
    assert error.message() == missing.message()
    for header in ({"authorization": f"Bearer {KEYS['alice']}"}, {"x-api-key": KEYS["alice"]}):
        result = client.infer("tiny-digits", [features(batch)], headers=header)
        assert result.as_numpy("probabilities").shape == (1, 10)
    client.close()


def test_http_and_grpc_share_a_keys_request_rate(guarded: tuple[str, str]) -> None:
    base_url, address = guarded
    client = triton.InferenceServerClient(address)
    headers = {"authorization": f"Bearer {KEYS['bob']}"}
    for _ in range(RATE_BURST // 2):
        assert httpx.get(f"{base_url}/v2/models/tiny-digits", headers=headers).status_code == 200
        client.get_model_metadata("tiny-digits", headers=headers)
    refused = refusal(lambda: client.get_model_metadata("tiny-digits", headers=headers))
    assert refused.status() == status(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "request rate limit" in refused.message()
    assert httpx.get(f"{base_url}/v2/models/tiny-digits", headers=headers).status_code == 429
    client.close()


def test_a_request_over_the_size_limit_is_refused(guarded: tuple[str, str]) -> None:
    client = triton.InferenceServerClient(guarded[1])
    big = np.zeros((1, 32, 8 * 64), dtype=np.float32)  # 64 KiB of raw contents, and more
    refused = refusal(lambda: client.infer("tiny-digits", [features(big)],
                                           headers={"x-api-key": KEYS["alice"]}))  # fmt: skip
    assert refused.status() == status(grpc.StatusCode.RESOURCE_EXHAUSTED)
    client.close()


def test_grpc_requests_are_counted_under_their_protocol(guarded: tuple[str, str]) -> None:
    base_url, address = guarded
    client = triton.InferenceServerClient(address)
    client.infer("tiny-digits", [features(np.stack(digit_chunks(1)))],
                 headers={"x-api-key": KEYS["alice"]})  # fmt: skip
    refusal(lambda: client.get_model_metadata("tiny-digits"))
    client.close()
    metrics = httpx.get(f"{base_url}/metrics").text

    def count(route: str, status_code: str, model: str) -> float:
        for line in metrics.splitlines():
            if line.startswith("neuroserve_requests_total{") and all(
                f'{k}="{v}"' in line
                for k, v in (
                    ("route", route),
                    ("status", status_code),
                    ("model", model),
                    ("protocol", "grpc"),
                )  # fmt: skip
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    infer = "/inference.GRPCInferenceService/ModelInfer"
    assert count(infer, "200", "tiny-digits") >= 1
    assert count("/inference.GRPCInferenceService/ModelMetadata", "401", "") >= 1
    assert 'protocol="http"' in metrics


# ---- the endpoint's life --------------------------------------------------------------------


def test_grpc_can_be_turned_off(test_repository: Any) -> None:
    app = create_app(Settings(model_repository=test_repository.root, grpc_enabled=False))
    with running_server(app):
        assert app.state.grpc_port is None


def test_a_taken_grpc_port_stops_the_start_naming_the_settings(test_repository: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = create_app(Settings(model_repository=test_repository.root, grpc_port=port))

        async def start() -> None:
            async with app.router.lifespan_context(app):
                pass

        with pytest.raises(RuntimeError, match=rf"127\.0\.0\.1:{port} .*NEUROSERVE_GRPC_PORT"):
            asyncio.run(start())
