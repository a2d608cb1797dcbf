"""`POST /v1/models/{name}/predict` over real HTTP: results, agreement with the model run
in-process, batching, versions, language-model prompts, the built-in digits accuracy, and a
battery of malformed bodies that must each get a 4xx with a message."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from models.digits import load_digits_seq
from models.evaluate import final_logits
from models.repository import ModelRepository
from service.api.schemas.models import PredictResponse
from tests.service.conftest import CHAR_VOCABULARY, DIGIT_LABELS, TEST_SETTINGS

# Probabilities are computed in float64 from float32 logits; the same sequence run in a batch
# or alone may differ in the logits' last float32 bits (~1e-7 relative), no more.
FLOAT32_AGREEMENT = 1e-5


def digit_like_sequences(n: int, steps: int = 8, seed: int = 0) -> list[list[list[float]]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 17, size=(n, steps, 8)).astype(float).tolist()


def predict(client: httpx.Client, model: str, **body: Any) -> dict[str, Any]:
    response = client.post(f"/v1/models/{model}/predict", json=body)
    assert response.status_code == 200, response.text
    return exactly_as_modelled(response.json())


def exactly_as_modelled(body: dict[str, Any]) -> dict[str, Any]:
    """The route writes its JSON without the pydantic models, which stay the schema: the
    answer must be what the model makes of it, field for field."""
    assert PredictResponse.model_validate(body).model_dump(mode="json") == body
    return body


# ---- results ----------------------------------------------------------------------------------


def test_each_prediction_is_a_consistent_distribution(client: httpx.Client) -> None:
    body = predict(client, "tiny-digits", inputs=digit_like_sequences(4))
    assert (body["model"], body["version"], body["backend"]) == ("tiny-digits", "2", "torch")
    assert body["calibrated"] is False
    assert body["usage"]["sequences"] == 4
    assert body["usage"]["steps"] == 4 * 8
    assert body["usage"]["compute_seconds"] >= 0.0
    assert len({p["id"] for p in body["predictions"]}) == 4
    for prediction in body["predictions"]:
        probabilities = prediction["probabilities"]
        assert len(prediction["id"]) == 32 and int(prediction["id"], 16) >= 0
        assert len(probabilities) == len(DIGIT_LABELS)
        assert math.fsum(probabilities) == pytest.approx(1.0, abs=1e-12)
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        assert prediction["label"] == DIGIT_LABELS[best]
        assert prediction["confidence"] == probabilities[best]
        entropy = -math.fsum(p * math.log(p) for p in probabilities if p > 0)
        assert prediction["entropy"] == pytest.approx(entropy, abs=1e-9)
        assert prediction["prediction_set"] is None and prediction["set_size"] is None


def test_http_probabilities_match_the_model_run_in_process(
    client: httpx.Client, test_repository: ModelRepository
) -> None:
    inputs = digit_like_sequences(6, seed=1)
    body = predict(client, "tiny-digits", inputs=inputs)
    model = test_repository.load("tiny-digits").model
    expected = torch.softmax(final_logits(model, torch.tensor(inputs)).double(), dim=-1)
    served = torch.tensor([p["probabilities"] for p in body["predictions"]], dtype=torch.float64)
    torch.testing.assert_close(served, expected, atol=FLOAT32_AGREEMENT, rtol=0)


def test_a_batch_agrees_with_its_sequences_sent_one_by_one(client: httpx.Client) -> None:
    inputs = digit_like_sequences(5, steps=11, seed=2)
    batched = predict(client, "tiny-digits", inputs=inputs)["predictions"]
    for sequence, in_batch in zip(inputs, batched, strict=True):
        alone = predict(client, "tiny-digits", inputs=[sequence])["predictions"][0]
        assert alone["label"] == in_batch["label"]
        np.testing.assert_allclose(
            alone["probabilities"], in_batch["probabilities"], atol=FLOAT32_AGREEMENT, rtol=0
        )


def test_concurrent_requests_share_forward_passes_and_each_gets_its_own_answer(
    server_url: str, client: httpx.Client
) -> None:
    """Requests that arrive together for one model and length run as one forward pass
    (`usage.batch_size` counts the sequences in it); each answer is the one it gets alone."""
    requests = [digit_like_sequences(1 + i % 3, seed=10 + i) for i in range(24)]
    alone = [predict(client, "tiny-digits", inputs=inputs)["predictions"] for inputs in requests]

    async def send_all() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=server_url, timeout=60) as http:
            answers = await asyncio.gather(
                *(http.post("/v1/models/tiny-digits/predict", json={"inputs": x}) for x in requests)
            )
        assert all(answer.status_code == 200 for answer in answers)
        return [answer.json() for answer in answers]

    before = batch_size_histogram(client)
    together = asyncio.run(send_all())
    assert max(body["usage"]["batch_size"] for body in together) > 3  # shared passes happened
    # neuroserve_batch_size counts the shared passes, by the sequences in each.
    after = batch_size_histogram(client)
    assert after["sum"] - before["sum"] == sum(len(inputs) for inputs in requests)
    assert 1 <= after["count"] - before["count"] < len(requests)
    for inputs, body, reference in zip(requests, together, alone, strict=True):
        assert body["usage"]["sequences"] == len(inputs)
        assert body["usage"]["batch_size"] >= len(inputs)
        assert [p["label"] for p in body["predictions"]] == [p["label"] for p in reference]
        np.testing.assert_allclose(
            [p["probabilities"] for p in body["predictions"]],
            [p["probabilities"] for p in reference],
            atol=FLOAT32_AGREEMENT,
            rtol=0,
        )


def batch_size_histogram(client: httpx.Client) -> dict[str, float]:
    """tiny-digits' `neuroserve_batch_size` on the torch backend: its count and sum."""
    found = {"count": 0.0, "sum": 0.0}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.labels == {"model": "tiny-digits", "backend": "torch"}:
                kind = sample.name.removeprefix("neuroserve_batch_size_")
                if kind in found and sample.name.startswith("neuroserve_batch_size_"):
                    found[kind] = sample.value
    return found


