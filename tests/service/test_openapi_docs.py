"""The OpenAPI schema tells the truth: every operation is described and has examples, the
examples work against the built-in models, and every documented error response has the shape
of a real error that a real request gets from a real server.

Servers: uvicorn on loopback serving a copy of the built-in models plus small test models (an
uncalibrated classifier and language model, a model with corrupted weights), with API keys,
per-key quotas and a private redis-server for sessions, feedback and the job queue (no worker
runs: submitted jobs wait in the queue). A second server's redis-server is stopped once it is
up, for the 503s of an unreachable state store; a third allows each key one request, for the
429s of the request rate.

Adding a route: give it `summary=`, a docstring, `openapi_examples` for its body and
parameters (`service.api.schemas`), and `responses=` for each error it answers
(`service.api.route_helpers.error_doc`); a new error status in a route family needs a real
failing request in ERROR_CASES below.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from jsonschema import Draft202012Validator

from models.repository import WEIGHTS_FILE, ModelRepository, default_repository_root
from service.api.auth import hash_key
from service.app import create_app
from service.settings import Settings
from tests.conftest import RedisProcesses
from tests.service.conftest import publish_lru, running_server

pytestmark = pytest.mark.redis

USER, ADMIN, CROWDED = "docs-user-key", "docs-admin-key", "docs-crowded-key"
SESSIONS_PER_KEY = 20
JOBS_PER_KEY = 5  # the examples hold up to 4 jobs of the admin key at once
MAX_REQUEST_BYTES = 64 * 1024
TOO_LARGE_BODY = b'{"inputs": "' + b"x" * MAX_REQUEST_BYTES + b'"}'
DIGIT_ROWS = [[0.0, 3.0, 12.0, 16.0, 9.0, 0.0, 0.0, 0.0]] * 4  # [T=4, F=8]


def key(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


BUILTIN_MODELS = {path.name for path in default_repository_root().iterdir() if path.is_dir()}
APP = create_app(Settings())
SCHEMA = APP.openapi()
OPERATIONS = [
    (path, method, operation)
    for path, operations in SCHEMA["paths"].items()
    for method, operation in operations.items()
]


SCHEMA_COMPONENTS = {"components": SCHEMA["components"]}  # so "#/components/..." refs resolve


def operation_id(path: str, method: str) -> str:
    return f"{method.upper()} {path}"


# ---- servers --------------------------------------------------------------------------------


def docs_settings(root: Any, redis_url: str, **overrides: Any) -> Settings:
    return Settings(
        model_repository=root,
        redis_url=redis_url,
        job_queue_url=redis_url,
        api_keys=[f"user:{hash_key(USER)}"],
        admin_api_keys=[f"admin:{hash_key(ADMIN)}", f"crowded:{hash_key(CROWDED)}"],
        max_sessions_per_key=SESSIONS_PER_KEY,
        max_jobs_per_key=JOBS_PER_KEY,
        max_active_jobs=100,
        max_request_bytes=MAX_REQUEST_BYTES,
        store_check_seconds=0.2,
        **overrides,
    )


@pytest.fixture(scope="module")
def docs_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """The built-in models, an uncalibrated classifier and language model, a broken model."""
    root = tmp_path_factory.mktemp("docs-repository")
    builtin = default_repository_root()
    for model in builtin.iterdir():
        if model.is_dir():
            shutil.copytree(model, root / model.name)
    repository = ModelRepository(root)
    publish_lru(repository, "tiny-digits", seed=1)
    publish_lru(repository, "tiny-charlm", seed=3, task="language-model")
    publish_lru(repository, "broken", seed=4)
    weights = repository.version_path("broken", "1") / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    return repository


@pytest.fixture(scope="module")
def docs_server(
    docs_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    redis = RedisProcesses(tmp_path_factory.mktemp("docs-redis"))
    try:
        url = f"redis://127.0.0.1:{redis.start()}/0"
        with running_server(create_app(docs_settings(docs_repository.root, url))) as base_url:
            yield base_url
    finally:
        redis.stop_all()


@pytest.fixture(scope="module")
def store_down_server(
    docs_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A server whose redis-server (state store and job queue) stopped after start-up."""
    redis = RedisProcesses(tmp_path_factory.mktemp("docs-redis-down"))
    try:
        url = f"redis://127.0.0.1:{redis.start()}/0"
        settings = docs_settings(docs_repository.root, url, redis_pool_timeout_seconds=1.0)
        with running_server(create_app(settings)) as base_url:
            redis.stop_all()
            yield base_url
    finally:
        redis.stop_all()


