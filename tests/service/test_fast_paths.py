"""The hot routes' fast path (`service.api.fast_paths`) answers exactly as FastAPI does.

Two real servers over the same built-in models and the same kind of state store, one with
the fast path and one without (NEUROSERVE_FAST_PATHS=false: everything through FastAPI), get
the same requests (session steps, predictions); their answers must agree in status and body,
apart from what differs between any two sessions or predictions (ids, expiry time, wall time
of the run). Other tests drive the middleware alone, with an app behind it that answers 599,
to show that a well-formed request is really answered by the fast path and a malformed one
is not.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from models.repository import default_repository_root
from service.api.auth import ANONYMOUS, hash_key
from service.api.fast_paths import FastPaths, HotRoute
from service.api.route_helpers import get_dataplane
from service.app import create_app, hot_routes
from service.settings import Settings
from tests.service.conftest import running_server

KEY = "fast-step-key"
ROW = [0.0, 3.0, 12.0, 16.0, 9.0, 0.0, 0.0, 0.0]
STEP_ROUTE = "/v1/sessions/{session_id}/step"


def _settings(fast: bool, redis_url: str | None, prefix: str) -> Settings:
    return Settings(
        model_repository=default_repository_root(),
        fast_paths=fast,
        api_keys=[f"tester:{hash_key(KEY)}"],
        redis_url=redis_url,
        state_store_prefix=prefix,
    )


@pytest.fixture(scope="module", params=["memory", "redis"])
def servers(request: pytest.FixtureRequest) -> Iterator[dict[bool, httpx.Client]]:
    """{fast: client} for a server with the fast path and one without, on one store kind."""
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    fast_app = create_app(_settings(True, redis_url, "fast-step-on"))
    slow_app = create_app(_settings(False, redis_url, "fast-step-off"))
    headers = {"Authorization": f"Bearer {KEY}"}
    with (
        running_server(fast_app) as fast_url,
        running_server(slow_app) as slow_url,
        httpx.Client(base_url=fast_url, headers=headers, timeout=60) as fast,
        httpx.Client(base_url=slow_url, headers=headers, timeout=60) as slow,
    ):
        yield {True: fast, False: slow}


def _open(client: httpx.Client, **options: Any) -> str:
    answer = client.post("/v1/sessions", json={"model": "digits-lru", **options})
    assert answer.status_code == 201, answer.text
    return answer.json()["session_id"]


def _comparable(answer: httpx.Response, session_id: str) -> tuple[int, Any]:
    """Status and body, without what differs between any two sessions (and predictions)."""
    try:
        body = answer.json()
    except json.JSONDecodeError:
        return answer.status_code, answer.text
    if isinstance(body, dict) and "usage" in body:
        body = {k: v for k, v in body.items() if k not in ("session_id", "expires_at")}
        body["usage"] = {k: v for k, v in body["usage"].items() if k != "compute_seconds"}
        predictions = body.get("predictions") or [body["prediction"]]
        for prediction in [*predictions, *(body.get("step_predictions") or [])]:
            del prediction["id"]  # each prediction's own, for feedback
    text = json.dumps(body, sort_keys=True)
    if session_id:
        text = text.replace(session_id, "<id>")
    return answer.status_code, json.loads(text)


def _step_both(
    servers: dict[bool, httpx.Client], ids: dict[bool, str], content: bytes, **headers: str
) -> dict[bool, tuple[int, Any]]:
    return {
        fast: _comparable(
            client.post(f"/v1/sessions/{ids[fast]}/step", content=content, headers=headers),
            ids[fast],
        )
        for fast, client in servers.items()
    }


JSON = {"Content-Type": "application/json"}


def test_well_formed_steps_get_the_same_answers(servers: dict[bool, httpx.Client]) -> None:
    ids = {fast: _open(client, alpha=0.2) for fast, client in servers.items()}
    chunks = [
        {"inputs": [ROW]},
        {"inputs": [ROW, ROW[::-1]], "return_steps": True},
        {"inputs": [[v / 2 for v in ROW]] * 3},
    ]
    for chunk in chunks:
        answers = _step_both(servers, ids, json.dumps(chunk).encode(), **JSON)
        assert answers[True][0] == 200, answers[True]
        assert answers[True] == answers[False]
    assert answers[True][1]["step"] == 6
    assert answers[True][1]["calibrated"] is True
    assert answers[True][1]["prediction"]["prediction_set"]


def test_a_session_with_early_decisions_gets_the_same_decisions(
    servers: dict[bool, httpx.Client],
) -> None:
    ids = {
        fast: _open(client, early_decision={"max_set_size": 2}) for fast, client in servers.items()
    }
    for _ in range(3):
        answers = _step_both(servers, ids, json.dumps({"inputs": [ROW]}).encode(), **JSON)
        assert answers[True] == answers[False]
        assert answers[True][1]["decision"] is not None


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"inputs": [[1, 2]]}', JSON),  # wrong number of features: the session plane refuses
        (b'{"inputs": [[1, 2, 3, 4, 5, 6, 7, 8]], "extra": 1}', JSON),  # unknown field
        (b'{"inputs": [[1, 2, 3, 4, 5, 6, 7, NaN]]}', JSON),  # JSON that only Python reads
        (b'{"inputs": ', JSON),  # malformed JSON
        (b"\xff\xfe", JSON),  # not UTF-8
        (b"[1, 2]", JSON),  # not an object
        (b"", JSON),  # no body
        (b'{"inputs": [[1, 2, 3, 4, 5, 6, 7, 8]]}', {}),  # no Content-Type
        (b'{"inputs": [[1, 2, 3, 4, 5, 6, 7, 8]]}', {"Content-Type": "text/plain"}),
        (b'{"inputs": [[1, 2, 3, 4, 5, 6, 7, 8]]}', {"Content-Type": "application/x+json"}),
    ],
)
def test_refused_and_unusual_requests_get_the_same_answers(
    servers: dict[bool, httpx.Client], content: bytes, headers: dict[str, str]
) -> None:
    ids = {fast: _open(client) for fast, client in servers.items()}
    answers = _step_both(servers, ids, content, **headers)
    assert answers[True] == answers[False]


def test_unknown_sessions_and_keys_get_the_same_answers(servers: dict[bool, httpx.Client]) -> None:
    body = json.dumps({"inputs": [ROW]}).encode()
    unknown = {fast: "no-such-session" for fast in servers}
    answers = _step_both(servers, unknown, body, **JSON)
    assert answers[True][0] == 404 and answers[True] == answers[False]
    ids = {fast: _open(client) for fast, client in servers.items()}
    answers = _step_both(servers, ids, body, **JSON, Authorization="Bearer wrong")
    assert answers[True][0] == 401 and answers[True] == answers[False]


def _step_count(client: httpx.Client, status: str) -> float:
    text = client.get("/metrics").text
    pattern = re.compile(r"^neuroserve_requests_total\{(.*)\} (\S+)$", re.MULTILINE)
    total = 0.0
    for labels, value in pattern.findall(text):
        # The registry is the process's: other tests' steps (other models) are in it too. A
        # 200 counts only under this test's model, so a step labelled wrongly does not count.
        model_matches = 'model="digits-lru"' in labels or status != "200"
        if f'route="{STEP_ROUTE}"' in labels and f'status="{status}"' in labels and model_matches:
            total += float(value)
    return total


def test_the_fast_path_is_counted_like_the_route(servers: dict[bool, httpx.Client]) -> None:
    fast = servers[True]
    session_id = _open(fast)
    before = _step_count(fast, "200"), _step_count(fast, "404")
    assert fast.post(f"/v1/sessions/{session_id}/step", json={"inputs": [ROW]}).status_code == 200
    assert fast.post("/v1/sessions/gone/step", json={"inputs": [ROW]}).status_code == 404
    assert (_step_count(fast, "200"), _step_count(fast, "404")) == (before[0] + 1, before[1] + 1)


def _predict_both(servers: dict[bool, httpx.Client], body: dict) -> dict[bool, tuple[int, Any]]:
    return {
        fast: _comparable(client.post("/v1/models/digits-lru/predict", json=body), "")
        for fast, client in servers.items()
    }


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": [[ROW] * 8, [ROW[::-1]] * 5]},
        {"inputs": [[ROW] * 8], "alpha": 0.05, "score": "lac", "max_set_size": 1},
        {"inputs": [[ROW] * 8], "seed": 3},  # answered with a warning
        {"inputs": [[ROW] * 8], "backend": "nope"},  # refused by the data plane
        {"inputs": [[ROW] * 8], "alpha": 2},  # refused by the schema
    ],
)
def test_predictions_get_the_same_answers(servers: dict[bool, httpx.Client], body: dict) -> None:
    answers = _predict_both(servers, body)
    assert answers[True] == answers[False]


def test_unknown_models_get_the_same_answers(servers: dict[bool, httpx.Client]) -> None:
    answers = {
        fast: _comparable(client.post("/v1/models/nope/predict", json={"inputs": [[ROW]]}), "")
        for fast, client in servers.items()
    }
    assert answers[True][0] == 404 and answers[True] == answers[False]


def _v2_comparable(answer: httpx.Response) -> tuple[int, Any]:
    """Status and body of a V2 answer, without the prediction ids (each answer's own)."""
    body = answer.json()
    if isinstance(body, dict) and "outputs" in body:
        body["outputs"] = [o for o in body["outputs"] if o["name"] != "prediction_id"]
    return answer.status_code, body


V2_DIGIT = {"name": "input", "datatype": "FP32", "shape": [1, 8, 8], "data": [ROW] * 8}


@pytest.mark.parametrize(
    "body",
    [
        {"id": "a", "inputs": [V2_DIGIT]},
        {"inputs": [V2_DIGIT], "parameters": {"alpha": 0.05, "score": "lac", "max_set_size": 1}},
        {"inputs": [V2_DIGIT], "parameters": {"seed": 3}},  # answered with a warning
        {"inputs": [V2_DIGIT], "parameters": {"backend": "nope"}},  # 400 from the data plane
        {"inputs": [V2_DIGIT], "parameters": {"alpah": 0.1}},  # 400: unknown parameter
        {"inputs": [V2_DIGIT], "outputs": [{"name": "label", "parameters": {"binary_data": True}}]},
        {"inputs": [{**V2_DIGIT, "shape": [1, 4, 8]}]},  # 400: data longer than the shape
        {"inputs": "nope"},  # 400 from the schema (the route answers it)
    ],
)
def test_v2_inference_gets_the_same_answers(servers: dict[bool, httpx.Client], body: dict) -> None:
    answers = {}
    for fast, client in servers.items():
        answer = client.post("/v2/models/digits-lru/infer", json=body)
        if "Inference-Header-Content-Length" in answer.headers:
            length = int(answer.headers["Inference-Header-Content-Length"])
            answers[fast] = (answer.status_code, json.loads(answer.content[:length]))
        else:
            answers[fast] = _v2_comparable(answer)
    assert answers[True] == answers[False]


def test_a_v2_sequence_gets_the_same_answers(servers: dict[bool, httpx.Client]) -> None:
    answers: dict[bool, list] = {True: [], False: []}
    for fast, client in servers.items():
        for i in range(3):
            parameters = {
                "sequence_id": "fast-v2",
                "sequence_start": i == 0,
                "sequence_end": i == 2,
            }
            request = {"inputs": [{**V2_DIGIT, "shape": [1, 1, 8], "data": ROW}]}
            answer = client.post(
                "/v2/models/digits-lru/versions/1/infer", json={**request, "parameters": parameters}
            )
            answers[fast].append(_v2_comparable(answer))
    assert [status for status, _ in answers[True]] == [200, 200, 200]
    assert answers[True] == answers[False]


# ---- the middleware alone -----------------------------------------------------------------


def _call(fast_paths: FastPaths, app: Any, path: str, body: bytes) -> int:
    """Send one POST through `fast_paths` (inside a running event loop); its status."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "app": app,
        "state": {"principal": ANONYMOUS},
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async def run() -> None:
        await fast_paths(scope, receive, send)

    return run, sent


def test_the_fast_path_answers_well_formed_requests_itself() -> None:
    app = create_app(Settings(model_repository=default_repository_root()))
    reached: list[str] = []

    async def behind(scope: dict, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 599, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    fast_paths = FastPaths(behind, routes=hot_routes())

    async def status(path: str, body: bytes) -> int:
        run, sent = _call(fast_paths, app, path, body)
        await run()
        return sent[0]["status"]

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            info = await app.state.sessions.create(model="digits-lru")
            step = f"/v1/sessions/{info.session_id}/step"
            assert await status(step, json.dumps({"inputs": [ROW]}).encode()) == 200
            predict = "/v1/models/digits-lru/predict"
            assert await status(predict, json.dumps({"inputs": [[ROW] * 8]}).encode()) == 200
            infer = "/v2/models/digits-lru/infer"
            digit = {"name": "input", "datatype": "FP32", "shape": [1, 1, 8], "data": ROW}
            assert await status(infer, json.dumps({"inputs": [digit]}).encode()) == 200
            assert reached == []
            assert await status(step, b'{"inputs": [[1]], "typo": 1}') == 599
            assert await status(predict, b'{"inputs": [], "typo": 1}') == 599
            assert await status("/v1/sessions", b'{"model": "digits-lru"}') == 599
            assert await status(infer, b'{"inputs": [], "outputs": 3}') == 599
            assert reached == [step, predict, "/v1/sessions", infer]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("method", "path", "root_path", "expected"),
    [
        ("POST", "/v1/sessions/abc/step", "", {"session_id": "abc"}),
        ("POST", "/api/v1/sessions/abc/step", "/api", {"session_id": "abc"}),
        ("GET", "/v1/sessions/abc/step", "", None),
        ("POST", "/v1/sessions/abc/step/", "", None),
        ("POST", "/v1/sessions/a/b/step", "", None),
        ("POST", "/v1/sessions//step", "", None),
        ("POST", "/v1/sessions/abc", "", None),
        ("POST", "/v2/sessions/abc/step", "", None),
    ],
)
def test_a_hot_route_matches_its_own_paths_only(
    method: str, path: str, root_path: str, expected: dict | None
) -> None:
    (step,) = [HotRoute.of(r) for r in hot_routes() if r.path.endswith("/step")]
    scope = {"type": "http", "method": method, "path": path, "root_path": root_path}
    assert step.path_params(scope) == expected


def test_an_endpoint_with_dependencies_cannot_be_hot() -> None:
    router = APIRouter()

    class Body(BaseModel):
        x: int

    @router.post("/things/{name}")
    async def with_dependency(
        name: str, body: Body, request: Request, dataplane: Any = get_dataplane
    ) -> Response:
        return Response()

    with pytest.raises(ValueError, match="takes exactly"):
        HotRoute.of(router.routes[0])
