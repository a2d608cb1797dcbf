"""The stock Triton HTTP client (`tritonclient.http`) with its defaults — binary tensors in
both directions — against a real server: health and metadata, stateless inference agreeing
with `/v1/predict` on every built-in model (`infer`, `async_infer` and `tritonclient.http.aio`),
INT32 and BYTES inputs, every native parameter through `parameters`, Triton sequences
agreeing with the same chunks stepped through `/v1/sessions` (and restarting on
`sequence_start`), and the model configuration, repository index and statistics calls."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from models.digits import load_digits_seq
from service.api.v2_parameters import KNOWN_PARAMETERS

MODEL = "tiny-digits"
# Probabilities travel as FP32: the float64 answer rounded to float32, 2**-24 relative, and
# the same chunk run in separate processes of the same code path agrees to float32 rounding.
FP32_AGREEMENT = 1e-6


def connect(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=url.removeprefix("http://"))


@pytest.fixture
def client(server_url: str) -> Iterator[triton.InferenceServerClient]:
    triton_client = connect(server_url)
    yield triton_client
    triton_client.close()


@pytest.fixture(scope="module")
def builtin(builtin_server_url: str) -> Iterator[triton.InferenceServerClient]:
    triton_client = connect(builtin_server_url)
    yield triton_client
    triton_client.close()


def chunks(n: int, steps: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 17, size=(steps, 8)).astype(np.float32) for _ in range(n)]


def features(batch: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput("input", list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch)  # the client's default: binary data
    return tensor


def prompts(texts: list[str]) -> triton.InferInput:
    tensor = triton.InferInput("prompt", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode() for text in texts], dtype=np.object_))
    return tensor


def labels_of(result: triton.InferResult) -> list[str]:
    """Binary BYTES outputs come back as bytes (JSON ones as str)."""
    return [label.decode() for label in result.as_numpy("label").tolist()]


def v1_predict(url: str, model: str, inputs: Any, **options: Any) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{url}/v1/models/{model}/predict", json={"inputs": inputs, **options}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


# ---- metadata -------------------------------------------------------------------------------


def test_health_and_metadata_through_the_stock_client(
    client: triton.InferenceServerClient,
) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("broken")
    metadata = client.get_model_metadata(MODEL)
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, -1, 8]}]
    server = client.get_server_metadata()
    assert server["name"] == "neuroserve" and "binary_tensor_data" in server["extensions"]


def test_model_config_of_a_feature_and_a_language_model(
    client: triton.InferenceServerClient,
) -> None:
    config = client.get_model_config(MODEL)
    assert (config["name"], config["max_batch_size"]) == (MODEL, 8)  # TEST_SETTINGS
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [-1, 8]}]
    outputs = {output["name"]: output for output in config["output"]}
    assert outputs["probabilities"] == {
        "name": "probabilities",
        "data_type": "TYPE_FP32",
        "dims": [10],
    }
    assert outputs["label"]["dims"] == [1] and outputs["label"]["reshape"] == {"shape": []}
    assert outputs["set_size"]["data_type"] == "TYPE_INT32"
    assert config["sequence_batching"]["max_sequence_idle_microseconds"] == 3600 * 10**6
    assert config["parameters"]["version"] == {"string_value": "2"}
    older = client.get_model_config(MODEL, model_version="1")
    assert older["parameters"]["version"] == {"string_value": "1"}
    language = client.get_model_config("tiny-charlm")
    assert language["input"][0]["data_type"] == "TYPE_STRING"
    with pytest.raises(InferenceServerException, match="nope"):
        client.get_model_config("nope")


def test_config_index_and_statistics_parse_as_tritons_protobuf_messages(
    client: triton.InferenceServerClient,
) -> None:
    """The same dicts serve gRPC: they are the JSON form of Triton's protobuf messages."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    json_format = pytest.importorskip("google.protobuf.json_format")
    message = json_format.ParseDict(client.get_model_config(MODEL), model_config_pb2.ModelConfig())
    assert message.input[0].dims == [-1, 8] and message.max_batch_size == 8
    assert message.sequence_batching.max_sequence_idle_microseconds == 3600 * 10**6
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    index = json_format.ParseDict(
        {"models": client.get_model_repository_index()}, service_pb2.RepositoryIndexResponse()
    )
    assert {model.name for model in index.models} == {"broken", "tiny-charlm", "tiny-digits"}
    stats = json_format.ParseDict(
        client.get_inference_statistics(MODEL), service_pb2.ModelStatisticsResponse()
    )
    assert [s.version for s in stats.model_stats] == ["1", "2"]


