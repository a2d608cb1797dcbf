"""The app over real HTTP: listing and describing models, health, OpenAPI, error formats."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from models.repository import ModelRepository
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import CHAR_VOCABULARY, DIGIT_LABELS, TEST_SETTINGS


def v1_error(response: httpx.Response) -> dict[str, str]:
    """The `{"error": {"code", "message"}}` body of a /v1 error, checked for shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"], body
    return body["error"]


# ---- health, metadata, docs -------------------------------------------------------------------


def test_liveness_and_readiness(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True}


def test_server_metadata_follows_the_open_inference_protocol(client: httpx.Client) -> None:
    response = client.get("/v2")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "neuroserve"
    assert isinstance(body["version"], str) and body["version"]
    assert body["extensions"] == ["binary_tensor_data", "model_configuration", "statistics"]


def test_openapi_schema_and_docs_are_served(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    for path in (
        "/v1/models",
        "/v1/models/{name}",
        "/v1/models/{name}/predict",
        "/v2/health/ready",
    ):
        assert path in schema["paths"], path
    predict = schema["paths"]["/v1/models/{name}/predict"]["post"]
    assert {"404", "413", "422"} <= set(predict["responses"])
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


# ---- models -----------------------------------------------------------------------------------


def test_list_models_names_every_published_model(client: httpx.Client) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    models = {entry["name"]: entry for entry in response.json()["models"]}
    assert set(models) == {"broken", "tiny-charlm", "tiny-digits"}
    assert models["tiny-digits"]["versions"] == ["1", "2"]
    assert models["tiny-digits"]["latest_version"] == "2"
    assert models["tiny-charlm"]["task"] == "language-model"
    assert models["tiny-digits"]["architecture"] == "lru"


def test_model_info_describes_the_latest_version(client: httpx.Client) -> None:
    info = client.get("/v1/models/tiny-digits").json()
    assert info["version"] == info["latest_version"] == "2"
    assert info["versions"] == ["1", "2"]
    assert info["task"] == "classification"
    assert info["labels"] == DIGIT_LABELS
    assert info["vocabulary"] is None
    assert info["input"] == {
        "kind": "features",
        "features": 8,
        "dtype": "float32",
        "value_range": [0.0, 16.0],
        "vocab_size": None,
    }
    assert info["provenance"]["seed"] == 2


def test_model_info_of_an_older_version(client: httpx.Client) -> None:
    info = client.get("/v1/models/tiny-digits", params={"version": "1"}).json()
    assert info["version"] == "1"
    assert info["latest_version"] == "2"
    assert info["provenance"]["seed"] == 1


def test_model_info_of_a_language_model_has_its_vocabulary(client: httpx.Client) -> None:
    info = client.get("/v1/models/tiny-charlm").json()
    assert info["vocabulary"] == CHAR_VOCABULARY
    assert info["labels"] is None
    assert info["input"]["kind"] == "tokens"
    assert info["input"]["vocab_size"] == len(CHAR_VOCABULARY)


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "named"),
    [
        ("GET", "/v1/models/no-such-model", "no-such-model"),
        ("POST", "/v1/models/no-such-model/predict", "no-such-model"),
        ("GET", "/v1/models/tiny-digits?version=7", "7"),
        ("GET", "/v1/models/bad%20name!", "bad name!"),
    ],
)
def test_unknown_model_or_version_is_404_naming_it(
    client: httpx.Client, method: str, path: str, named: str
) -> None:
    body = {"inputs": [[[0.0] * 8]]}
    response = client.request(method, path, json=body if method == "POST" else None)
    assert response.status_code == 404
    error = v1_error(response)
    assert error["code"] == "not_found"
    assert named in error["message"]


def test_unknown_version_in_predict_is_404(client: httpx.Client) -> None:
    response = client.post(
        "/v1/models/tiny-digits/predict", json={"inputs": [[[0.0] * 8]], "version": 9}
    )
    assert response.status_code == 404
    assert "'9'" in v1_error(response)["message"]


def test_unknown_route_uses_the_v1_error_format(client: httpx.Client) -> None:
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert v1_error(response)["code"] == "not_found"


def test_v2_routes_use_the_open_inference_error_format(client: httpx.Client) -> None:
    response = client.get("/v2/nothing-here")
    assert response.status_code == 404
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]


def test_wrong_method_is_405(client: httpx.Client) -> None:
    response = client.delete("/v1/models")
    assert response.status_code == 405
    assert v1_error(response)["code"] == "method_not_allowed"


def test_corrupted_artifact_is_503_with_a_clear_message(client: httpx.Client) -> None:
    response = client.post("/v1/models/broken/predict", json={"inputs": [[[0.0] * 8]]})
    assert response.status_code == 503
    error = v1_error(response)
    assert error["code"] == "artifact_error"
    assert "sha256" in error["message"]


