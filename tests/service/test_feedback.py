"""Label feedback over real HTTP (`POST /v1/feedback`): what a label moves, and what is refused.

- `AdaptiveConformal.from_counts` (the two counters a store keeps per level) is the ACI update
  applied label by label, for any label sequence;
- a label is scored against the set actually served (deterministic scores, and randomised
  ones with the server's U; a request seed is ignored), moves the live counters of its
  calibration and, for an online prediction only, the level it was served at, exactly as the
  reference replay of the served errors; the request's alpha is the level's target, and
  every (score, alpha, position) has a level of its own;
- refusals: unknown, malformed, expired and another key's ids (404), foreign labels (422),
  a second label (409); an uncalibrated answer counts only correctness.

The built-in digits-lru is served from a copy with its torch calibration only (`copy_builtin`),
so calibration jobs rewriting models/artifacts cannot change it under a test. The guarantees of
the levels (Gibbs-Candès bound, keys, replicas, sessions, recalibration) are tested in
test_online_conformal.py, which shares the helpers below.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration import AdaptiveConformal
from models.digits import load_digits_seq
from models.repository import ModelRepository, default_repository_root
from service.api.auth import hash_key
from service.api.v1_models import IGNORED_SEED_WARNING
from service.app import create_app
from service.dataplane.calibration_store import CALIBRATION_DIR, CalibrationStore, StoredCalibration
from service.dataplane.conformal_draws import ConformalDraws
from service.settings import Settings
from tests.service.conftest import running_server
from tests.service.test_backends_http import metric_value

MODEL = "digits-lru"
LABELS = [str(d) for d in range(10)]
GAMMA = 0.05  # large enough that one label visibly moves a level
ALPHA = 0.1
# A level from the counters is one closed-form expression; the replay adds gamma * (...) once
# per label, so they differ by float rounding only (< 1e-15 per label, a few hundred labels).
REPLAY_AGREEMENT = 1e-12


# ---- helpers (also used by test_online_conformal.py) -----------------------------------------


def copy_builtin(root: Path) -> Path:
    """digits-lru version 1 with its torch calibration only, copied under `root`: a snapshot no
    calibration job running on models/artifacts can change. Returns `root`."""
    source = ModelRepository(default_repository_root()).version_path(MODEL, "1")

    def torch_calibration_only(folder: str, names: list[str]) -> list[str]:
        if Path(folder).name != CALIBRATION_DIR:
            return []
        return [name for name in names if name not in ("torch.json", "torch.safetensors")]

    shutil.copytree(source, root / MODEL / "1", ignore=torch_calibration_only)
    return root


def stored_calibration(root: Path) -> StoredCalibration:
    stored = CalibrationStore(ModelRepository(root)).get(MODEL, "1", "torch")
    assert stored is not None
    return stored


def online_settings(root: Path, **overrides: Any) -> Settings:
    return Settings(model_repository=root, aci_gamma=GAMMA, **overrides)


def key_header(key: str | None) -> dict[str, str]:
    return {} if key is None else {"X-API-Key": key}


def predict(
    http: httpx.Client, inputs: torch.Tensor, key: str | None = None, **body: Any
) -> dict[str, Any]:
    response = http.post(
        f"/v1/models/{MODEL}/predict",
        json={"inputs": inputs.tolist(), **body},
        headers=key_header(key),
    )
    assert response.status_code == 200, response.text
    return response.json()


def send(
    http: httpx.Client, prediction_id: str, label: Any, key: str | None = None
) -> httpx.Response:
    return http.post(
        "/v1/feedback",
        json={"prediction_id": prediction_id, "label": label},
        headers=key_header(key),
    )


def label_ok(http: httpx.Client, prediction_id: str, label: Any, key: str | None = None) -> dict:
    response = send(http, prediction_id, label, key)
    assert response.status_code == 200, response.text
    return response.json()


def calibration_status(http: httpx.Client, key: str | None = None) -> dict[str, Any]:
    response = http.get(f"/v1/models/{MODEL}/calibration", headers=key_header(key))
    assert response.status_code == 200, response.text
    return response.json()


def set_at(
    stored: StoredCalibration,
    prediction: dict[str, Any],
    score: str,
    alpha_t: float,
    uniform: float | None = None,
) -> set[str]:
    """The reference: the raw set of a served prediction's calibrated probabilities at a
    level, from its position's calibration (and the U of a randomised score)."""
    artifact = stored.at(prediction["position"])
    probs = torch.tensor([prediction["probabilities"]], dtype=torch.float64)  # [1, C]
    draw = None if uniform is None else torch.tensor([uniform], dtype=torch.float64)  # [1]
    mask = artifact.sets_at_level(probs, alpha_t, score, uniform=draw)[0]  # [C]
    return {LABELS[i] for i in mask.nonzero().flatten().tolist()}


