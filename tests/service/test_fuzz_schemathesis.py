"""Fuzzing a real server: schemathesis over every route of the OpenAPI schema, hypothesis over
the generation websocket's messages and malformed V2 inference requests.

The server is uvicorn on loopback serving two small untrained models with its own private
redis-server for sessions and the job queue (no worker runs, so a fine-tuning job that passes
validation only waits in the queue). Nothing may answer 5xx, and every answer must match the
schema: status code, content type, body and headers. The example counts keep the whole file
well under a minute and a half on two cores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from models.repository import ModelRepository
from service.app import create_app
from service.settings import Settings
from tests.conftest import RedisProcesses
from tests.service.conftest import TEST_SETTINGS, publish_lru, running_server

pytestmark = pytest.mark.redis

EXAMPLES_PER_OPERATION = 20
WEBSOCKET_EXAMPLES = 40
V2_EXAMPLES = 60


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,  # a real server on shared cores: timing is not what is tested
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
        derandomize=True,  # the same examples every run, so the suite is reproducible
        database=None,
    )


@pytest.fixture(scope="module")
def fuzz_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    repository = ModelRepository(tmp_path_factory.mktemp("fuzz-repository"))
    publish_lru(repository, "tiny-digits", seed=1)
    publish_lru(repository, "tiny-charlm", seed=3, task="language-model")
    servers = RedisProcesses(tmp_path_factory.mktemp("fuzz-redis"))
    try:
        redis_url = f"redis://127.0.0.1:{servers.start()}/0"
        app_settings = Settings(
            model_repository=repository.root,
            redis_url=redis_url,
            job_queue_url=redis_url,
            **TEST_SETTINGS,
        )
        with running_server(create_app(app_settings)) as base_url:
            yield base_url
    finally:
        servers.stop_all()


# The schema of the app as built (settings do not change its routes); the cases run against the
# live server. (schemathesis' lazy `from_fixture` loading does not work with pytest 9.)
schema = schemathesis.openapi.from_dict(create_app(Settings(**TEST_SETTINGS)).openapi())


@schema.parametrize()
@fuzz_settings(EXAMPLES_PER_OPERATION)
def test_every_route_answers_within_its_schema_and_never_5xx(
    fuzz_server_url: str, case: schemathesis.Case
) -> None:
    response = case.call(base_url=fuzz_server_url, timeout=30)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text}"
    case.validate_response(
        response,
        checks=[
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            response_headers_conformance,
        ],
    )


# ---- the generation websocket ---------------------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=6,
)
GENERATE_FIELDS = {
    "model": st.sampled_from(["tiny-charlm", "tiny-digits", "nope", ""]) | JSON_SCALARS,
    "prompt": st.text(alphabet="abc xyz", max_size=5) | JSON_VALUES,
    "max_tokens": st.integers(-2, 6) | JSON_SCALARS,
    "temperature": st.floats(allow_nan=True) | JSON_SCALARS,
    "alpha": st.floats(-1, 2) | JSON_SCALARS,
    "seed": st.integers() | JSON_SCALARS,
    "session_id": st.text(max_size=8) | JSON_SCALARS,
    "stop": st.lists(st.text(max_size=3), max_size=2) | JSON_SCALARS,
}
GENERATE_MESSAGES = (
    st.fixed_dictionaries({}, optional=GENERATE_FIELDS).map(json.dumps)
    | JSON_VALUES.map(json.dumps)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)


@fuzz_settings(WEBSOCKET_EXAMPLES)
@given(message=GENERATE_MESSAGES)
# An error message longer than a close frame's reason can hold once encoded (UTF-8).
@example(message=json.dumps({"model": "ü" * 80, "prompt": "a", "max_tokens": 2}))
def test_any_first_websocket_message_gets_tokens_or_a_clean_error(
    fuzz_server_url: str, message: str | bytes
) -> None:
    ws_url = fuzz_server_url.replace("http://", "ws://") + "/v1/generate"
    with connect(ws_url, open_timeout=30) as websocket:
        websocket.send(message)
        replies = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                replies.append(json.loads(websocket.recv(timeout=30)))
    close = closed.value.rcvd
    assert close is not None, "the server dropped the connection without a close frame"
    last = replies[-1] if replies else None
    if close.code == 1008:  # refused: exactly one error message that says why
        assert len(replies) == 1 and last["type"] == "error" and last["message"], replies
    else:
        assert close.code == 1000, (close, replies)
        assert last is not None and last["type"] == "done", replies


# ---- malformed V2 inference -----------------------------------------------------------------

V2_TENSOR = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["INPUT", "PROMPT", "x"]) | JSON_SCALARS,
        "shape": st.lists(st.integers(-2, 9), max_size=4) | JSON_VALUES,
        "datatype": st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "BOOL", "FP16", "nope"])
        | JSON_SCALARS,
        "data": st.lists(st.floats() | st.integers() | st.booleans(), max_size=20) | JSON_VALUES,
        "parameters": st.dictionaries(st.text(max_size=12), JSON_SCALARS, max_size=3),
    },
)
V2_REQUESTS = st.fixed_dictionaries(
    {},
    optional={
        "id": JSON_SCALARS,
        "inputs": st.lists(V2_TENSOR, max_size=2) | JSON_VALUES,
        "outputs": st.lists(st.fixed_dictionaries({"name": JSON_SCALARS}), max_size=2)
        | JSON_VALUES,
        "parameters": st.dictionaries(st.text(max_size=12), JSON_SCALARS, max_size=3),
    },
)


@fuzz_settings(V2_EXAMPLES)
@given(body=V2_REQUESTS, model=st.sampled_from(["tiny-digits", "tiny-charlm"]))
def test_malformed_v2_inference_is_a_clean_4xx_in_the_v2_format(
    fuzz_server_url: str, body: dict[str, Any], model: str
) -> None:
    response = httpx.post(f"{fuzz_server_url}/v2/models/{model}/infer", json=body, timeout=30)
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert 400 <= response.status_code < 500
        error = response.json()
        assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"]


@pytest.mark.parametrize("body", [b"", b"[", b"null", b"[]", b"\xff\xfe", b'{"inputs": {}}'])
def test_v2_bodies_that_are_not_a_request_object_are_400(fuzz_server_url: str, body: bytes) -> None:
    response = httpx.post(
        f"{fuzz_server_url}/v2/models/tiny-digits/infer",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]