def test_concurrent_calibrated_requests_with_mixed_options_get_their_own_sets(
    builtin_server_url: str,
) -> None:
    """Requests batched together are calibrated together when they ask the same, and apart
    when not: every answer (sets, probabilities, warnings) equals the one it gets alone."""
    options = [{}, {"alpha": 0.2}, {"score": "lac"}, {"alpha": 0.05, "score": "aps"}]
    requests = [
        {"inputs": digit_like_sequences(1 + i % 2, seed=40 + i), **options[i % len(options)]}
        for i in range(16)
    ]
    requests[3]["inputs"][0][0][0] = 1000.0  # far outside the training range: a warning
    with httpx.Client(base_url=builtin_server_url, timeout=60) as http:
        alone = [predict(http, "digits-lru", **body) for body in requests]

    async def send_all() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=builtin_server_url, timeout=60) as http:
            answers = await asyncio.gather(
                *(http.post("/v1/models/digits-lru/predict", json=body) for body in requests)
            )
        assert all(answer.status_code == 200 for answer in answers)
        return [answer.json() for answer in answers]

    together = asyncio.run(send_all())
    assert max(body["usage"]["batch_size"] for body in together) > 2  # shared passes happened
    assert alone[3]["warnings"] and not alone[2]["warnings"]
    for body, reference in zip(together, alone, strict=True):
        assert body["warnings"] == reference["warnings"]
        assert (body["calibrated"], body["alpha"]) == (reference["calibrated"], reference["alpha"])
        for served, single in zip(body["predictions"], reference["predictions"], strict=True):
            assert served["calibrated"] is True
            assert served["prediction_set"] == single["prediction_set"]
            np.testing.assert_allclose(
                served["probabilities"], single["probabilities"], atol=FLOAT32_AGREEMENT, rtol=0
            )


def test_version_selects_the_weights(client: httpx.Client) -> None:
    inputs = digit_like_sequences(3, seed=3)
    latest = predict(client, "tiny-digits", inputs=inputs)
    first = predict(client, "tiny-digits", inputs=inputs, version=1)
    first_by_text = predict(client, "tiny-digits", inputs=inputs, version="1")
    assert (latest["version"], first["version"], first_by_text["version"]) == ("2", "1", "1")
    first_probabilities = [p["probabilities"] for p in first["predictions"]]
    assert first_probabilities == [p["probabilities"] for p in first_by_text["predictions"]]
    assert first_probabilities != [p["probabilities"] for p in latest["predictions"]]