def outside(prediction: dict[str, Any], truth: str) -> str:
    """A label outside the served set, when there is one; else the truth."""
    return next((label for label in LABELS if label not in prediction["prediction_set"]), truth)


@pytest.fixture(scope="module")
def builtin_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_builtin(tmp_path_factory.mktemp("builtin"))


@pytest.fixture(scope="module")
def test_digits():
    return load_digits_seq("test")


@pytest.fixture(scope="module")
def http(builtin_root: Path) -> Iterator[httpx.Client]:
    """A keyless server of its own over the copy (for tests that need no fresh counters)."""
    with (
        running_server(create_app(online_settings(builtin_root))) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


# ---- the counter form of ACI --------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    covered=st.lists(st.booleans(), max_size=400),
    alpha=st.floats(0.01, 0.99),
    gamma=st.floats(1e-3, 0.5),
)
def test_from_counts_equals_the_update_applied_label_by_label(
    covered: list[bool], alpha: float, gamma: float
) -> None:
    reference = AdaptiveConformal(alpha, gamma)
    for outcome in covered:
        reference.update(outcome)
    counted = AdaptiveConformal.from_counts(alpha, gamma, len(covered), covered.count(False))
    # Each of the T updates rounds by at most one ulp of |alpha_t| <= 1 + gamma T.
    steps = len(covered)
    tolerance = 4 * (steps + 1) * (1 + gamma * steps) * torch.finfo(torch.float64).eps
    assert counted.alpha_t == pytest.approx(reference.alpha_t, rel=0, abs=tolerance)
    assert (counted.steps, counted.miscovered) == (reference.steps, reference.miscovered)
    assert counted.initial_alpha == reference.initial_alpha == alpha
    if steps:
        assert counted.miscoverage_rate == reference.miscoverage_rate
        for delay in (0, 3):
            expected = (max(alpha, 1 - alpha) + (delay + 1) * gamma) / (steps * gamma)
            assert counted.miscoverage_bound(delay) == pytest.approx(expected, rel=1e-12)
    else:
        assert math.isnan(counted.miscoverage_rate) and counted.miscoverage_bound() == math.inf


# ---- what a label moves -----------------------------------------------------------------------


