"""One session plane under every protocol: a session stepped alternately through v1 REST,
V2 sequences and websocket generation answers exactly as one stepped through v1 alone, and a
step whose answer cannot be built leaves the session where it was, whichever protocol sent it.

Real uvicorn servers on loopback, real HTTP and websocket clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from models.repository import ModelRepository
from service.api.schemas.sessions import SessionStepResponse
from service.app import create_app
from service.dataplane.calibration_store import CalibrationStore
from service.settings import Settings
from tests.service.conftest import TEST_SETTINGS, publish_lru, running_server
from tests.service.test_generate_ws import calibrate_on_random_text

LM = "tiny-charlm"
DIGITS = "tiny-digits"
# V2 carries probabilities as FP32: half an ulp of float32, relative.
FP32_ROUNDING = 2.0**-24


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    repository = ModelRepository(tmp_path_factory.mktemp("plane-repository"))
    publish_lru(repository, DIGITS, seed=1)
    publish_lru(repository, LM, seed=3, task="language-model")
    calibrate_on_random_text(repository, LM)
    return repository


@pytest.fixture(scope="module")
def base_url(repository: ModelRepository) -> Iterator[str]:
    settings = Settings(model_repository=repository.root, **TEST_SETTINGS)
    with running_server(create_app(settings)) as url:
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


def rows(count: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).integers(0, 17, size=(count, 8)).astype(float).tolist()


def v1_step(http: httpx.Client, session_id: str, inputs: Any, status: int = 200) -> dict:
    answer = http.post(f"/v1/sessions/{session_id}/step", json={"inputs": inputs})
    assert answer.status_code == status, answer.text
    return answer.json()


@pytest.mark.parametrize("return_steps", [False, True])
def test_a_step_answer_is_exactly_what_its_response_model_writes(
    http: httpx.Client, return_steps: bool
) -> None:
    """The step route writes its JSON without building the pydantic models, which stay the
    schema: the answer must be what the model makes of it, field for field."""
    session = http.post("/v1/sessions", json={"model": DIGITS}).json()["session_id"]
    step = {"inputs": rows(3), "return_steps": return_steps}
    body = http.post(f"/v1/sessions/{session}/step", json=step).json()
    assert SessionStepResponse.model_validate(body).model_dump(mode="json") == body
    assert (body["step_predictions"] is not None) == return_steps


def v2_step(http: httpx.Client, row: list[float], status: int = 200, **parameters: Any) -> dict:
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8], "data": row}],
        "parameters": parameters,
    }
    answer = http.post(f"/v2/models/{DIGITS}/infer", json=body)
    assert answer.status_code == status, answer.text
    return answer.json()


def v2_probabilities(body: dict) -> list[float]:
    (output,) = [o for o in body["outputs"] if o["name"] == "probabilities"]
    return output["data"]


def generate(base_url: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    url = base_url.replace("http://", "ws://", 1) + "/v1/generate"
    with connect(url) as websocket:
        websocket.send(json.dumps(request))
        return [json.loads(message) for message in websocket]


def test_v1_and_v2_sequence_steps_of_one_session_answer_as_v1_alone(http: httpx.Client) -> None:
    sequence = rows(6, seed=4)
    reference = http.post("/v1/sessions", json={"model": DIGITS}).json()["session_id"]
    expected = [v1_step(http, reference, [row])["prediction"] for row in sequence]

    # Sequence 31 is the session "v2-sequence-31": V2 opens it, v1 and V2 take turns.
    protocols = ["v2", "v1", "v2", "v1", "v1", "v2"]
    for t, (row, protocol, want) in enumerate(zip(sequence, protocols, expected, strict=True)):
        if protocol == "v1":
            got = v1_step(http, "v2-sequence-31", [row])
            assert got["step"] == t + 1
            assert got["prediction"]["probabilities"] == want["probabilities"]
            assert got["prediction"]["label"] == want["label"]
        else:
            body = v2_step(http, row, sequence_id=31, sequence_start=t == 0)
            assert body["parameters"]["sequence_step"] == t + 1
            np.testing.assert_allclose(
                v2_probabilities(body), want["probabilities"], rtol=FP32_ROUNDING, atol=0
            )
    assert http.get("/v1/sessions/v2-sequence-31").json()["step"] == len(sequence)


def test_generation_and_v1_steps_of_one_session_answer_as_v1_alone(
    base_url: str, http: httpx.Client
) -> None:
    request = {"model": LM, "prompt": "the ", "max_tokens": 6, "temperature": 0.0, "alpha": 0.2}
    *tokens, done = generate(base_url, request)
    assert done["type"] == "done" and len(tokens) == 6

    # The same text fed through v1 to a fresh session: every answer is the one generation
    # reported for the token it emitted next.
    reference = http.post("/v1/sessions", json={"model": LM, "alpha": 0.2}).json()["session_id"]
    answer = v1_step(http, reference, "the ")["prediction"]
    for token in tokens:
        assert answer["probabilities"][token["token_id"]] == token["probability"]
        assert answer["label"] == token["top_token"] and answer["position"] == token["position"]
        assert answer["prediction_set"] == token["prediction_set"]
        answer = v1_step(http, reference, token["token"])["prediction"]

    # Generation continues the session v1 stepped, and v1 continues the generated one.
    v1_step(http, done["session_id"], "x")
    resume = {**request, "prompt": "y", "max_tokens": 2, "session_id": done["session_id"]}
    *more, resumed = generate(base_url, resume)
    v1_step(http, reference, "x")
    after = v1_step(http, reference, "y")["prediction"]
    assert after["probabilities"][more[0]["token_id"]] == more[0]["probability"]
    assert resumed["step"] == done["step"] + 1 + 1 + 2


def test_a_step_whose_answer_fails_leaves_the_session_unchanged_on_every_protocol(
    repository: ModelRepository, base_url: str, http: httpx.Client
) -> None:
    v1_session = http.post("/v1/sessions", json={"model": LM}).json()["session_id"]
    v1_step(http, v1_session, "ab")
    *_, generated = generate(base_url, {"model": LM, "prompt": "cd", "max_tokens": 1})
    json_path, _ = CalibrationStore(repository).paths(LM, "1", "torch")
    intact = json_path.read_bytes()
    json_path.write_bytes(b"{ not json")
    try:
        failed = v1_step(http, v1_session, "e", status=503)
        assert "calibration" in failed["error"]["message"]
        request = {
            "model": LM,
            "prompt": "e",
            "max_tokens": 1,
            "session_id": generated["session_id"],
        }
        with pytest.raises(ConnectionClosedError) as closed:
            generate(base_url, request)
        assert closed.value.rcvd.code == 1011 and "calibration" in closed.value.rcvd.reason
    finally:
        json_path.write_bytes(intact)
    assert http.get(f"/v1/sessions/{v1_session}").json()["step"] == 2
    assert http.get(f"/v1/sessions/{generated['session_id']}").json()["step"] == generated["step"]


def test_a_v2_sequence_step_whose_answer_fails_leaves_the_sequence_unchanged(
    tmp_path: Path,
) -> None:
    repository = ModelRepository(tmp_path / "repository")
    publish_lru(repository, DIGITS, seed=1)
    settings = Settings(model_repository=repository.root, **TEST_SETTINGS)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url) as http:
        sequence = rows(3, seed=9)
        v2_step(http, sequence[0], sequence_id="s-1", sequence_start=True)
        v2_step(http, sequence[1], sequence_id="s-1")
        # The next step's answer needs a calibration that exists but cannot be read.
        json_path, _ = CalibrationStore(repository).paths(DIGITS, "1", "torch")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text("{ not json")
        failed = v2_step(http, sequence[2], status=503, sequence_id="s-1")
        assert "calibration" in failed["error"]
        json_path.unlink()
        assert http.get("/v1/sessions/v2-sequence-s-1").json()["step"] == 2
        body = v2_step(http, sequence[2], sequence_id="s-1", sequence_end=True)
        assert body["parameters"]["sequence_step"] == 3
