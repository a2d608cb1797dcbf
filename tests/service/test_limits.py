"""Every limit over real HTTP and websockets, with its status code and a message that names
the limit's setting: body size (413), batch size, sequence length and max_tokens (422),
sessions per key and the request rate per key (429, with Retry-After), websocket message
size (close 1009) and rate (close 1008). Jobs per key: tests/service/test_auth.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed

from models.repository import ModelRepository
from service.api.auth import hash_key
from service.api.limits import OwnedCount, TokenBucket
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import TEST_SETTINGS, running_server

ALICE, BOB = "alice-key", "bob-key"
FEATURES = [[1.0] * 8] * 3  # [T=3, F=8]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_message(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


@pytest.fixture(scope="module")
def limited_url(test_repository: ModelRepository) -> Iterator[str]:
    settings = Settings(
        model_repository=test_repository.root,
        api_keys=[f"alice:{hash_key(ALICE)}", f"bob:{hash_key(BOB)}"],
        max_sessions_per_key=2,
        ws_max_message_bytes=1024,
        ws_max_messages_per_second=2,
        **TEST_SETTINGS,
    )
    with running_server(create_app(settings)) as base_url:
        yield base_url


@pytest.fixture
def http(limited_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited_url, timeout=30, headers=bearer(ALICE)) as client:
        yield client


# ---- the counting pieces --------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3.0, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)  # one token comes every 0.5 s
    clock.now += 0.5
    assert bucket.take() == 0.0
    clock.now += 100.0  # idle time saves up no more than the burst
    assert [bucket.take() for _ in range(4)][-1] > 0.0


def test_owned_counts_forget_what_lapsed() -> None:
    clock = FakeClock()
    held = OwnedCount(clock)
    held.seen("alice", "a", until=clock.now + 10)
    held.seen("alice", "b", until=clock.now + 20)
    held.seen("bob", "c")
    assert (held.count("alice"), held.count("bob")) == (2, 1)
    clock.now += 15
    assert held.count("alice") == 1
    held.gone("alice", "b")
    assert held.count("alice") == 0


# ---- request limits -------------------------------------------------------------------------


def test_an_oversized_body_is_413_naming_the_setting(http: httpx.Client) -> None:
    response = http.post("/v1/models/tiny-digits/predict", content=b"[" + b" " * 70_000 + b"]")
    assert response.status_code == 413
    assert "NEUROSERVE_MAX_REQUEST_BYTES" in error_message(response)


def test_too_many_sequences_is_422_naming_the_setting(http: httpx.Client) -> None:
    response = http.post("/v1/models/tiny-digits/predict", json={"inputs": [FEATURES] * 9})
    assert response.status_code == 422
    assert "limit is 8" in error_message(response)
    assert "NEUROSERVE_MAX_BATCH_SIZE" in error_message(response)


def test_too_long_a_sequence_is_422_naming_the_setting(http: httpx.Client) -> None:
    response = http.post("/v1/models/tiny-digits/predict", json={"inputs": [[[1.0] * 8] * 33]})
    assert response.status_code == 422
    assert "NEUROSERVE_MAX_SEQUENCE_LENGTH" in error_message(response)
    session = http.post("/v1/sessions", json={"model": "tiny-digits"}).json()["session_id"]
    step = http.post(f"/v1/sessions/{session}/step", json={"inputs": [[1.0] * 8] * 33})
    assert step.status_code == 422 and "NEUROSERVE_MAX_SEQUENCE_LENGTH" in error_message(step)
    http.delete(f"/v1/sessions/{session}")


def v2_body(sequences: int, steps: int) -> dict[str, Any]:
    shape = [sequences, steps, 8]
    return {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": shape,
                "data": [1.0] * (sequences * steps * 8),
            }
        ]
    }


@pytest.mark.parametrize(
    ("sequences", "steps", "setting"),
    [(9, 3, "NEUROSERVE_MAX_BATCH_SIZE"), (1, 33, "NEUROSERVE_MAX_SEQUENCE_LENGTH")],
)
def test_v2_tensors_meet_the_same_limits(
    http: httpx.Client, sequences: int, steps: int, setting: str
) -> None:
    """V2 hands its decoded array to the data plane as it is: the limits still apply."""
    response = http.post("/v2/models/tiny-digits/infer", json=v2_body(sequences, steps))
    assert response.status_code in (400, 422)
    assert setting in response.json()["error"]
    assert http.post("/v2/models/tiny-digits/infer", json=v2_body(8, 32)).status_code == 200


def test_too_many_tokens_is_422_naming_the_setting(http: httpx.Client) -> None:
    body = {"prompt": "ab", "max_tokens": 33}
    response = http.post("/v1/models/tiny-charlm/generate", json=body)
    assert response.status_code == 422
    assert "max_tokens is 33; the limit is 32" in error_message(response)
    assert "NEUROSERVE_MAX_SEQUENCE_LENGTH" in error_message(response)


def test_sessions_per_key_are_limited_with_429(http: httpx.Client) -> None:
    create = {"model": "tiny-digits"}
    ids = [http.post("/v1/sessions", json=create).json()["session_id"] for _ in range(2)]
    refused = http.post("/v1/sessions", json=create)
    assert refused.status_code == 429
    assert "limit of 2 live sessions" in error_message(refused)
    assert "NEUROSERVE_MAX_SESSIONS_PER_KEY" in error_message(refused)
    # Another key has its own allowance; ending a session frees one.
    other = http.post("/v1/sessions", json=create, headers=bearer(BOB))
    assert other.status_code == 201
    http.delete(f"/v1/sessions/{ids[0]}")
    again = http.post("/v1/sessions", json=create)
    assert again.status_code == 201
    for session_id in (ids[1], again.json()["session_id"]):
        http.delete(f"/v1/sessions/{session_id}")
    http.delete(f"/v1/sessions/{other.json()['session_id']}", headers=bearer(BOB))


def test_the_request_rate_per_key_is_429_with_retry_after(
    test_repository: ModelRepository,
) -> None:
    settings = Settings(
        model_repository=test_repository.root,
        api_keys=[f"alice:{hash_key(ALICE)}", f"bob:{hash_key(BOB)}"],
        rate_limit_per_second=0.5,
        rate_limit_burst=3,
        preload_models=False,
    )
    with (
        running_server(create_app(settings)) as base_url,
        httpx.Client(base_url=base_url, timeout=30) as http,
    ):
        answers = [http.get("/v1/models", headers=bearer(ALICE)) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        refused = answers[-1]
        assert refused.headers["retry-after"] == "2"  # one token every 2 s
        assert "NEUROSERVE_RATE_LIMIT_PER_SECOND" in error_message(refused)
        # Per key: bob's bucket is full; health is never limited.
        assert http.get("/v1/models", headers=bearer(BOB)).status_code == 200
        assert http.get("/v2/health/ready").status_code == 200
        v2 = http.get("/v2", headers=bearer(ALICE))
        assert v2.status_code == 429 and "NEUROSERVE_RATE_LIMIT" in v2.json()["error"]


# ---- websocket limits -----------------------------------------------------------------------


def _ws(url: str) -> Any:
    ws_url = url.replace("http://", "ws://") + "/v1/generate"
    return ws_client.connect(ws_url, additional_headers=bearer(ALICE))


def _until_closed(socket: Any) -> list[dict[str, Any]]:
    replies = []
    try:
        while True:
            replies.append(json.loads(socket.recv(timeout=30)))
    except ConnectionClosed:
        return replies


def test_an_oversized_websocket_message_is_closed_with_1009(limited_url: str) -> None:
    with _ws(limited_url) as socket:
        socket.send(json.dumps({"model": "tiny-charlm", "prompt": "a" * 2000, "max_tokens": 2}))
        replies = _until_closed(socket)
    assert socket.close_code == 1009
    assert replies[-1]["code"] == "message_too_big"
    assert "NEUROSERVE_WS_MAX_MESSAGE_BYTES" in replies[-1]["message"]


def test_a_websocket_flood_is_closed_with_1008(limited_url: str) -> None:
    with _ws(limited_url) as socket:
        socket.send(json.dumps({"model": "tiny-charlm", "prompt": "ab", "max_tokens": 32}))
        try:
            for _ in range(10):  # far over 2 a second
                socket.send("{}")
        except ConnectionClosed:
            pass  # the server may close before the client has sent them all
        replies = _until_closed(socket)
    assert socket.close_code == 1008
    assert replies[-1]["code"] == "rate_limited"  # no token after the refusal
    assert "NEUROSERVE_WS_MAX_MESSAGES_PER_SECOND" in replies[-1]["message"]
    assert all(reply["type"] == "token" for reply in replies[:-1])