def test_labels_move_live_counters_and_only_online_levels_as_the_replay(
    builtin_root: Path, test_digits
) -> None:
    stored = stored_calibration(builtin_root)
    labels = [str(int(y)) for y in test_digits.labels]
    with (
        running_server(create_app(online_settings(builtin_root))) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        status = calibration_status(client)
        assert status["fit"]["calibration_id"] == stored.calibration_id
        assert status["live"]["feedback"] == 0 and status["live"]["online_levels"] == []

        # Plain predictions: scored against the served set, counted, no level anywhere.
        plain = predict(client, test_digits.inputs[:20])["predictions"]
        covered = correct = 0
        for count, (p, label) in enumerate(zip(plain, labels[:20], strict=True), start=1):
            assert p["calibrated"] and p["position"] == 8 and p["aci_alpha"] is None
            assert p["set_size"] >= 1 and p["abstain"] is (p["set_size"] != 1)  # never empty
            result = label_ok(client, p["id"], label)
            assert result["covered"] is (label in p["prediction_set"])
            assert result["correct"] is (p["label"] == label)
            assert result["aci_alpha"] is None
            covered, correct = covered + result["covered"], correct + result["correct"]
            assert result["feedback_count"] == count
            assert result["coverage"] == pytest.approx(covered / count)
        assert calibration_status(client)["live"]["online_levels"] == []

        # Online at alpha 0.2, one at a time: served at the replayed level, which starts at
        # the request's alpha and moves by gamma * (0.2 - err) per label.
        target, replay = 0.2, AdaptiveConformal(0.2, GAMMA)
        for index in range(20, 44):
            inputs = test_digits.inputs[index : index + 1]
            (p,) = predict(client, inputs, online=True, alpha=target)["predictions"]
            if index == 20:
                assert p["aci_alpha"] == target
            assert p["aci_alpha"] == pytest.approx(replay.alpha_t, abs=REPLAY_AGREEMENT)
            assert set(p["prediction_set"]) == set_at(stored, p, "raps", p["aci_alpha"])
            label = labels[index] if index % 4 else outside(p, labels[index])  # some misses
            result = label_ok(client, p["id"], label)
            assert result["covered"] is (label in p["prediction_set"])
            err = 0.0 if result["covered"] else 1.0
            assert result["aci_alpha"] == pytest.approx(
                p["aci_alpha"] + GAMMA * (target - err), abs=REPLAY_AGREEMENT
            )
            replay.update(result["covered"])
            covered, correct = covered + result["covered"], correct + result["correct"]
        assert 0 < replay.miscovered < replay.steps

        live = calibration_status(client)["live"]
        assert (live["feedback"], live["covered"], live["correct"]) == (44, covered, correct)
        assert live["target_coverage"] == pytest.approx((20 * (1 - ALPHA) + 24 * (1 - target)) / 44)
        (level,) = live["online_levels"]
        assert {k: level[k] for k in ("score", "target_alpha", "position", "gamma")} == {
            "score": "raps",
            "target_alpha": target,
            "position": "8",
            "gamma": GAMMA,
        }
        assert (level["steps"], level["miscovered"]) == (replay.steps, replay.miscovered)
        assert level["alpha"] == pytest.approx(replay.alpha_t, abs=REPLAY_AGREEMENT)
        assert level["miscoverage_rate"] == replay.miscoverage_rate
        assert level["miscoverage_bound"] == pytest.approx(replay.miscoverage_bound())
        gauge = metric_value(client, "neuroserve_aci_alpha", backend="torch", model=MODEL)
        assert gauge == pytest.approx(min(max(replay.alpha_t, 0.0), 1.0), abs=REPLAY_AGREEMENT)

        # Another alpha, score or position is another level: each starts at its target.
        image = test_digits.inputs[44:45]
        for inputs, body in [
            (image, {"alpha": ALPHA}),
            (image, {"alpha": target, "score": "lac"}),
            (image[:, :5], {"alpha": target}),
        ]:
            (p,) = predict(client, inputs, online=True, **body)["predictions"]
            assert p["aci_alpha"] == body["alpha"], body


def test_randomised_sets_use_the_servers_draw_and_labels_score_the_served_set(
    builtin_root: Path, test_digits
) -> None:
    stored = stored_calibration(builtin_root)
    draws = ConformalDraws("feedback-test-key")
    labels = [str(int(y)) for y in test_digits.labels]
    settings = online_settings(builtin_root, conformal_key="feedback-test-key")
    with (
        running_server(create_app(settings)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        replay = AdaptiveConformal(ALPHA, GAMMA)
        for online, score in [(False, "aps_randomized"), (True, "raps_randomized")]:
            for start in range(0, 24, 8):
                inputs = test_digits.inputs[start : start + 8]
                options = {"score": score, "never_empty": False, "online": online}
                body = predict(client, inputs, seed=12345, **options)
                assert IGNORED_SEED_WARNING in body["warnings"]
                served_level = replay.alpha_t  # the whole batch is served at one level
                for index, p in enumerate(body["predictions"], start=start):
                    level = p["aci_alpha"] if online else ALPHA
                    if online:
                        assert level == pytest.approx(served_level, abs=REPLAY_AGREEMENT)
                    served = set_at(stored, p, score, level, uniform=draws.uniform(p["id"]))
                    assert set(p["prediction_set"]) == served
                    label = labels[index] if index % 3 else outside(p, labels[index])
                    result = label_ok(client, p["id"], label)
                    assert result["covered"] is (label in served)
                    if online:
                        replay.update(result["covered"])
                        assert result["aci_alpha"] == pytest.approx(
                            replay.alpha_t, abs=REPLAY_AGREEMENT
                        )
                    else:
                        assert result["aci_alpha"] is None


# ---- refusals -------------------------------------------------------------------------------


def test_feedback_refusals(http: httpx.Client, test_digits) -> None:
    prediction = predict(http, test_digits.inputs[:1])["predictions"][0]
    unknown = send(http, "0123456789abcdef0123456789abcdef", "3")
    assert unknown.status_code == 404 and "unknown, older than" in unknown.text
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


def test_an_expired_prediction_gets_404(builtin_root: Path, test_digits) -> None:
    settings = online_settings(builtin_root, feedback_ttl_seconds=0.3)
    with (
        running_server(create_app(settings)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        prediction = predict(client, test_digits.inputs[:1])["predictions"][0]
        time.sleep(0.6)
        response = send(client, prediction["id"], "0")
        assert response.status_code == 404
        assert "feedback window of 0.3 s" in response.json()["error"]["message"]


def test_without_redis_only_the_newest_predictions_are_kept(
    builtin_root: Path, test_digits
) -> None:
    settings = online_settings(builtin_root, in_process_max_predictions=3)
    with (
        running_server(create_app(settings)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        first = predict(client, test_digits.inputs[:1])["predictions"][0]
        newest = predict(client, test_digits.inputs[:3])["predictions"]
        dropped = send(client, first["id"], "0")
        assert dropped.status_code == 404
        assert "NEUROSERVE_IN_PROCESS_MAX_PREDICTIONS" in dropped.json()["error"]["message"]
        assert all(send(client, p["id"], "0").status_code == 200 for p in newest)


def test_another_keys_prediction_is_not_found_and_its_levels_are_not_shown(
    builtin_root: Path, test_digits
) -> None:
    alice, bob = "alice-feedback-key", "bob-feedback-key"
    settings = online_settings(
        builtin_root, api_keys=[f"alice:{hash_key(alice)}", f"bob:{hash_key(bob)}"]
    )
    label = str(int(test_digits.labels[0]))
    with (
        running_server(create_app(settings)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        (p,) = predict(client, test_digits.inputs[:1], alice, online=True)["predictions"]
        foreign = send(client, p["id"], label, bob)
        assert foreign.status_code == 404, foreign.text
        assert send(client, p["id"], label, None).status_code == 401
        assert label_ok(client, p["id"], label, alice)["aci_alpha"] is not None
        alices = calibration_status(client, alice)["live"]["online_levels"]
        assert [level["steps"] for level in alices] == [1]
        assert calibration_status(client, bob)["live"]["online_levels"] == []


def test_feedback_on_an_uncalibrated_answer_counts_only_correctness(client: httpx.Client) -> None:
    body = client.post("/v1/models/tiny-digits/predict", json={"inputs": [[[1.0] * 8]]}).json()
    prediction = body["predictions"][0]
    assert prediction["calibrated"] is False and prediction["prediction_set"] is None
    result = label_ok(client, prediction["id"], prediction["label"])
    assert result["correct"] is True
    assert (result["covered"], result["aci_alpha"], result["coverage"]) == (None, None, None)
    assert result["feedback_count"] == 0
