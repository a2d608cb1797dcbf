"""Label feedback over real HTTP: predict -> feedback moves the coverage and reliability
counters and the online (ACI) level exactly as `AdaptiveConformal` applied one label at a time;
online sets follow that level; 404 / 422 / 409 for unknown or expired ids, foreign labels and
second labels; per-session levels; and two replicas sharing one Redis."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from calibration import AdaptiveConformal, CalibrationArtifact
from models.digits import load_digits_seq
from models.repository import ModelRepository, default_repository_root
from service.app import create_app
from service.calibration_store import CALIBRATION_DIR, CalibrationStore
from service.dataplane import ConformalOptions, DataPlane, InputLimits
from service.feedback import FeedbackLog, aci_from_counts
from service.settings import Settings
from service.state_store import InMemoryStateStore
from tests.service.conftest import running_server
from tests.service.test_backends_http import metric_value

GAMMA = 0.005
TARGET = 0.1
# alpha_t from counters is one closed-form expression; the reference adds gamma * (...) once
# per label, so the two differ by float rounding only: < 1e-15 per step.
ALPHA_AGREEMENT = 1e-12


def builtin_settings(**overrides: Any) -> Settings:
    return Settings(
        model_repository=default_repository_root(),
        aci_gamma=GAMMA,
        aci_target_alpha=TARGET,
        **overrides,
    )


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """A server of its own over the built-in models: its store starts with no feedback."""
    with (
        running_server(create_app(builtin_settings())) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


def artifact(backend: str = "torch", model: str = "digits-lru") -> CalibrationArtifact:
    version_dir = ModelRepository(default_repository_root()).version_path(model, "1")
    return CalibrationArtifact.load(version_dir / CALIBRATION_DIR, stem=backend)


def set_at_level(art: CalibrationArtifact, score: str, probs: list[float], alpha_t: float):
    """The reference: the raw set [C] of a deterministic score at an online level."""
    monitor = AdaptiveConformal(TARGET, GAMMA, alpha_t=alpha_t)
    qhat = monitor.quantile(art.scores[score])
    table = art.make_score(score).label_scores(torch.tensor([probs], dtype=torch.float64))
    return table[0] <= qhat  # [C]


def send(http: httpx.Client, prediction_id: str, label: Any) -> httpx.Response:
    return http.post("/v1/feedback", json={"prediction_id": prediction_id, "label": label})


def predict(http: httpx.Client, inputs: torch.Tensor, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/models/digits-lru/predict", json={"inputs": inputs.tolist(), **body})
    assert response.status_code == 200, response.text
    return response.json()


# ---- the counter form of ACI --------------------------------------------------------------


def test_aci_from_counters_equals_the_update_applied_label_by_label() -> None:
    rng = random.Random(0)
    reference = AdaptiveConformal(TARGET, GAMMA)
    missed = 0
    for step in range(1, 2001):
        covered = rng.random() > 0.3  # a shifted stream: misses three times too often
        reference.update(covered)
        missed += not covered
        counted = aci_from_counts(TARGET, GAMMA, step, missed)
        assert counted.alpha_t == pytest.approx(reference.alpha_t, abs=ALPHA_AGREEMENT)
    assert counted.miscoverage_rate == reference.miscoverage_rate
    assert counted.miscoverage_bound() == reference.miscoverage_bound()
    assert reference.alpha_t < 0  # the level left (0, 1): such sets hold every label


# ---- end to end -----------------------------------------------------------------------------


def test_feedback_moves_coverage_reliability_and_the_aci_level(http: httpx.Client) -> None:
    status = http.get("/v1/models/digits-lru/calibration").json()
    assert status["live"]["feedback"] == 0 and status["live"]["aci"]["alpha"] == TARGET
    assert status["fit"]["metrics"]["ece_after"] >= 0

    # Clean digits, then digits moved by one pixel: misses pile up and ACI reacts.
    clean = load_digits_seq("test")
    shifted = load_digits_seq("test", shift="translated")
    inputs = torch.cat([clean.inputs[:30], shifted.inputs[:60]])
    labels = torch.cat([clean.labels[:30], shifted.labels[:60]]).tolist()
    predictions = (
        predict(http, inputs[:45])["predictions"] + predict(http, inputs[45:])["predictions"]
    )
    reliability_before = sum(
        metric_value(http, "neuroserve_reliability_predictions_total", backend="torch",
                     model="digits-lru", bin=f"{(b + 1) / 15:.4f}")
        for b in range(15)
    )  # fmt: skip
    art = artifact()
    reference = AdaptiveConformal(TARGET, GAMMA)
    covered_count = correct_count = 0
    for prediction, label in zip(predictions, labels, strict=True):
        expected_aci_set = set_at_level(art, "raps", prediction["probabilities"], reference.alpha_t)
        answer = send(http, prediction["id"], str(label))
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["covered"] is (str(label) in prediction["prediction_set"])
        assert result["correct"] is (prediction["label"] == str(label))
        assert result["aci_covered"] is bool(expected_aci_set[label])
        reference.update(result["aci_covered"])
        assert result["aci_alpha"] == pytest.approx(reference.alpha_t, abs=ALPHA_AGREEMENT)
        covered_count += result["covered"]
        correct_count += result["correct"]
        assert result["feedback_count"] == reference.steps

    assert reference.miscovered > TARGET * reference.steps  # the shift broke coverage ...
    assert reference.alpha_t < TARGET  # ... so the level went down, to wider sets
    live = http.get("/v1/models/digits-lru/calibration").json()["live"]
    assert (live["feedback"], live["covered"], live["correct"]) == (
        len(labels),
        covered_count,
        correct_count,
    )
    assert live["target_coverage"] == pytest.approx(1 - TARGET)
    assert live["aci"]["steps"] == reference.steps
    assert live["aci"]["miscovered"] == reference.miscovered
    assert live["aci"]["alpha"] == pytest.approx(reference.alpha_t, abs=ALPHA_AGREEMENT)
    assert live["aci"]["miscoverage_bound"] == pytest.approx(reference.miscoverage_bound())

    gauge = metric_value(http, "neuroserve_aci_alpha", backend="torch", model="digits-lru")
    assert gauge == pytest.approx(reference.alpha_t, abs=ALPHA_AGREEMENT)
    reliability_after = sum(
        metric_value(http, "neuroserve_reliability_predictions_total", backend="torch",
                     model="digits-lru", bin=f"{(b + 1) / 15:.4f}")
        for b in range(15)
    )  # fmt: skip
    assert reliability_after - reliability_before == len(labels)

    # Online sets are built at the level feedback moved to: wider than at the target alpha.
    fixed = predict(http, shifted.inputs[60:124])
    online = predict(http, shifted.inputs[60:124], online=True)
    assert online["alpha"] == pytest.approx(reference.alpha_t, abs=ALPHA_AGREEMENT)
    assert fixed["alpha"] == TARGET
    for wide, narrow in zip(online["predictions"], fixed["predictions"], strict=True):
        assert set(narrow["prediction_set"]) <= set(wide["prediction_set"])
    assert sum(p["set_size"] for p in online["predictions"]) > sum(
        p["set_size"] for p in fixed["predictions"]
    )


def test_feedback_refusals(http: httpx.Client) -> None:
    prediction = predict(http, load_digits_seq("test").inputs[:1])["predictions"][0]
    unknown = send(http, "0123456789abcdef0123456789abcdef", "3")
    assert unknown.status_code == 404 and "unknown, or older than" in unknown.text
    malformed = send(http, "not-an-id", "3")
    assert malformed.status_code == 404 and "32 hex digits" in malformed.text
    for label, fragment in [("11", "label '11' is not one of the model's 10 labels"),
                            (10, "label 10 is not one of"), ("seven", "'seven'")]:  # fmt: skip
        foreign = send(http, prediction["id"], label)
        assert foreign.status_code == 422, foreign.text
        assert fragment in foreign.json()["error"]["message"]
    for body in ({"prediction_id": prediction["id"], "label": True}, {"label": "1"}):
        assert http.post("/v1/feedback", json=body).status_code == 422
    first = send(http, prediction["id"], 4)  # a label by its index is fine
    assert first.status_code == 200 and first.json()["label"] == "4"
    second = send(http, prediction["id"], "4")
    assert second.status_code == 409 and "already received its label" in second.text


def test_an_expired_prediction_gets_404(server_factory) -> None:
    with (
        server_factory(create_app(builtin_settings(feedback_ttl_seconds=0.3))) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        prediction = predict(client, load_digits_seq("test").inputs[:1])["predictions"][0]
        time.sleep(0.6)
        response = send(client, prediction["id"], "0")
        assert response.status_code == 404
        assert "feedback window of 0.3 s" in response.json()["error"]["message"]


def test_feedback_on_an_uncalibrated_answer_counts_only_correctness(client: httpx.Client) -> None:
    body = client.post("/v1/models/tiny-digits/predict", json={"inputs": [[[1.0] * 8]]}).json()
    prediction = body["predictions"][0]
    result = send(client, prediction["id"], prediction["label"]).json()
    assert result["correct"] is True
    assert (result["covered"], result["aci_alpha"], result["coverage"]) == (None, None, None)


# ---- sessions: their own level ----------------------------------------------------------------


def test_a_session_keeps_its_own_online_level() -> None:
    repository = ModelRepository(default_repository_root())
    calibrations = CalibrationStore(repository)
    log = FeedbackLog(
        InMemoryStateStore(),
        calibrations,
        ttl_seconds=60,
        aci_target_alpha=TARGET,
        aci_gamma=GAMMA,
    )
    dataplane = DataPlane(repository, InputLimits(64, 64), calibrations=calibrations, feedback=log)
    shifted = load_digits_seq("test", shift="translated")
    card = repository.card("digits-lru")

    async def scenario() -> None:
        in_session = await dataplane.predict(
            "digits-lru", shifted.inputs[:40].tolist(), session_id="session-1"
        )
        outside = await dataplane.predict("digits-lru", shifted.inputs[40:50].tolist())
        session_reference = AdaptiveConformal(TARGET, GAMMA)
        for prediction, label in zip(in_session.predictions, shifted.labels[:40], strict=True):
            result = await dataplane.submit_feedback(prediction.id, int(label))
            # So far both levels saw the same labels, so they agree on every set.
            session_reference.update(result.aci_covered)
            assert result.session_aci_alpha == pytest.approx(session_reference.alpha_t)
        for prediction, label in zip(outside.predictions, shifted.labels[40:50], strict=True):
            result = await dataplane.submit_feedback(prediction.id, int(label))
            assert result.session_aci_alpha is None
        session_level = await dataplane.online_level(card, "torch", "session-1")
        global_level = await dataplane.online_level(card, "torch")
        assert session_level.steps == 40 and global_level.steps == 50
        assert session_level.alpha_t == pytest.approx(session_reference.alpha_t)
        online = await dataplane.predict(
            "digits-lru",
            shifted.inputs[50:52].tolist(),
            conformal=ConformalOptions(online=True),
            session_id="session-1",
        )
        assert online.alpha == session_level.alpha_t

    asyncio.run(scenario())


# ---- replicas -----------------------------------------------------------------------------


@pytest.mark.redis
def test_two_replicas_share_predictions_and_levels_through_redis(
    server_factory, redis_url: str, redis_prefix: str
) -> None:
    settings = builtin_settings(redis_url=redis_url, state_store_prefix=redis_prefix)
    with (
        server_factory(create_app(settings)) as url_a,
        server_factory(create_app(settings)) as url_b,
        httpx.Client(base_url=url_a, timeout=60) as replica_a,
        httpx.Client(base_url=url_b, timeout=60) as replica_b,
    ):
        test_split = load_digits_seq("test")
        predictions = predict(replica_a, test_split.inputs[:6])["predictions"]
        for prediction, label in zip(predictions, test_split.labels[:6], strict=True):
            answer = send(replica_b, prediction["id"], str(int(label)))  # the other replica
            assert answer.status_code == 200, answer.text
        assert send(replica_a, predictions[0]["id"], "0").status_code == 409
        for replica in (replica_a, replica_b):
            live = replica.get("/v1/models/digits-lru/calibration").json()["live"]
            assert live["feedback"] == 6 and live["aci"]["steps"] == 6