def test_body_over_the_size_limit_is_413(client: httpx.Client) -> None:
    size = TEST_SETTINGS["max_request_bytes"] + 1
    declared = client.post(
        "/v1/models/tiny-digits/predict",
        content=b" " * size,
        headers={"content-type": "application/json"},
    )
    assert declared.status_code == 413
    assert v1_error(declared)["code"] == "payload_too_large"

    def chunks() -> Any:  # no Content-Length: the limit must hold while streaming
        for _ in range(size // 1024 + 1):
            yield b" " * 1024

    streamed = client.post(
        "/v1/models/tiny-digits/predict",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert streamed.status_code == 413
    assert "bytes" in v1_error(streamed)["message"]


def test_unexpected_errors_are_500_without_internals(
    test_repository: ModelRepository, server_factory: Callable[[FastAPI], Any]
) -> None:
    app = create_app(Settings(model_repository=test_repository.root, preload_models=False))

    @app.get("/v1/explode")
    def explode() -> None:
        raise RuntimeError("secret internal detail")

    with server_factory(app) as base_url:
        response = httpx.get(f"{base_url}/v1/explode", timeout=10)
    assert response.status_code == 500
    error = v1_error(response)
    assert error == {"code": "internal_error", "message": "internal server error"}
    assert "secret" not in response.text


def test_not_ready_is_503_while_live_stays_200(
    test_repository: ModelRepository, server_factory: Callable[[FastAPI], Any]
) -> None:
    app = create_app(Settings(model_repository=test_repository.root))
    with server_factory(app) as base_url:  # returns once the preload has finished
        assert app.state.dataplane.ready
        app.state.dataplane.ready = False  # as while a restarted replica is still loading
        ready = httpx.get(f"{base_url}/v2/health/ready", timeout=10)
        live = httpx.get(f"{base_url}/v2/health/live", timeout=10)
    assert ready.status_code == 503
    assert ready.json() == {"ready": False}
    assert live.status_code == 200


def test_preloaded_models_are_warmed_up_before_any_request(
    test_repository: ModelRepository, server_factory: Callable[[FastAPI], Any]
) -> None:
    app = create_app(Settings(model_repository=test_repository.root))
    with server_factory(app):  # returns once the preload has finished
        loaded = app.state.dataplane.repository.load("tiny-digits").model
        # The fused step has derived its weights (and compiled what it compiles).
        assert loaded._fused_weights.cached is not None


def test_what_start_up_built_is_out_of_the_collectors_reach_once_ready(
    test_repository: ModelRepository, server_factory: Callable[[FastAPI], Any]
) -> None:
    gc.unfreeze()
    app = create_app(Settings(model_repository=test_repository.root))
    with server_factory(app):  # returns once the preload has finished
        loaded = app.state.dataplane.repository.load("tiny-digits").model  # preloaded
        assert gc.get_freeze_count() > 0
        collected = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
        assert id(loaded) not in collected  # frozen: in no generation a collection walks


@pytest.mark.parametrize("enabled", [False, True])
def test_opentelemetry_traces_requests_only_when_enabled(
    test_repository: ModelRepository, server_factory: Callable[[FastAPI], Any], enabled: bool
) -> None:
    """NEUROSERVE_OPENTELEMETRY hands FastAPI's native spans to the global provider (what the
    OpenTelemetry SDK or `opentelemetry-instrument` configures); off, none are made."""
    provider = global_tracer_provider()
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    settings = Settings(model_repository=test_repository.root, **TEST_SETTINGS)
    app = create_app(settings.model_copy(update={"opentelemetry": enabled}))
    try:
        with server_factory(app) as base_url:
            assert httpx.get(f"{base_url}/v2/models/tiny-digits", timeout=30).status_code == 200
            body = {"inputs": [[[1.0] * 8] * 3]}
            response = httpx.post(f"{base_url}/v1/models/tiny-digits/predict", json=body)
            assert response.status_code == 200
        names = [span.name for span in exporter.get_finished_spans()]
        if enabled:
            assert any(name.startswith("GET /v2/models/") for name in names), names
            # A hot route's span is named by its route too: traced, it skips the fast path.
            assert "POST /v1/models/{name}/predict" in names, names
        else:
            assert names == []
    finally:
        processor.shutdown()


def global_tracer_provider() -> TracerProvider:
    """The process's SDK tracer provider (set once: OpenTelemetry refuses to replace it)."""
    current = trace.get_tracer_provider()
    if not isinstance(current, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    return trace.get_tracer_provider()