def test_repository_index_lists_every_version_and_the_broken_one(
    client: triton.InferenceServerClient, server_url: str
) -> None:
    index = {(m["name"], m["version"]): m for m in client.get_model_repository_index()}
    assert {key: m["state"] for key, m in index.items()} == {
        ("broken", "1"): "UNAVAILABLE",
        ("tiny-charlm", "1"): "READY",
        ("tiny-digits", "1"): "READY",
        ("tiny-digits", "2"): "READY",
    }
    assert index[("broken", "1")]["reason"]
    ready = httpx.post(f"{server_url}/v2/repository/index", json={"ready": True}).json()
    assert ("broken", "1") not in {(m["name"], m["version"]) for m in ready} and len(ready) == 3


def test_statistics_count_successes_failures_and_rows(
    client: triton.InferenceServerClient,
) -> None:
    def counts() -> dict[str, Any]:
        (stats,) = client.get_inference_statistics(MODEL, model_version="1")["model_stats"]
        return stats

    before = counts()
    batch = np.stack(chunks(3, seed=9))  # [3, 4, 8]
    client.infer(MODEL, [features(batch)], model_version="1")
    client.infer(MODEL, [features(batch[:1])], model_version="1")
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [features(batch[:, :, :4])], model_version="1")  # wrong F
    after = counts()
    success, fail = after["inference_stats"]["success"], after["inference_stats"]["fail"]
    assert success["count"] - before["inference_stats"]["success"]["count"] == 2
    assert fail["count"] - before["inference_stats"]["fail"]["count"] == 1
    assert success["ns"] > before["inference_stats"]["success"]["ns"]
    assert after["inference_count"] - before["inference_count"] == 4
    assert after["execution_count"] - before["execution_count"] == 2
    assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 0
    everything = client.get_inference_statistics()["model_stats"]
    assert {(s["name"], s["version"]) for s in everything} >= {(MODEL, "1"), (MODEL, "2")}
    assert len(client.get_inference_statistics(MODEL)["model_stats"]) == 2


# ---- stateless inference with the client's defaults -----------------------------------------


def test_stateless_infer_agrees_with_v1_predict(
    client: triton.InferenceServerClient, server_url: str
) -> None:
    batch = np.stack(chunks(3, steps=6, seed=1))  # [3, 6, 8]
    result = client.infer(MODEL, [features(batch)], request_id="r1")
    expected = v1_predict(server_url, MODEL, batch.tolist())
    response = result.get_response()
    assert response["id"] == "r1"
    # No outputs named: the client asks for every output as binary data.
    assert all("binary_data_size" in output["parameters"] for output in response["outputs"])
    assert labels_of(result) == [p["label"] for p in expected]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, 10)
    np.testing.assert_allclose(
        probabilities, [p["probabilities"] for p in expected], rtol=0, atol=FP32_AGREEMENT
    )


def test_named_outputs_come_back_binary_or_json_as_asked(
    client: triton.InferenceServerClient,
) -> None:
    outputs = [
        triton.InferRequestedOutput("label"),  # default: binary
        triton.InferRequestedOutput("entropy", binary_data=False),
    ]
    result = client.infer(MODEL, [features(np.stack(chunks(2)))], outputs=outputs)
    label, entropy = result.get_response()["outputs"]
    assert "binary_data_size" in label["parameters"] and "data" not in label
    assert len(entropy["data"]) == 2
    assert result.as_numpy("entropy").dtype == np.float32


