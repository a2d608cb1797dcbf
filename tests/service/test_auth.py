"""API keys over real HTTP and websockets: keys required when configured, 401 for a missing
or unknown key, tenant isolation (another key's sessions, sequences and jobs are 404),
admin-only fine-tuning (403), open health and metrics, and the open-mode warnings.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed, InvalidStatus

from models.repository import ModelRepository
from service.api.auth import KeyRing, hash_key, parse_key_entry
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import TEST_SETTINGS, running_server
from tests.service.test_jobs import JOB_TIMEOUT_S, long_spec, publish_test_models

ALICE, BOB, ROOT, OPS = "alice-key", "bob-key", "root-key", "ops-key"
FEATURES = [[1.0] * 8] * 3  # [T=3, F=8]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keyed_settings(root: Any, **overrides: Any) -> Settings:
    return Settings(
        model_repository=root,
        api_keys=[f"alice:{hash_key(ALICE)}", hash_key(BOB)],
        admin_api_keys=[f"root:{hash_key(ROOT)}", f"ops:{hash_key(OPS)}"],
        **{**TEST_SETTINGS, **overrides},
    )


@pytest.fixture(scope="module")
def keyed_url(test_repository: ModelRepository) -> Iterator[str]:
    with running_server(create_app(keyed_settings(test_repository.root))) as base_url:
        yield base_url


@pytest.fixture
def http(keyed_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=keyed_url, timeout=30) as client:
        yield client


# ---- the key ring ---------------------------------------------------------------------------


def test_a_key_is_stored_as_its_sha256_digest() -> None:
    assert hash_key("secret") == hashlib.sha256(b"secret").hexdigest()
    entry = parse_key_entry(f"alice:{hash_key('secret')}", admin=False)
    assert (entry.name, entry.digest, entry.admin) == ("alice", hash_key("secret"), False)
    bare = parse_key_entry(hash_key("secret").upper(), admin=True)
    assert bare.name == "key-" + hash_key("secret")[:16] and bare.admin


@pytest.mark.parametrize("entry", ["secret", "alice:1234", "bad name:" + "0" * 64, ""])
def test_a_malformed_key_entry_is_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="digest|name"):
        parse_key_entry(entry, admin=False)


def test_a_malformed_key_setting_is_a_settings_error() -> None:
    with pytest.raises(ValueError, match="hash-key"):
        Settings(api_keys="not-a-digest")


def test_keys_from_the_environment_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEUROSERVE_API_KEYS", f"a:{hash_key('x')}, {hash_key('y')}")
    assert Settings().api_keys == [f"a:{hash_key('x')}", hash_key("y")]


def test_verify_compares_every_digest_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = KeyRing([f"alice:{hash_key(ALICE)}", hash_key(BOB)], [f"root:{hash_key(ROOT)}"])
    compared: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def counting_compare(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting_compare)
    principal = ring.verify(ALICE)
    assert principal is not None and principal.name == "alice" and not principal.admin
    # The match is the first digest, yet all three are compared: no early exit to time.
    assert len(compared) == 3
    assert all(a == hash_key(ALICE).encode() for a, _ in compared)
    assert ring.verify(ROOT) == type(principal)(name="root", admin=True)
    assert ring.verify("wrong") is None and ring.verify(None) is None
    assert ring.verify(hash_key(ALICE)) is None  # the digest itself is not a key


# ---- keys over HTTP -------------------------------------------------------------------------


def test_a_missing_key_is_401_with_www_authenticate(http: httpx.Client) -> None:
    response = http.get("/v1/models")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthorized"
    assert "Authorization: Bearer" in response.json()["error"]["message"]


def test_an_unknown_key_is_401(http: httpx.Client) -> None:
    for headers in (bearer("guess"), {"X-API-Key": "guess"}, {"Authorization": "Basic eDp5"}):
        response = http.get("/v1/models", headers=headers)
        assert response.status_code == 401, headers
        assert "www-authenticate" in response.headers


def test_either_header_carries_a_key(http: httpx.Client) -> None:
    assert http.get("/v1/models", headers=bearer(ALICE)).status_code == 200
    assert http.get("/v1/models", headers={"X-API-Key": BOB}).status_code == 200


def test_v2_routes_need_a_key_and_answer_in_v2_format(http: httpx.Client) -> None:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8],
                        "data": [1.0] * 24}]}  # fmt: skip
    refused = http.post("/v2/models/tiny-digits/infer", json=body)
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    assert http.get("/v2").status_code == 401
    answered = http.post("/v2/models/tiny-digits/infer", json=body, headers=bearer(ALICE))
    assert answered.status_code == 200


def test_health_and_metrics_stay_open(http: httpx.Client) -> None:
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get("/metrics").status_code == 200


# ---- tenancy --------------------------------------------------------------------------------


def test_another_keys_session_is_404_on_every_route(http: httpx.Client) -> None:
    created = http.post("/v1/sessions", json={"model": "tiny-digits"}, headers=bearer(ALICE))
    assert created.status_code == 201
    session_id = created.json()["session_id"]
    path = f"/v1/sessions/{session_id}"
    step = {"inputs": FEATURES}
    assert http.get(path, headers=bearer(BOB)).status_code == 404
    assert http.post(f"{path}/step", json=step, headers=bearer(BOB)).status_code == 404
    assert http.delete(path, headers=bearer(BOB)).status_code == 404
    # The owner's session is untouched by all that.
    stepped = http.post(f"{path}/step", json=step, headers=bearer(ALICE))
    assert stepped.status_code == 200 and stepped.json()["step"] == 3
    assert http.delete(path, headers=bearer(ALICE)).status_code == 204


def test_another_keys_prediction_takes_no_feedback(http: httpx.Client) -> None:
    """A prediction id, from /predict or a session step, answers feedback only to its key."""
    predicted = http.post(
        "/v1/models/tiny-digits/predict", json={"inputs": [FEATURES]}, headers=bearer(ALICE)
    )
    assert predicted.status_code == 200
    session = http.post("/v1/sessions", json={"model": "tiny-digits"}, headers=bearer(ALICE))
    stepped = http.post(
        f"/v1/sessions/{session.json()['session_id']}/step",
        json={"inputs": FEATURES},
        headers=bearer(ALICE),
    )
    assert stepped.status_code == 200
    for prediction in (predicted.json()["predictions"][0], stepped.json()["prediction"]):
        label = {"prediction_id": prediction["id"], "label": prediction["label"]}
        other = http.post("/v1/feedback", json=label, headers=bearer(BOB))
        assert other.status_code == 404, other.text
        own = http.post("/v1/feedback", json=label, headers=bearer(ALICE))
        assert own.status_code == 200, own.text
        assert own.json()["correct"] is True


def test_another_keys_generation_session_is_404(http: httpx.Client) -> None:
    body = {"prompt": "ab", "max_tokens": 2}
    first = http.post("/v1/models/tiny-charlm/generate", json=body, headers=bearer(ALICE))
    assert first.status_code == 200
    follow = {**body, "session_id": first.json()["session_id"]}
    other = http.post("/v1/models/tiny-charlm/generate", json=follow, headers=bearer(BOB))
    assert other.status_code == 404
    own = http.post("/v1/models/tiny-charlm/generate", json=follow, headers=bearer(ALICE))
    assert own.status_code == 200


def test_v2_sequences_are_per_key(http: httpx.Client) -> None:
    def infer(key: str, **parameters: Any) -> httpx.Response:
        body = {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 1, 8], "data": [1.0] * 8}
            ],
            "parameters": {"sequence_id": "shared-name", **parameters},
        }
        return http.post("/v2/models/tiny-digits/infer", json=body, headers=bearer(key))

    assert infer(ALICE, sequence_start=True).status_code == 200
    assert infer(BOB).status_code == 404  # alice's sequence is not bob's
    assert infer(BOB, sequence_start=True).status_code == 200  # the same name, his own
    assert infer(ALICE, sequence_end=True).json()["parameters"]["sequence_step"] == 2
    assert infer(BOB, sequence_end=True).json()["parameters"]["sequence_step"] == 2


# ---- websockets -----------------------------------------------------------------------------


def _generate_ws(url: str, message: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    ws_url = url.replace("http://", "ws://") + "/v1/generate"
    with ws_client.connect(ws_url, additional_headers=headers or {}) as socket:
        socket.send(json.dumps(message))
        replies = []
        try:
            while True:
                replies.append(json.loads(socket.recv(timeout=30)))
        except ConnectionClosed:
            pass
        return replies, socket.close_code


def test_a_websocket_authenticates_by_header_or_first_message(keyed_url: str) -> None:
    request = {"model": "tiny-charlm", "prompt": "ab", "max_tokens": 2}
    replies, code = _generate_ws(keyed_url, request, bearer(ALICE))
    assert code == 1000 and replies[-1]["type"] == "done"
    replies, code = _generate_ws(keyed_url, {**request, "api_key": BOB})
    assert code == 1000 and replies[-1]["type"] == "done"


def test_a_websocket_without_a_valid_key_is_refused(keyed_url: str) -> None:
    request = {"model": "tiny-charlm", "prompt": "ab", "max_tokens": 2}
    replies, code = _generate_ws(keyed_url, request)
    assert code == 1008 and replies == [
        {"type": "error", "code": "unauthorized", "message": replies[0]["message"]}
    ]
    assert "API key" in replies[0]["message"]
    replies, code = _generate_ws(keyed_url, {**request, "api_key": "guess"})
    assert code == 1008 and replies[0]["message"] == "unknown API key"
    with pytest.raises(InvalidStatus) as refused:  # a wrong header fails the handshake
        _generate_ws(keyed_url, request, bearer("guess"))
    assert refused.value.response.status_code == 403


# ---- fine-tuning: admin keys, and jobs per key ----------------------------------------------


@pytest.fixture(scope="module")
def jobs_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    repository = ModelRepository(tmp_path_factory.mktemp("auth-jobs"))
    publish_test_models(repository)
    settings = keyed_settings(repository.root, max_jobs_per_key=1, max_request_bytes=4 << 20)
    with running_server(create_app(settings)) as base_url:
        yield base_url


def test_fine_tuning_needs_an_admin_key_and_jobs_belong_to_their_key(jobs_url: str) -> None:
    with httpx.Client(base_url=jobs_url, timeout=JOB_TIMEOUT_S) as http:
        refused = http.post("/v1/finetune/jobs", json=long_spec(), headers=bearer(ALICE))
        assert refused.status_code == 403
        assert "NEUROSERVE_ADMIN_API_KEYS" in refused.json()["error"]["message"]

        submitted = http.post("/v1/finetune/jobs", json=long_spec(), headers=bearer(ROOT))
        assert submitted.status_code == 202
        path = f"/v1/finetune/jobs/{submitted.json()['job_id']}"
        try:
            assert http.get(path, headers=bearer(ROOT)).status_code == 200
            assert http.get(path, headers=bearer(OPS)).status_code == 404  # another admin
            assert http.get(path, headers=bearer(ALICE)).status_code == 404
            assert http.delete(path, headers=bearer(OPS)).status_code == 404
            assert http.delete(path, headers=bearer(ALICE)).status_code == 403

            second = http.post("/v1/finetune/jobs", json=long_spec(), headers=bearer(ROOT))
            assert second.status_code == 429
            assert "NEUROSERVE_MAX_JOBS_PER_KEY" in second.json()["error"]["message"]
        finally:
            assert http.delete(path, headers=bearer(ROOT)).status_code in (200, 202)


# ---- open mode ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", "the server is open"), ("0.0.0.0", "ANYONE ON THE NETWORK")],
)
def test_a_server_without_keys_warns_that_it_is_open(
    test_repository: ModelRepository,
    caplog: pytest.LogCaptureFixture,
    host: str,
    expected: str,
) -> None:
    settings = Settings(model_repository=test_repository.root, host=host, preload_models=False)
    with (
        caplog.at_level(logging.WARNING, logger="neuroserve.auth"),
        running_server(create_app(settings)) as base_url,
    ):
        # Open: every route answers without a key.
        assert httpx.get(f"{base_url}/v1/models", timeout=30).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "neuroserve.auth"]
    assert any(expected in message for message in warnings), warnings