def test_language_model_predicts_the_next_character_of_each_prompt(client: httpx.Client) -> None:
    prompts = ["hello world", "a", "the cat", "xyz", "hello there"]  # three distinct lengths
    body = predict(client, "tiny-charlm", inputs=prompts)
    assert body["usage"]["steps"] == sum(len(prompt) for prompt in prompts)
    for prompt, prediction in zip(prompts, body["predictions"], strict=True):
        assert len(prediction["probabilities"]) == len(CHAR_VOCABULARY)
        assert prediction["label"] in CHAR_VOCABULARY
        alone = predict(client, "tiny-charlm", inputs=[prompt])["predictions"][0]
        np.testing.assert_allclose(
            alone["probabilities"], prediction["probabilities"], atol=FLOAT32_AGREEMENT, rtol=0
        )


def test_builtin_digits_lru_reaches_its_recorded_test_accuracy(builtin_server_url: str) -> None:
    name = "digits-lru"
    test_split = load_digits_seq("test")  # rng(0) permutation of 1797, idx[1400:]
    with httpx.Client(base_url=builtin_server_url, timeout=60) as http:
        info = http.get(f"/v1/models/{name}").json()
        correct = 0
        for start in range(0, len(test_split), 64):
            batch = test_split.inputs[start : start + 64]  # [64, 8, 8]
            response = http.post(f"/v1/models/{name}/predict", json={"inputs": batch.tolist()})
            assert response.status_code == 200, response.text
            served = [p["label"] for p in exactly_as_modelled(response.json())["predictions"]]
            truth = [info["labels"][int(y)] for y in test_split.labels[start : start + 64]]
            correct += sum(s == t for s, t in zip(served, truth, strict=True))
    accuracy = correct / len(test_split)
    # The server runs batches of 64 where the recorded figure may come from one big batch:
    # float32 reordering can flip at most a near-tie, so allow one test example.
    assert accuracy == pytest.approx(info["metrics"]["test_accuracy"], abs=1.0 / len(test_split))


# ---- malformed input: always a 4xx with a message naming the problem ---------------------------

ROW = [1.0] * 8
MAX_BATCH = TEST_SETTINGS["max_batch_size"]
MAX_STEPS = TEST_SETTINGS["max_sequence_length"]

MALFORMED_FEATURE_BODIES: list[tuple[str, Any, str]] = [
    ("missing inputs", {}, "inputs: Field required"),
    ("empty batch", {"inputs": []}, "inputs is empty"),
    ("empty sequence", {"inputs": [[]]}, "inputs[0] is empty"),
    ("empty step", {"inputs": [[[]]]}, "inputs[0][0] has 0 features"),
    ("too few features", {"inputs": [[[1.0] * 7]]}, "inputs[0][0] has 7 features"),
    ("ragged features", {"inputs": [[ROW, [1.0] * 9]]}, "inputs[0][1] has 9 features"),
    ("ragged sequences", {"inputs": [[ROW], [ROW, ROW]]}, "same number of steps"),
    ("inputs a string", {"inputs": "abc"}, "inputs must be a list"),
    ("inputs a number", {"inputs": 5}, "inputs must be a list"),
    ("inputs an object", {"inputs": {"a": 1}}, "inputs must be a list"),
    ("two dimensions", {"inputs": [ROW]}, "inputs[0][0]: Input should be a valid list"),
    ("four dimensions", {"inputs": [[[[1.0]] * 8]]}, "inputs[0][0][0]: Input should be a valid"),
    ("string feature", {"inputs": [[["1.5"] * 8]]}, "inputs[0][0][0]: Input should be a valid"),
    ("boolean feature", {"inputs": [[[True] * 8]]}, "inputs[0][0][0]: Input should be a valid"),
    ("null feature", {"inputs": [[[None] * 8]]}, "inputs[0][0][0]: Input should be a valid"),
    ("beyond float32", {"inputs": [[ROW, [1e300] + ROW[1:]]]}, "inputs[0][1][0]"),
    ("batch over the limit", {"inputs": [[ROW]] * (MAX_BATCH + 1)}, f"limit is {MAX_BATCH}"),
    ("sequence over the limit", {"inputs": [[ROW] * (MAX_STEPS + 1)]}, f"limit is {MAX_STEPS}"),
    ("alpha zero", {"inputs": [[ROW]], "alpha": 0}, "alpha: Input should be greater than 0"),
    ("alpha above one", {"inputs": [[ROW]], "alpha": 1.5}, "alpha: Input should be less than 1"),
    ("alpha a word", {"inputs": [[ROW]], "alpha": "low"}, "alpha"),
    ("unknown backend", {"inputs": [[ROW]], "backend": "quantum"}, "backend 'quantum'"),
    ("empty backend", {"inputs": [[ROW]], "backend": ""}, "backend"),
    ("unknown score", {"inputs": [[ROW]], "score": "xyz"}, "score"),
    ("misspelt field", {"inputs": [[ROW]], "alpah": 0.2}, "alpah: Extra inputs are not permitted"),
    ("boolean version", {"inputs": [[ROW]], "version": True}, "version"),
    ("list version", {"inputs": [[ROW]], "version": [1]}, "version"),
    ("body a list", [[ROW]], "Input should be a valid dictionary"),
]

