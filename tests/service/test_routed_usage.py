"""Usage of a model with routed experts, through the real server: the committed `charlm-moe`
counts only the routers and the experts each token ran, reports the experts it skipped, and
the active fraction, in every answer (predict, generation, session steps); the dense
`charlm-selective` reports no routing."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from websockets.sync.client import connect

from models.repository import ModelRepository, default_repository_root

MOE, DENSE = "charlm-moe", "charlm-selective"
CALIBRATED_BACKENDS = ("torch", "onnxruntime", "analog_imc", "stochastic")
REPOSITORY = ModelRepository(default_repository_root())


@pytest.fixture(scope="module")
def builtin(builtin_server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=builtin_server_url, timeout=120) as http:
        yield http


def per_step(name: str) -> dict[str, int]:
    return REPOSITORY.load(name).model.macs_per_step()


def assert_routed_usage(usage: dict, steps: int, samples: int = 1) -> None:
    """`steps` token steps (times `samples` chains) of charlm-moe, counted exactly."""
    counts = per_step(MOE)
    assert usage["macs"] == counts["dense_macs"] * steps * samples
    assert usage["routed_macs"] == counts["routed_macs"] * steps * samples
    assert usage["skipped_macs"] == counts["skipped_macs"] * steps * samples
    expected = counts["dense_macs"] / (counts["dense_macs"] + counts["skipped_macs"])
    assert usage["active_fraction"] == pytest.approx(expected, rel=1e-12)
    assert 0.0 < usage["active_fraction"] < 1.0


def test_the_moe_model_runs_at_most_half_the_dense_models_macs_per_token() -> None:
    assert per_step(MOE)["dense_macs"] <= 0.5 * per_step(DENSE)["dense_macs"]


def test_predict_reports_routed_macs_and_the_active_fraction(builtin: httpx.Client) -> None:
    prompts = ["Return the ", "def f", "x"]
    body = builtin.post(f"/v1/models/{MOE}/predict", json={"inputs": prompts}).json()
    assert body["calibrated"] is True, body
    assert_routed_usage(body["usage"], steps=sum(len(p) for p in prompts))
    dense = builtin.post(f"/v1/models/{DENSE}/predict", json={"inputs": prompts}).json()
    assert dense["usage"]["routed_macs"] == dense["usage"]["skipped_macs"] == 0
    assert dense["usage"]["active_fraction"] is None


def test_generation_reports_the_active_fraction_of_every_step(
    builtin: httpx.Client, builtin_server_url: str
) -> None:
    prompt, max_tokens = "Return the ", 8
    body = builtin.post(
        f"/v1/models/{MOE}/generate", json={"prompt": prompt, "max_tokens": max_tokens, "seed": 3}
    ).json()
    assert body["tokens"] and body["finish_reason"] == "length"
    assert_routed_usage(body["usage"], steps=body["step"])
    url = builtin_server_url.replace("http://", "ws://") + "/v1/generate"
    with connect(url) as websocket:
        websocket.send(json.dumps({"model": MOE, "prompt": prompt, "max_tokens": 4, "seed": 3}))
        messages = [json.loads(websocket.recv()) for _ in range(5)]
    done = messages[-1]
    assert done["type"] == "done"
    assert_routed_usage(done["usage"], steps=done["step"])


def test_session_steps_report_their_own_routed_work(builtin: httpx.Client) -> None:
    session = builtin.post("/v1/sessions", json={"model": MOE}).json()["session_id"]
    body = builtin.post(f"/v1/sessions/{session}/step", json={"inputs": "Return"}).json()
    assert_routed_usage(body["usage"], steps=len("Return"))


@pytest.mark.parametrize("backend", CALIBRATED_BACKENDS)
def test_every_calibrated_backend_reports_routed_usage(builtin: httpx.Client, backend: str) -> None:
    body = builtin.post(
        f"/v1/models/{MOE}/predict", json={"inputs": ["Return the "], "backend": backend}
    ).json()
    assert body["calibrated"] is True, body
    samples = body["usage"]["macs"] // (per_step(MOE)["dense_macs"] * len("Return the "))
    assert samples >= 1
    assert_routed_usage(body["usage"], steps=len("Return the "), samples=samples)