def test_int32_bool_and_bytes_inputs(client: triton.InferenceServerClient, server_url: str) -> None:
    batch = np.stack(chunks(2, seed=4))  # small integers: exact as INT32
    as_int = client.infer(MODEL, [features(batch.astype(np.int32), "INT32")])
    as_float = client.infer(MODEL, [features(batch)])
    np.testing.assert_array_equal(
        as_int.as_numpy("probabilities"), as_float.as_numpy("probabilities")
    )
    spikes = batch > 8  # [2, 4, 8] bool
    as_bool = client.infer(MODEL, [features(spikes, "BOOL")])
    as_ones = client.infer(MODEL, [features(spikes.astype(np.float32))])
    np.testing.assert_array_equal(
        as_bool.as_numpy("probabilities"), as_ones.as_numpy("probabilities")
    )
    texts = ["the cat", "a dog, then"]
    result = client.infer("tiny-charlm", [prompts(texts)])
    assert labels_of(result) == [p["label"] for p in v1_predict(server_url, "tiny-charlm", texts)]


def test_async_infer_and_the_aio_client(
    client: triton.InferenceServerClient, server_url: str
) -> None:
    batch = np.stack(chunks(2, seed=5))
    reference = client.infer(MODEL, [features(batch)])
    pending = [client.async_infer(MODEL, [features(batch)]) for _ in range(3)]
    for request in pending:
        result = request.get_result()
        np.testing.assert_array_equal(
            result.as_numpy("probabilities"), reference.as_numpy("probabilities")
        )

    async def with_aio() -> list[triton.InferResult]:
        aio = triton_aio.InferenceServerClient(url=server_url.removeprefix("http://"))
        try:
            assert await aio.is_model_ready(MODEL)
            assert (await aio.get_model_config(MODEL))["name"] == MODEL
            return await asyncio.gather(*(aio.infer(MODEL, [features(batch)]) for _ in range(2)))
        finally:
            await aio.close()

    for result in asyncio.run(with_aio()):
        np.testing.assert_array_equal(
            result.as_numpy("probabilities"), reference.as_numpy("probabilities")
        )
        assert labels_of(result) == labels_of(reference)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(
    client: triton.InferenceServerClient, server_url: str, algorithm: str
) -> None:
    batch = np.stack(chunks(2, seed=6))
    plain = client.infer(MODEL, [features(batch)])
    packed = client.infer(
        MODEL,
        [features(batch)],
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    np.testing.assert_array_equal(packed.as_numpy("probabilities"), plain.as_numpy("probabilities"))
    refused = httpx.post(
        f"{server_url}/v2/models/{MODEL}/infer",
        content=b"\x00" * 8,
        headers={"Content-Encoding": "br"},
    )
    assert refused.status_code == 400 and "'br' is not supported" in refused.json()["error"]
    broken = httpx.post(
        f"{server_url}/v2/models/{MODEL}/infer",
        content=b"not gzip",
        headers={"Content-Encoding": "gzip"},
    )
    assert broken.status_code == 400 and "not valid gzip data" in broken.json()["error"]


def test_every_builtin_model_with_the_clients_defaults(
    builtin: triton.InferenceServerClient, builtin_server_url: str
) -> None:
    images = load_digits_seq("test").inputs[:4].numpy()  # [4, 8, 8]
    for model in ("digits-lru", "digits-snn"):
        result = builtin.infer(model, [features(images)])
        expected = v1_predict(builtin_server_url, model, images.tolist())
        assert labels_of(result) == [p["label"] for p in expected], model
        masks = result.as_numpy("prediction_set")
        assert [[str(d) for d in np.flatnonzero(row)] for row in masks] == [
            p["prediction_set"] for p in expected
        ]
        assert result.as_numpy("set_size").tolist() == [p["set_size"] for p in expected]
        assert result.as_numpy("abstain").tolist() == [p["abstain"] for p in expected]
    texts = ["The quick brown ", "Hello, wor"]
    result = builtin.infer("charlm-selective", [prompts(texts)])
    expected = v1_predict(builtin_server_url, "charlm-selective", texts)
    assert labels_of(result) == [p["label"] for p in expected]
    assert result.as_numpy("set_size").tolist() == [p["set_size"] for p in expected]


# ---- parameters -----------------------------------------------------------------------------

NATIVE_OPTIONS: list[dict[str, Any]] = [
    {"alpha": 0.02},
    {"score": "aps"},
    {"score": "lac", "alpha": 0.2, "never_empty": False},
    {"class_conditional": True},
    {"max_set_size": 0},
    {"max_set_size": 3, "alpha": 0.01},
    {"backend": "onnxruntime"},
]


@pytest.mark.parametrize("options", NATIVE_OPTIONS, ids=lambda o: ",".join(map(str, o.items())))
def test_native_options_as_v2_parameters_answer_as_v1_predict(
    builtin: triton.InferenceServerClient, builtin_server_url: str, options: dict[str, Any]
) -> None:
    images = load_digits_seq("test").inputs[:32].numpy()  # [32, 8, 8]
    result = builtin.infer("digits-lru", [features(images)], parameters=options)
    expected = v1_predict(builtin_server_url, "digits-lru", images.tolist(), **options)
    masks = result.as_numpy("prediction_set")
    assert [[str(d) for d in np.flatnonzero(row)] for row in masks] == [
        p["prediction_set"] for p in expected
    ]
    assert result.as_numpy("set_size").tolist() == [p["set_size"] for p in expected]
    assert result.as_numpy("abstain").tolist() == [p["abstain"] for p in expected]
    np.testing.assert_allclose(
        result.as_numpy("probabilities"),
        [p["probabilities"] for p in expected],
        rtol=0,
        atol=FP32_AGREEMENT,
    )


def test_seed_is_accepted_with_a_warning_and_unknown_parameters_are_refused(
    client: triton.InferenceServerClient,
) -> None:
    batch = np.stack(chunks(1))
    result = client.infer(MODEL, [features(batch)], parameters={"seed": 7})
    assert "seed is ignored" in result.get_response()["parameters"]["warnings"]
    with pytest.raises(InferenceServerException) as refused:
        client.infer(MODEL, [features(batch)], parameters={"never_emtpy": False})
    assert refused.value.status() == "400"
    message = refused.value.message()
    assert "unknown parameter 'never_emtpy' (did you mean 'never_empty'?)" in message
    assert all(name in message for name in KNOWN_PARAMETERS)


# ---- sequences ------------------------------------------------------------------------------


def sequence_step(
    client: triton.InferenceServerClient, piece: np.ndarray, **kwargs: Any
) -> triton.InferResult:
    return client.infer(MODEL, [features(piece[None])], **kwargs)  # [1, T, 8]


def sequence_parameters(result: triton.InferResult) -> dict[str, Any]:
    parameters = dict(result.get_response()["parameters"])
    parameters.pop("warnings", None)  # the test models are not calibrated
    return parameters


def v1_session_steps(url: str, model: str, pieces: list[Any]) -> list[dict[str, Any]]:
    with httpx.Client(base_url=url, timeout=30) as http:
        session = http.post("/v1/sessions", json={"model": model}).json()["session_id"]
        answers = [
            http.post(f"/v1/sessions/{session}/step", json={"inputs": piece}).json()
            for piece in pieces
        ]
        http.delete(f"/v1/sessions/{session}")
    return answers


@pytest.mark.parametrize("sequence_id", [4242, "trial-7"])
def test_a_triton_sequence_equals_the_same_chunks_through_v1_sessions(
    client: triton.InferenceServerClient, server_url: str, sequence_id: int | str
) -> None:
    pieces = chunks(4, seed=2)
    through_triton = []
    for i, piece in enumerate(pieces):
        result = sequence_step(
            client,
            piece,
            sequence_id=sequence_id,
            sequence_start=i == 0,
            sequence_end=i == len(pieces) - 1,
        )
        parameters = sequence_parameters(result)
        assert parameters == {"sequence_id": sequence_id, "sequence_step": 4 * (i + 1)}
        through_triton.append(result.as_numpy("probabilities")[0])

    through_sessions = v1_session_steps(server_url, MODEL, [p.tolist() for p in pieces])
    assert [r["step"] for r in through_sessions] == [4, 8, 12, 16]
    # Bit for bit: the float32 of the session's float64 answer is what the binary output holds.
    np.testing.assert_array_equal(
        np.stack(through_triton),
        np.array([r["prediction"]["probabilities"] for r in through_sessions], dtype=np.float32),
    )
    # The sequence ended with its last request: continuing it is an error that names the
    # sequence as the client knows it, never the session behind it.
    with pytest.raises(InferenceServerException, match="no open sequence") as ended:
        sequence_step(client, pieces[0], sequence_id=sequence_id)
    assert "v2-sequence" not in ended.value.message()


def test_a_builtin_sequence_equals_v1_sessions_bit_for_bit(
    builtin: triton.InferenceServerClient, builtin_server_url: str
) -> None:
    image = load_digits_seq("test").inputs[7].numpy()  # [8, 8]
    pieces = [image[:3], image[3:5], image[5:]]
    through_triton = []
    for i, piece in enumerate(pieces):
        result = builtin.infer(
            "digits-lru",
            [features(piece[None])],
            sequence_id="builtin-1",
            sequence_start=i == 0,
            sequence_end=i == len(pieces) - 1,
        )
        through_triton.append(result)
    answers = v1_session_steps(builtin_server_url, "digits-lru", [p.tolist() for p in pieces])
    for result, answer in zip(through_triton, answers, strict=True):
        prediction = answer["prediction"]
        np.testing.assert_array_equal(
            result.as_numpy("probabilities")[0],
            np.array(prediction["probabilities"], dtype=np.float32),
        )
        mask = result.as_numpy("prediction_set")[0]
        assert [str(d) for d in np.flatnonzero(mask)] == prediction["prediction_set"]
        assert result.as_numpy("set_size")[0] == prediction["set_size"]


def test_sequence_start_on_an_open_sequence_restarts_it(
    client: triton.InferenceServerClient,
) -> None:
    first, second = chunks(2, seed=3)
    sequence_step(client, first, sequence_id=77, sequence_start=True)
    sequence_step(client, first, sequence_id=77)
    restarted = sequence_step(client, second, sequence_id=77, sequence_start=True)
    assert sequence_parameters(restarted) == {"sequence_id": 77, "sequence_step": 4}
    fresh = sequence_step(client, second, sequence_id=78, sequence_start=True, sequence_end=True)
    np.testing.assert_array_equal(
        restarted.as_numpy("probabilities"), fresh.as_numpy("probabilities")
    )
    sequence_step(client, first, sequence_id=77, sequence_end=True)  # closes it


def test_sequence_parameters_chosen_at_the_start(
    builtin: triton.InferenceServerClient, builtin_server_url: str
) -> None:
    """alpha and score are the sequence's own from its start; a request may still ask
    another alpha for its own answer; options that belong to the start are refused later."""
    image = load_digits_seq("test").inputs[3].numpy()  # [8, 8]
    start = {"alpha": 0.02, "score": "lac", "ttl_seconds": 60}
    builtin.infer("digits-lru", [features(image[None, :4])], sequence_id=9, sequence_start=True,
                  parameters=start)  # fmt: skip
    with pytest.raises(InferenceServerException, match="chosen when a sequence starts"):
        builtin.infer("digits-lru", [features(image[None, 4:])], sequence_id=9,
                      parameters={"ttl_seconds": 5})  # fmt: skip
    last = builtin.infer("digits-lru", [features(image[None, 4:])], sequence_id=9,
                         sequence_end=True, parameters={"max_set_size": 0})  # fmt: skip
    expected = v1_predict(builtin_server_url, "digits-lru", [image.tolist()], alpha=0.02,
                          score="lac", max_set_size=0)[0]  # fmt: skip
    mask = last.as_numpy("prediction_set")[0]
    assert [str(d) for d in np.flatnonzero(mask)] == expected["prediction_set"]
    assert last.as_numpy("abstain")[0] == expected["abstain"] is True  # max_set_size 0


def test_a_sequence_request_carries_one_sequence(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="one sequence"):
        client.infer(MODEL, [features(np.stack(chunks(2)))], sequence_id=5, sequence_start=True)
    # Refused before anything was created: the id is free to start.
    sequence_step(client, chunks(1)[0], sequence_id=5, sequence_start=True, sequence_end=True)


def test_early_decisions_and_every_steps_answer_as_v1_sessions(
    builtin: triton.InferenceServerClient, builtin_server_url: str
) -> None:
    """`early_decision_max_set_size` at the start and `return_steps` on a request: the same
    decisions and per-step predictions as a v1 session asked for them."""
    image = load_digits_seq("test").inputs[11].numpy()  # [8, 8]
    pieces = [image[:5], image[5:]]
    results = [
        builtin.infer(
            "digits-lru",
            [features(piece[None])],
            sequence_id="early-1",
            sequence_start=i == 0,
            sequence_end=i == 1,
            parameters={"return_steps": True}
            | ({"early_decision_max_set_size": 1} if i == 0 else {}),
        )
        for i, piece in enumerate(pieces)
    ]
    with httpx.Client(base_url=builtin_server_url, timeout=30) as http:
        opening = {"model": "digits-lru", "early_decision": {"max_set_size": 1}}
        session = http.post("/v1/sessions", json=opening).json()["session_id"]
        answers = [
            http.post(
                f"/v1/sessions/{session}/step",
                json={"inputs": piece.tolist(), "return_steps": True},
            ).json()
            for piece in pieces
        ]
    for result, answer, piece in zip(results, answers, pieces, strict=True):
        steps = answer["step_predictions"]
        assert result.as_numpy("probabilities").shape == (len(piece), 10)
        np.testing.assert_array_equal(
            result.as_numpy("probabilities"),
            np.array([p["probabilities"] for p in steps], dtype=np.float32),
        )
        assert result.as_numpy("set_size").tolist() == [p["set_size"] for p in steps]
        parameters = result.get_response()["parameters"]
        decision = answer["decision"]
        if decision is None:
            assert "decision_stop" not in parameters
            continue
        assert parameters["decision_stop"] == decision["stop"]
        assert parameters["decision_checkpoint"] == decision["checkpoint"]
        assert parameters["decision_coverage"] == decision["guaranteed_coverage"]
        assert json.loads(parameters["decision_set"]) == decision["prediction_set"]
    assert any(answer["decision"] is not None for answer in answers)


@pytest.mark.parametrize("doc", ["README.md", "docs/V2_PROTOCOL.md"])
def test_the_documented_client_examples_run(builtin_server_url: str, doc: str) -> None:
    text = (Path(__file__).resolve().parents[2] / doc).read_text()
    examples = [
        block
        for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL)
        if "tritonclient.http" in block
    ]
    assert examples, doc
    address = builtin_server_url.removeprefix("http://")
    for example in examples:
        namespace: dict[str, Any] = {"print": lambda *args: None}
        exec(example.replace("localhost:8000", address), namespace)  # noqa: S102
        assert namespace["result"].as_numpy("prediction_set").dtype == np.bool_