MALFORMED_RAW_BODIES: list[tuple[str, bytes, str]] = [
    (
        "NaN",
        b'{"inputs": [[[NaN, 0, 0, 0, 0, 0, 0, 0]]]}',
        "inputs[0][0][0]: Input should be a finite",
    ),
    ("Infinity", b'{"inputs": [[[0, -Infinity, 0, 0, 0, 0, 0, 0]]]}', "inputs[0][0][1]"),
    ("overflowing literal", b'{"inputs": [[[0, 0, 1e999, 0, 0, 0, 0, 0]]]}', "finite"),
    ("NaN alpha", b'{"inputs": [[[0, 0, 0, 0, 0, 0, 0, 0]]], "alpha": NaN}', "alpha"),
    ("not JSON", b"inputs=1", "not valid JSON"),
    ("truncated JSON", b'{"inputs": [[[0, 0', "not valid JSON"),
    ("empty body", b"", "Field required"),
]

MALFORMED_PROMPT_BODIES: list[tuple[str, Any, str]] = [
    ("empty prompt", {"inputs": ["ab", ""]}, "inputs[1] is an empty prompt"),
    ("unknown characters", {"inputs": ["hello WORLD"]}, "'D', 'L', 'O', 'R', 'W'"),
    (
        "features to a language model",
        {"inputs": [[ROW]]},
        "inputs[0]: Input should be a valid string",
    ),
    ("prompt a bare string", {"inputs": "hello"}, "inputs must be a list"),
    ("prompt over the limit", {"inputs": ["a" * (MAX_STEPS + 1)]}, f"limit is {MAX_STEPS}"),
]


def assert_client_error(response: httpx.Response, fragment: str) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    message = response.json()["error"]["message"]
    assert fragment in message, message


@pytest.mark.parametrize(
    ("body", "fragment"),
    [pytest.param(body, fragment, id=case) for case, body, fragment in MALFORMED_FEATURE_BODIES],
)
def test_malformed_feature_inputs_get_422(client: httpx.Client, body: Any, fragment: str) -> None:
    response = client.post("/v1/models/tiny-digits/predict", json=body)
    assert response.status_code == 422
    assert_client_error(response, fragment)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [pytest.param(raw, fragment, id=case) for case, raw, fragment in MALFORMED_RAW_BODIES],
)
def test_malformed_raw_bodies_get_422(client: httpx.Client, raw: bytes, fragment: str) -> None:
    response = client.post(
        "/v1/models/tiny-digits/predict",
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422
    assert_client_error(response, fragment)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [pytest.param(body, fragment, id=case) for case, body, fragment in MALFORMED_PROMPT_BODIES],
)
def test_malformed_prompts_get_422(client: httpx.Client, body: Any, fragment: str) -> None:
    response = client.post("/v1/models/tiny-charlm/predict", json=body)
    assert response.status_code == 422
    assert_client_error(response, fragment)


def test_the_server_still_answers_after_the_malformed_battery(client: httpx.Client) -> None:
    for _case, body, _fragment in MALFORMED_FEATURE_BODIES:
        client.post("/v1/models/tiny-digits/predict", content=json.dumps(body))
    assert predict(client, "tiny-digits", inputs=[[ROW]])["predictions"][0]["label"] in DIGIT_LABELS