@pytest.fixture(scope="module")
def rate_limited_server(
    docs_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A server that allows each key one request, then about one an hour."""
    redis = RedisProcesses(tmp_path_factory.mktemp("docs-redis-rate"))
    try:
        url = f"redis://127.0.0.1:{redis.start()}/0"
        settings = docs_settings(
            docs_repository.root, url, rate_limit_per_second=1 / 3600, rate_limit_burst=1
        )
        with running_server(create_app(settings)) as base_url:
            yield base_url
    finally:
        redis.stop_all()


# ---- (a) every operation is described and has examples --------------------------------------


def test_every_operation_has_a_summary_and_a_description() -> None:
    missing = []
    for route in APP.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        for method in sorted(route.methods):
            where = operation_id(route.path, method)
            operation = SCHEMA["paths"][route.path][method.lower()]
            if not route.summary:
                missing.append(f"{where}: no summary (pass `summary=` to the route decorator)")
            if not (operation.get("description") or "").strip():
                missing.append(f"{where}: no description (give the endpoint a docstring)")
    assert not missing, "\n".join(missing)


def _has_examples(item: dict[str, Any]) -> bool:
    return bool(item.get("examples") or "example" in item)


def _resolved(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    return SCHEMA["components"]["schemas"][ref.rsplit("/", 1)[-1]]


def _success_has_example(operation: dict[str, Any]) -> bool:
    for status, response in operation["responses"].items():
        media = response.get("content", {}).get("application/json", {})
        if status.startswith("2") and (
            _has_examples(media) or _has_examples(_resolved(media.get("schema", {})))
        ):
            return True
    return False


def test_every_operation_has_examples_of_its_body_and_parameters() -> None:
    missing = []
    for path, method, operation in OPERATIONS:
        where = operation_id(path, method)
        body = operation.get("requestBody")
        if body is not None and not _has_examples(body["content"].get("application/json", {})):
            missing.append(
                f"{where}: the request body has no example (Body(openapi_examples=...) with "
                "examples next to its schema in service/api/schemas)"
            )
        for parameter in operation.get("parameters", []):
            if not _has_examples(parameter):
                missing.append(
                    f"{where}: parameter {parameter['name']!r} has no example "
                    "(an annotated type with openapi_examples, service/api/schemas/parameters.py)"
                )
        if body is None and not operation.get("parameters") and not _success_has_example(operation):
            missing.append(
                f"{where}: takes no input, so its success response needs an example "
                "(json_schema_extra examples on its response model)"
            )
    assert not missing, "\n".join(missing)


def test_fastapis_validation_error_shape_is_documented_nowhere() -> None:
    """The server never answers `{"detail": [...]}`: its 422s and 400s have its own bodies."""
    assert "HTTPValidationError" not in SCHEMA["components"]["schemas"]
    assert "HTTPValidationError" not in repr(SCHEMA["paths"])


# ---- the examples work against the built-in models ------------------------------------------


class LiveIds:
    """Ids the server hands out, made on demand for the examples that need one."""

    def __init__(self, client: httpx.Client, repository: ModelRepository | None = None) -> None:
        self.client = client
        self.repository = repository

    def spare_version(self, model: str) -> str:
        """A new version of `model` (a copy of its latest) that is not latest: one to delete."""
        assert self.repository is not None, "spare versions need the server's repository"
        loaded = self.repository.load(model)
        card = self.repository.publish(
            model, loaded.card.config, loaded.model.state_dict(), promote=False
        )
        return str(card.version)

    def promoted_spare(self, model: str) -> str:
        """A spare version made latest: the earlier latest is one rollback away."""
        version = self.spare_version(model)
        response = self.client.post(f"/v1/models/{model}/versions/{version}/promote")
        assert response.status_code == 200, response.text
        return version

    def session(self, model: str = "digits-lru") -> str:
        response = self.client.post("/v1/sessions", json={"model": model})
        assert response.status_code == 201, response.text
        return response.json()["session_id"]

    def job(self) -> str:
        example = _body_examples(SCHEMA["paths"]["/v1/finetune/jobs"]["post"])
        response = self.client.post("/v1/finetune/jobs", json=next(iter(example.values())))
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    def prediction(self) -> str:
        body = {"inputs": [DIGIT_ROWS]}
        response = self.client.post("/v1/models/digits-lru/predict", json=body)
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]["id"]


def _body_examples(operation: dict[str, Any]) -> dict[str, Any]:
    if "requestBody" not in operation:
        return {}
    media = operation["requestBody"]["content"]["application/json"]
    return {name: example["value"] for name, example in media.get("examples", {}).items()}


def _example_value(parameter: dict[str, Any], name: str) -> Any:
    """The parameter's example named like the body example, else its first one."""
    examples = parameter["examples"]
    chosen = examples.get(name) or next(iter(examples.values()))
    return chosen["value"]


LIVE_ID_PARAMETERS = ("session_id", "job_id")  # their examples only show the form of an id
# Version admin examples that need a version to act on: a spare one to delete, and a promoted
# spare so that a rollback has an earlier latest to go back to.
DELETE_VERSION = ("delete", "/v1/models/{name}/versions/{version}")
ROLLBACK = ("post", "/v1/models/{name}/rollback")


def _parameter(operation: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in operation.get("parameters", []) if p["name"] == name)


def _example_requests(path: str, method: str, live: LiveIds) -> Iterator[tuple[str, str, Any]]:
    """(example name, URL, body) for every example of the operation's body and parameters: a
    body example with the parameter examples of its name (else their first), and each other
    parameter example with the first body example. Ids are made live."""
    operation = SCHEMA["paths"][path][method]
    bodies = _body_examples(operation) or {"": None}
    names = list(bodies)
    for parameter in operation.get("parameters", []):
        if parameter["name"] not in LIVE_ID_PARAMETERS:
            names += [name for name in parameter["examples"] if name not in names]
    for name in names:
        body = bodies.get(name, next(iter(bodies.values())))
        url, query = path, {}
        for parameter in operation.get("parameters", []):
            if parameter["name"] == "session_id":  # a session of the model the example is for
                value = live.session(name if name in BUILTIN_MODELS else "digits-lru")
            elif parameter["name"] == "job_id":
                value = live.job()
            elif parameter["name"] == "version" and (method, path) == DELETE_VERSION:
                value = live.spare_version(_example_value(_parameter(operation, "name"), name))
            else:
                value = _example_value(parameter, name)
            if parameter["in"] == "path":
                url = url.replace("{" + parameter["name"] + "}", str(value))
            else:
                query[parameter["name"]] = value
        if isinstance(body, dict) and "prediction_id" in body:
            body = {**body, "prediction_id": live.prediction()}
        if (method, path) == ROLLBACK:
            live.promoted_spare(_example_value(_parameter(operation, "name"), name))
        yield name, url + ("?" + str(httpx.QueryParams(query)) if query else ""), body


@pytest.mark.parametrize(
    "path, method",
    [pytest.param(path, method, id=operation_id(path, method)) for path, method, _ in OPERATIONS],
)
def test_the_examples_work_against_the_builtin_models(
    docs_server: str, docs_repository: ModelRepository, path: str, method: str
) -> None:
    with httpx.Client(base_url=docs_server, headers=key(ADMIN), timeout=60) as client:
        live = LiveIds(client, docs_repository)
        for name, url, body in _example_requests(path, method, live):
            response = client.request(method.upper(), url, json=body)
            assert 200 <= response.status_code < 300, (
                f"{operation_id(path, method)} example {name!r} ({url}): "
                f"{response.status_code} {response.text}"
            )
            parameters = (body or {}).get("parameters") if path.startswith("/v2") else None
            if parameters and parameters.get("sequence_id") and not parameters.get("sequence_end"):
                # End the Triton sequence the example started, so the next one may start it.
                ending = {**parameters, "sequence_start": False, "sequence_end": True}
                ended = client.post(url, json={**body, "parameters": ending})
                assert ended.status_code == 200, ended.text


# ---- (b) documented error responses match real errors ---------------------------------------


@dataclass(frozen=True)
class ErrorCase:
    """A real request that fails with `status` on the documented operation `method path`."""

    family: str  # the operation's tag
    method: str
    path: str  # as documented, e.g. /v1/models/{name}/predict
    status: int
    send: Callable[[httpx.Client], httpx.Response]
    server: str = "docs_server"  # or "store_down_server", "rate_limited_server"

    @property
    def id(self) -> str:
        return f"{self.family}-{self.status}-{self.method} {self.path}"


def _predict(model: str, body: Any) -> Callable[[httpx.Client], httpx.Response]:
    return lambda c: c.post(f"/v1/models/{model}/predict", json=body)


def _too_large(url: str) -> Callable[[httpx.Client], httpx.Response]:
    return lambda c: c.post(
        url, content=TOO_LARGE_BODY, headers={"content-type": "application/json"}
    )


def _without_key(method: str, url: str) -> Callable[[httpx.Client], httpx.Response]:
    return lambda c: httpx.request(method, str(c.base_url).rstrip("/") + url, json={}, timeout=30)


def _twice(method: str, url: str, body: Any = None) -> Callable[[httpx.Client], httpx.Response]:
    """The second of two requests (on the rate-limited server, the first uses the burst)."""

    def send(c: httpx.Client) -> httpx.Response:
        c.request(method, url, json=body)
        return c.request(method, url, json=body)

    return send


def _label_twice(c: httpx.Client) -> httpx.Response:
    prediction = LiveIds(c).prediction()
    assert (
        c.post("/v1/feedback", json={"prediction_id": prediction, "label": "0"}).status_code == 200
    )
    return c.post("/v1/feedback", json={"prediction_id": prediction, "label": "0"})


def _sessions_over_quota(c: httpx.Client) -> httpx.Response:
    for _ in range(SESSIONS_PER_KEY):
        created = c.post("/v1/sessions", json={"model": "digits-lru"}, headers=key(CROWDED))
        assert created.status_code == 201, created.text
    return c.post("/v1/sessions", json={"model": "digits-lru"}, headers=key(CROWDED))


JOB = {"model": "digits-lru", "data": {"kind": "builtin", "name": "digits-seq"}, "steps": 10}


def _jobs_over_quota(c: httpx.Client) -> httpx.Response:
    for _ in range(JOBS_PER_KEY):
        submitted = c.post("/v1/finetune/jobs", json=JOB, headers=key(CROWDED))
        assert submitted.status_code == 202, submitted.text
    return c.post("/v1/finetune/jobs", json=JOB, headers=key(CROWDED))


def _v2_infer(model: str, body: Any) -> Callable[[httpx.Client], httpx.Response]:
    return lambda c: c.post(f"/v2/models/{model}/infer", json=body)


V2_DIGIT = {
    "inputs": [
        {"name": "input", "shape": [1, 4, 8], "datatype": "FP32", "data": [DIGIT_ROWS]},
    ]
}
PREDICT = "/v1/models/{name}/predict"
SESSIONS, STEP = "/v1/sessions", "/v1/sessions/{session_id}/step"
GENERATE, FEEDBACK, JOBS = "/v1/models/{name}/generate", "/v1/feedback", "/v1/finetune/jobs"
V2_INFER = "/v2/models/{name}/infer"
LATEST, PROMOTE = "/v1/models/{name}/latest", "/v1/models/{name}/versions/{version}/promote"
ROLLBACK_PATH, VERSION = "/v1/models/{name}/rollback", "/v1/models/{name}/versions/{version}"

ERROR_CASES = [
    # models
    ErrorCase("models", "GET", "/v1/models", 401, _without_key("GET", "/v1/models")),
    ErrorCase("models", "GET", "/v1/models/{name}", 404, lambda c: c.get("/v1/models/nope")),
    ErrorCase("models", "POST", PREDICT, 404, _predict("nope", {"inputs": [DIGIT_ROWS]})),
    ErrorCase("models", "POST", PREDICT, 409, _predict("tiny-digits", {"inputs": [DIGIT_ROWS]})),
    ErrorCase("models", "POST", PREDICT, 413, _too_large("/v1/models/digits-lru/predict")),
    ErrorCase("models", "POST", PREDICT, 422, _predict("digits-lru", {"inputs": [[[1.0, 2.0]]]})),
    ErrorCase("models", "POST", PREDICT, 503, _predict("broken", {"inputs": [DIGIT_ROWS]})),
    ErrorCase(
        "models",
        "GET",
        "/v1/models/{name}",
        429,
        _twice("GET", "/v1/models/digits-lru"),
        server="rate_limited_server",
    ),
    # model versions
    ErrorCase("model versions", "GET", LATEST, 401, _without_key("GET", "/v1/models/x/latest")),
    ErrorCase("model versions", "GET", LATEST, 404, lambda c: c.get("/v1/models/nope/latest")),
    ErrorCase(
        "model versions",
        "GET",
        LATEST,
        429,
        _twice("GET", "/v1/models/digits-lru/latest"),
        server="rate_limited_server",
    ),
    ErrorCase(
        "model versions",
        "POST",
        PROMOTE,
        403,
        lambda c: c.post("/v1/models/digits-lru/versions/1/promote", headers=key(USER)),
    ),
    ErrorCase(
        "model versions",
        "POST",
        PROMOTE,
        404,
        lambda c: c.post("/v1/models/digits-lru/versions/99/promote"),
    ),
    ErrorCase(
        "model versions",
        "POST",
        ROLLBACK_PATH,
        403,
        lambda c: c.post("/v1/models/digits-snn/rollback", headers=key(USER)),
    ),
    ErrorCase(
        "model versions", "POST", ROLLBACK_PATH, 404, lambda c: c.post("/v1/models/nope/rollback")
    ),
    ErrorCase(  # never promoted: no earlier latest
        "model versions",
        "POST",
        ROLLBACK_PATH,
        409,
        lambda c: c.post("/v1/models/digits-snn/rollback"),
    ),
    ErrorCase(
        "model versions",
        "DELETE",
        VERSION,
        403,
        lambda c: c.delete("/v1/models/digits-snn/versions/1", headers=key(USER)),
    ),
    ErrorCase(
        "model versions",
        "DELETE",
        VERSION,
        404,
        lambda c: c.delete("/v1/models/digits-snn/versions/99"),
    ),
    ErrorCase(  # the latest version
        "model versions",
        "DELETE",
        VERSION,
        409,
        lambda c: c.delete("/v1/models/digits-snn/versions/1"),
    ),
    # sessions
    ErrorCase("sessions", "POST", SESSIONS, 401, _without_key("POST", SESSIONS)),
    ErrorCase(
        "sessions", "POST", SESSIONS, 404, lambda c: c.post(SESSIONS, json={"model": "nope"})
    ),
    ErrorCase(
        "sessions",
        "POST",
        SESSIONS,
        409,
        lambda c: c.post(SESSIONS, json={"model": "tiny-digits", "early_decision": {}}),
    ),
    ErrorCase("sessions", "POST", SESSIONS, 422, lambda c: c.post(SESSIONS, json={"modle": "x"})),
    ErrorCase("sessions", "POST", SESSIONS, 429, _sessions_over_quota),
    ErrorCase(
        "sessions", "GET", "/v1/sessions/{session_id}", 404, lambda c: c.get("/v1/sessions/nope")
    ),
    ErrorCase("sessions", "POST", STEP, 413, _too_large("/v1/sessions/nope/step")),
    ErrorCase(
        "sessions",
        "POST",
        SESSIONS,
        503,
        lambda c: c.post(SESSIONS, json={"model": "digits-lru"}),
        server="store_down_server",
    ),
    # feedback and calibration status
    ErrorCase("feedback", "POST", FEEDBACK, 401, _without_key("POST", FEEDBACK)),
    ErrorCase(
        "feedback",
        "POST",
        FEEDBACK,
        404,
        lambda c: c.post(FEEDBACK, json={"prediction_id": "nope", "label": "0"}),
    ),
    ErrorCase("feedback", "POST", FEEDBACK, 409, _label_twice),
    ErrorCase("feedback", "POST", FEEDBACK, 413, _too_large(FEEDBACK)),
    ErrorCase("feedback", "POST", FEEDBACK, 422, lambda c: c.post(FEEDBACK, json={"label": "0"})),
    ErrorCase(
        "feedback",
        "GET",
        "/v1/models/{name}/calibration",
        409,
        lambda c: c.get("/v1/models/tiny-digits/calibration"),
    ),
    ErrorCase(
        "feedback",
        "POST",
        FEEDBACK,
        503,
        lambda c: c.post(FEEDBACK, json={"prediction_id": "0" * 32, "label": "0"}),
        server="store_down_server",
    ),
    ErrorCase(
        "feedback",
        "POST",
        FEEDBACK,
        429,
        _twice("POST", FEEDBACK, {"prediction_id": "0" * 32, "label": "0"}),
        server="rate_limited_server",
    ),
    # generation
    ErrorCase("generation", "POST", GENERATE, 401, _without_key("POST", GENERATE)),
    ErrorCase(
        "generation",
        "POST",
        GENERATE,
        404,
        lambda c: c.post("/v1/models/nope/generate", json={"prompt": "a", "max_tokens": 2}),
    ),
    ErrorCase(
        "generation",
        "POST",
        GENERATE,
        409,
        lambda c: c.post("/v1/models/tiny-charlm/generate", json={"prompt": "a", "max_tokens": 2}),
    ),
    ErrorCase(
        "generation", "POST", GENERATE, 413, _too_large("/v1/models/charlm-selective/generate")
    ),
    ErrorCase(
        "generation",
        "POST",
        GENERATE,
        422,
        lambda c: c.post(
            "/v1/models/charlm-selective/generate", json={"prompt": "a", "max_tokens": 0}
        ),
    ),
    ErrorCase(
        "generation",
        "POST",
        GENERATE,
        503,
        lambda c: c.post(
            "/v1/models/charlm-selective/generate", json={"prompt": "a", "max_tokens": 2}
        ),
        server="store_down_server",
    ),
    ErrorCase(
        "generation",
        "POST",
        GENERATE,
        429,
        _twice("POST", "/v1/models/charlm-selective/generate", {"prompt": "a", "max_tokens": 2}),
        server="rate_limited_server",
    ),
    # fine-tuning
    ErrorCase("fine-tuning", "POST", JOBS, 401, _without_key("POST", JOBS)),
    ErrorCase(
        "fine-tuning", "POST", JOBS, 403, lambda c: c.post(JOBS, json=JOB, headers=key(USER))
    ),
    ErrorCase(
        "fine-tuning", "POST", JOBS, 404, lambda c: c.post(JOBS, json={**JOB, "model": "nope"})
    ),
    ErrorCase(
        "fine-tuning",
        "GET",
        "/v1/finetune/jobs/{job_id}",
        404,
        lambda c: c.get("/v1/finetune/jobs/nope"),
    ),
    ErrorCase(  # output_name of a model of another lineage
        "fine-tuning",
        "POST",
        JOBS,
        409,
        lambda c: c.post(JOBS, json={**JOB, "output_name": "digits-snn"}),
    ),
    ErrorCase("fine-tuning", "POST", JOBS, 413, _too_large(JOBS)),
    ErrorCase("fine-tuning", "POST", JOBS, 422, lambda c: c.post(JOBS, json={**JOB, "steps": 0})),
    ErrorCase("fine-tuning", "POST", JOBS, 429, _jobs_over_quota),
    ErrorCase(
        "fine-tuning",
        "POST",
        JOBS,
        503,
        lambda c: c.post(JOBS, json=JOB),
        server="store_down_server",
    ),
    # Open Inference Protocol (V2)
    ErrorCase("v2", "POST", V2_INFER, 400, _v2_infer("digits-lru", {"inputs": "nope"})),
    ErrorCase("v2", "GET", "/v2", 401, _without_key("GET", "/v2")),
    ErrorCase("v2", "GET", "/v2/models/{name}", 404, lambda c: c.get("/v2/models/nope")),
    ErrorCase("v2", "POST", V2_INFER, 404, _v2_infer("nope", V2_DIGIT)),
    ErrorCase("v2", "POST", V2_INFER, 409, _v2_infer("tiny-digits", V2_DIGIT)),
    ErrorCase("v2", "POST", V2_INFER, 413, _too_large("/v2/models/digits-lru/infer")),
    ErrorCase("v2", "POST", V2_INFER, 503, _v2_infer("broken", V2_DIGIT)),
    ErrorCase(
        "v2",
        "POST",
        V2_INFER,
        429,
        _twice("POST", "/v2/models/digits-lru/infer", V2_DIGIT),
        server="rate_limited_server",
    ),
    ErrorCase(
        "v2", "GET", "/v2/models/{name}/ready", 503, lambda c: c.get("/v2/models/broken/ready")
    ),
]


def _documented_schema(path: str, method: str, status: int) -> dict[str, Any]:
    operation = SCHEMA["paths"][path][method.lower()]
    documented = operation["responses"].get(str(status))
    assert documented is not None, (
        f"{operation_id(path, method)} answers {status} but does not document it "
        f"(documented: {sorted(operation['responses'])})"
    )
    return documented["content"]["application/json"]["schema"]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda case: case.id)
