"""Calibrated answers over real HTTP: coverage of the conformal sets on the digits test split,
agreement with the artifact applied in-process, every score and option, abstention, and the
4xx answers for bad calibration requests (422) and uncalibrated backends (409)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from calibration import SCORE_NAMES, CalibrationArtifact
from models.digits import load_digits_seq
from models.repository import ModelRepository, default_repository_root
from service.app import create_app
from service.calibration_store import CALIBRATION_DIR
from service.dataplane import last_step_logits
from service.settings import Settings
from tests.service.conftest import TEST_SETTINGS

ALPHA = 0.1
BATCH = 64  # the default max_batch_size


def coverage_floor(alpha: float, n: int) -> float:
    """1 - alpha minus three binomial standard errors of an empirical coverage over n points."""
    return 1.0 - alpha - 3.0 * math.sqrt(alpha * (1.0 - alpha) / n)


def predict_split(
    http: httpx.Client, model: str, inputs: torch.Tensor, **body: Any
) -> list[dict[str, Any]]:
    """Every row of inputs [N, T, F] through /predict in batches; the predictions in order."""
    predictions = []
    for start in range(0, inputs.shape[0], BATCH):
        response = http.post(
            f"/v1/models/{model}/predict",
            json={"inputs": inputs[start : start + BATCH].tolist(), **body},
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["calibrated"] is True and answer["warnings"] == []
        predictions += answer["predictions"]
    return predictions


def empirical_coverage(predictions: list[dict[str, Any]], labels: torch.Tensor) -> float:
    hits = [str(int(y)) in p["prediction_set"] for p, y in zip(predictions, labels, strict=True)]
    return sum(hits) / len(hits)


@pytest.fixture(scope="module")
def builtin(builtin_server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=builtin_server_url, timeout=120) as http:
        yield http


# ---- the must-show: coverage and accuracy on the digits test split ---------------------------


def test_digits_lru_sets_cover_the_test_split_at_the_recorded_accuracy(
    builtin: httpx.Client,
) -> None:
    test_split = load_digits_seq("test")  # 397 images the model and its calibration never saw
    predictions = predict_split(builtin, "digits-lru", test_split.inputs, alpha=ALPHA)
    n = len(test_split)
    assert empirical_coverage(predictions, test_split.labels) >= coverage_floor(ALPHA, n)
    recorded = builtin.get("/v1/models/digits-lru").json()["metrics"]["test_accuracy"]
    correct = sum(
        p["label"] == str(int(y)) for p, y in zip(predictions, test_split.labels, strict=True)
    )
    # Batches of 64 may reorder float32 sums against the recorded single-batch run: at most a
    # near-tie can flip, so one example of slack.
    assert correct / n == pytest.approx(recorded, abs=1.0 / n)
    for p in predictions:
        assert p["set_size"] == len(p["prediction_set"])
        assert p["abstain"] is (p["set_size"] > 1)  # the server's default abstain_set_size
        assert set(p["prediction_set"]) <= {str(d) for d in range(10)}


def test_served_answers_match_the_artifact_applied_in_process(builtin: httpx.Client) -> None:
    # digits-snn's torch calibration is a temperature (T ~ 1.4), so the map visibly matters.
    name = "digits-snn"
    repository = ModelRepository(default_repository_root())
    version_dir = repository.version_path(name, "1")
    artifact = CalibrationArtifact.load(version_dir / CALIBRATION_DIR, stem="torch")
    assert artifact.calibration_map.to_dict()["kind"] == "temperature"
    inputs = load_digits_seq("test").inputs[:48]
    logits = last_step_logits(repository.load(name).model, inputs).double()  # [48, 10]
    probs, sets = artifact.predict(logits, ALPHA, "lac")
    response = builtin.post(
        f"/v1/models/{name}/predict", json={"inputs": inputs.tolist(), "score": "lac"}
    )
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    served_probs = torch.tensor([p["probabilities"] for p in served], dtype=torch.float64)
    # The torch backend steps the spiking model one step at a time where the reference runs
    # its forward: float32 sums in another order, nothing more.
    torch.testing.assert_close(served_probs, probs, atol=1e-5, rtol=0)
    raw = torch.softmax(logits, dim=-1)
    assert (served_probs - raw).abs().max() > 1e-3  # calibrated, not the raw softmax
    for p, row in zip(served, sets, strict=True):
        assert p["prediction_set"] == [str(i) for i in row.nonzero().flatten().tolist()]


# ---- scores and options -----------------------------------------------------------------------


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_every_score_answers_consistent_sets(builtin: httpx.Client, score: str) -> None:
    inputs = load_digits_seq("test").inputs[:32]
    body = {"inputs": inputs.tolist(), "score": score, "alpha": 0.05, "seed": 7}
    first = builtin.post("/v1/models/digits-lru/predict", json=body).json()
    second = builtin.post("/v1/models/digits-lru/predict", json=body).json()
    assert (first["score"], first["alpha"]) == (score, 0.05)
    randomized = score.endswith("_randomized")
    assert first["seed"] == (7 if randomized else None)
    for a, b in zip(first["predictions"], second["predictions"], strict=True):
        assert a["prediction_set"] == b["prediction_set"]  # seeded: the same sets again
        assert a["id"] != b["id"]
        assert math.fsum(a["probabilities"]) == pytest.approx(1.0, abs=1e-12)
        assert a["confidence"] == max(a["probabilities"])
        ranked = sorted(range(10), key=lambda i: -a["probabilities"][i])
        if score in ("aps", "raps", "topk", "lac"):
            # Deterministic sets of these scores hold the most probable labels first.
            assert a["prediction_set"] == sorted(str(i) for i in ranked[: a["set_size"]])


def test_a_drawn_seed_is_returned_and_reproduces_the_sets(builtin: httpx.Client) -> None:
    inputs = load_digits_seq("test").inputs[:64].tolist()
    body = {"inputs": inputs, "score": "aps_randomized", "alpha": 0.2}
    drawn = builtin.post("/v1/models/digits-lru/predict", json=body).json()
    assert isinstance(drawn["seed"], int)
    again = builtin.post(
        "/v1/models/digits-lru/predict", json={**body, "seed": drawn["seed"]}
    ).json()
    assert [p["prediction_set"] for p in again["predictions"]] == [
        p["prediction_set"] for p in drawn["predictions"]
    ]


def test_never_empty_and_class_conditional(builtin: httpx.Client) -> None:
    inputs = load_digits_seq("test").inputs[:64].tolist()
    plain = builtin.post(
        "/v1/models/digits-lru/predict", json={"inputs": inputs, "score": "lac", "alpha": 0.2}
    ).json()["predictions"]
    assert any(p["set_size"] == 0 for p in plain)  # a 98%-accurate model at alpha 0.2
    filled = builtin.post(
        "/v1/models/digits-lru/predict",
        json={"inputs": inputs, "score": "lac", "alpha": 0.2, "never_empty": True},
    ).json()["predictions"]
    for before, after in zip(plain, filled, strict=True):
        expected = before["prediction_set"] or [before["label"]]
        assert after["prediction_set"] == expected
    mondrian = builtin.post(
        "/v1/models/digits-lru/predict",
        json={"inputs": inputs, "class_conditional": True, "alpha": 0.2},
    )
    assert mondrian.status_code == 200, mondrian.text
    assert all(p["set_size"] is not None for p in mondrian.json()["predictions"])


def test_max_set_size_overrides_when_to_abstain(builtin: httpx.Client) -> None:
    inputs = load_digits_seq("test").inputs[:32].tolist()
    body = {"inputs": inputs, "score": "aps", "alpha": 0.05}  # APS: sets of several labels
    default = builtin.post("/v1/models/digits-lru/predict", json=body).json()["predictions"]
    strict = builtin.post("/v1/models/digits-lru/predict", json={**body, "max_set_size": 0}).json()[
        "predictions"
    ]
    lenient = builtin.post(
        "/v1/models/digits-lru/predict", json={**body, "max_set_size": 10}
    ).json()["predictions"]
    assert any(p["set_size"] > 1 for p in default)
    for d, s, l in zip(default, strict, lenient, strict=True):
        assert d["abstain"] is (d["set_size"] > 1)
        assert s["abstain"] is (s["set_size"] > 0)
        assert l["abstain"] is False


# ---- refused requests -----------------------------------------------------------------------

ROW = [[1.0] * 8] * 8

BAD_CALIBRATION_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("alpha zero", {"alpha": 0}, "alpha: Input should be greater than 0"),
    ("alpha one", {"alpha": 1}, "alpha: Input should be less than 1"),
    ("alpha negative", {"alpha": -0.1}, "alpha"),
    ("unknown score", {"score": "apss"}, "score: Input should be 'lac', 'aps'"),
    ("score a number", {"score": 1}, "score"),
    ("online with never_empty", {"online": True, "never_empty": True}, "never_empty cannot"),
    ("online, class-conditional", {"online": True, "class_conditional": True}, "marginal"),
    ("negative max_set_size", {"max_set_size": -1}, "max_set_size"),
    ("negative seed", {"seed": -3}, "seed"),
    ("unknown backend", {"backend": "quantum"}, "unknown backend 'quantum'; registered"),
    ("misspelt option", {"backend_options": {"t_inferenc": 1}}, "t_inferenc: Extra inputs"),
    (
        "option out of range",
        {"backend": "analog_imc", "backend_options": {"t_inference": -5}},
        "t_inference: Input should be greater than or equal to 0",
    ),
    (
        "option of the wrong type",
        {"backend": "stochastic", "backend_options": {"samples": "many"}},
        "samples",
    ),
    ("options not an object", {"backend_options": [1, 2]}, "backend_options"),
]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [pytest.param(extra, fragment, id=case) for case, extra, fragment in BAD_CALIBRATION_BODIES],
)
def test_bad_calibration_requests_get_422_with_the_reason(
    builtin: httpx.Client, extra: dict[str, Any], fragment: str
) -> None:
    response = builtin.post("/v1/models/digits-lru/predict", json={"inputs": [ROW], **extra})
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert fragment in message, message


def test_unknown_backend_message_lists_the_registered_ones(builtin: httpx.Client) -> None:
    response = builtin.post(
        "/v1/models/digits-lru/predict", json={"inputs": [ROW], "backend": "quantum"}
    )
    message = response.json()["error"]["message"]
    for backend in ("torch", "onnxruntime", "analog_imc", "stochastic"):
        assert backend in message


def test_an_uncalibrated_backend_gets_409_naming_the_command(
    test_repository: ModelRepository, server_factory
) -> None:
    settings = Settings(
        model_repository=test_repository.root, **{**TEST_SETTINGS, "allow_uncalibrated": False}
    )
    with server_factory(create_app(settings)) as url, httpx.Client(base_url=url) as http:
        response = http.post("/v1/models/tiny-digits/predict", json={"inputs": [ROW]})
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["code"] == "not_calibrated"
        assert "neuroserve calibrate tiny-digits --version 2 --backend torch" in error["message"]
        status = http.get("/v1/models/tiny-digits/calibration")
        assert status.status_code == 409
        bad = http.post("/v1/models/tiny-digits/predict", json={"inputs": [ROW], "alpha": 2})
        assert bad.status_code == 422  # a malformed request is refused before calibration


def test_allowed_uncalibrated_answers_say_so(client: httpx.Client) -> None:
    body = client.post("/v1/models/tiny-digits/predict", json={"inputs": [ROW]}).json()
    assert body["calibrated"] is False and body["alpha"] is None
    assert "not calibrated" in body["warnings"][0]
    prediction = body["predictions"][0]
    assert prediction["prediction_set"] is None and prediction["abstain"] is None


def test_the_language_model_answers_calibrated_next_token_sets(builtin: httpx.Client) -> None:
    vocabulary = builtin.get("/v1/models/charlm-selective").json()["vocabulary"]
    prompts = ["Return the ", "def __init__(self", "If the argument is"]
    body = builtin.post(
        "/v1/models/charlm-selective/predict", json={"inputs": prompts, "alpha": 0.1}
    ).json()
    assert body["calibrated"] is True and body["score"] == "raps"
    for prediction in body["predictions"]:
        assert len(prediction["probabilities"]) == len(vocabulary) == 97
        assert math.fsum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-12)
        assert set(prediction["prediction_set"]) <= set(vocabulary)
        assert prediction["set_size"] == len(prediction["prediction_set"])