def test_a_real_error_matches_its_documented_response(
    case: ErrorCase, request: pytest.FixtureRequest
) -> None:
    base_url = request.getfixturevalue(case.server)
    with httpx.Client(base_url=base_url, headers=key(ADMIN), timeout=60) as client:
        response = case.send(client)
    assert response.status_code == case.status, (case.id, response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    schema = {**_documented_schema(case.path, case.method, case.status), **SCHEMA_COMPONENTS}
    errors = [error.message for error in Draft202012Validator(schema).iter_errors(response.json())]
    assert not errors, f"{case.id}: {response.text} does not match its documentation: {errors}"


def test_every_documented_error_of_a_route_family_has_a_real_failing_request() -> None:
    covered = {(case.family, case.status) for case in ERROR_CASES}
    missing = []
    for path, method, operation in OPERATIONS:
        family = (operation.get("tags") or ["(no tag)"])[0]
        for status in operation["responses"]:
            if int(status) >= 400 and (family, int(status)) not in covered:
                missing.append(
                    f"{operation_id(path, method)} documents {status}, and no request of family "
                    f"{family!r} is checked to answer it: add an ErrorCase"
                )
    assert not missing, "\n".join(missing)


def test_the_docs_pages_and_their_assets_are_open_without_a_key(docs_server: str) -> None:
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui-bundle.js"):
        response = httpx.get(docs_server + path, timeout=30)
        assert response.status_code == 200, (path, response.status_code)
    assert httpx.get(docs_server + "/v1/models", timeout=30).status_code == 401
