"""Calibrated answers over real HTTP: coverage of the conformal sets on the digits test split,
agreement with the calibration of each answer's own position applied in-process, every score
and option (sets never empty by default), the server's uniform draw for randomised scores,
abstention, uncalibrated answers past the horizon, and the 4xx answers for bad calibration
requests (422) and uncalibrated backends (409)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from calibration import SCORE_NAMES, CalibrationArtifact
from calibration.position_report import coverage_interval
from models.digits import load_digits_seq
from models.repository import ModelRepository, default_repository_root
from service.api.v1_models import IGNORED_SEED_WARNING
from service.app import create_app
from service.dataplane.calibration_store import CalibrationStore, StoredCalibration
from service.dataplane.conformal_draws import ConformalDraws
from service.dataplane.predictions import last_step_logits
from service.settings import Settings
from tests.service.conftest import TEST_SETTINGS, running_server
from tests.service.test_predict_http import exactly_as_modelled

ALPHA = 0.1
N_CONFORMAL = 200  # conformal scores per step in the committed digits calibrations
DIGITS = [str(d) for d in range(10)]
BATCH = 64  # the default max_batch_size
CONFORMAL_KEY = "calibrated-predict-test-key"  # the keyed server's: its draws are reproducible
REPOSITORY = ModelRepository(default_repository_root())


def coverage_band(alpha: float, n_test: int) -> tuple[float, float]:
    """Where the plain split-conformal coverage of n_test points falls, from the committed
    calibrations' N_CONFORMAL scores per step (three standard errors of both samples)."""
    return coverage_interval(alpha, N_CONFORMAL, n_test)


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
        answer = exactly_as_modelled(response.json())
        assert answer["calibrated"] is True and answer["warnings"] == []
        predictions += answer["predictions"]
    return predictions


def empirical_coverage(predictions: list[dict[str, Any]], labels: torch.Tensor) -> float:
    hits = [str(int(y)) in p["prediction_set"] for p, y in zip(predictions, labels, strict=True)]
    return sum(hits) / len(hits)


def stored(name: str, backend: str = "torch") -> StoredCalibration:
    calibration = CalibrationStore(REPOSITORY).get(name, "1", backend)
    assert calibration is not None
    return calibration


def expected_set(
    artifact: CalibrationArtifact,
    prediction: dict[str, Any],
    score: str,
    alpha: float,
    uniform: float | None = None,
    never_empty: bool = True,
    labels: list[str] = DIGITS,
) -> list[str]:
    """The reference set of a served prediction: its calibrated probabilities through
    `artifact` at `alpha` (with the U of a randomised score), the top label added to an
    empty set when `never_empty`."""
    probs = torch.tensor([prediction["probabilities"]], dtype=torch.float64)  # [1, C]
    draw = None if uniform is None else torch.tensor([uniform], dtype=torch.float64)  # [1]
    members = artifact.sets_at_level(probs, alpha, score, uniform=draw)[0].nonzero().flatten()
    found = [labels[int(i)] for i in members]
    return found or ([prediction["label"]] if never_empty else [])


@pytest.fixture(scope="module")
def builtin(builtin_server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=builtin_server_url, timeout=120) as http:
        yield http


@pytest.fixture(scope="module")
def keyed() -> Iterator[httpx.Client]:
    """The built-in models served with a known conformal key."""
    settings = Settings(model_repository=default_repository_root(), conformal_key=CONFORMAL_KEY)
    with (
        running_server(create_app(settings)) as url,
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        yield http


# ---- the must-show: coverage and accuracy on the digits test split ---------------------------


def test_digits_lru_sets_cover_the_test_split_at_the_recorded_accuracy(
    builtin: httpx.Client,
) -> None:
    """Plain sets cover within the split-conformal band; the default sets are the same sets
    with the top label added where they were empty, so they cover at least as often and
    abstain exactly when they do not hold one label."""
    test_split = load_digits_seq("test")  # 397 images the model and its calibration never saw
    labels, n = test_split.labels, len(test_split)
    plain = predict_split(builtin, "digits-lru", test_split.inputs, alpha=ALPHA, never_empty=False)
    predictions = predict_split(builtin, "digits-lru", test_split.inputs, alpha=ALPHA)
    low, high = coverage_band(ALPHA, n)
    plain_coverage = empirical_coverage(plain, labels)
    assert low <= plain_coverage <= high
    assert empirical_coverage(predictions, labels) >= plain_coverage
    recorded = builtin.get("/v1/models/digits-lru").json()["metrics"]["test_accuracy"]
    correct = sum(p["label"] == str(int(y)) for p, y in zip(predictions, labels, strict=True))
    # Batches of 64 may reorder float32 sums against the recorded single-batch run: at most a
    # near-tie can flip, so one example of slack.
    assert correct / n == pytest.approx(recorded, abs=1.0 / n)
    for p, q in zip(predictions, plain, strict=True):
        assert p["calibrated"] is True and p["position"] == 8  # all 8 rows read
        assert p["prediction_set"] == (q["prediction_set"] or [q["label"]])
        assert p["set_size"] == len(p["prediction_set"]) >= 1 and p["label"] in p["prediction_set"]
        assert p["abstain"] is (p["set_size"] != 1)  # the server's default abstain_set_size
        assert q["abstain"] is (q["set_size"] != 1)
        assert set(p["prediction_set"]) <= set(DIGITS)


@pytest.mark.parametrize("rows", [8, 3])
def test_served_answers_match_their_positions_calibration_applied_in_process(
    builtin: httpx.Client, rows: int
) -> None:
    """A sequence of t rows is answered with the calibration of position t: its map and its
    conformal scores, not another position's."""
    name = "digits-snn"
    calibration = stored(name)
    artifact = calibration.at(rows)
    inputs = load_digits_seq("test").inputs[:48, :rows]  # [48, rows, 8]
    logits = last_step_logits(REPOSITORY.load(name).model, inputs).double()  # [48, 10]
    probs, sets = artifact.predict(logits, ALPHA, "lac")
    response = builtin.post(
        f"/v1/models/{name}/predict",
        json={"inputs": inputs.tolist(), "score": "lac", "never_empty": False},
    )
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    assert all(p["calibrated"] and p["position"] == rows for p in served)
    served_probs = torch.tensor([p["probabilities"] for p in served], dtype=torch.float64)
    # The torch backend steps the spiking model one step at a time where the reference runs
    # its forward: float32 sums in another order, nothing more.
    torch.testing.assert_close(served_probs, probs, atol=1e-5, rtol=0)
    other = calibration.at(3 if rows == 8 else 8).calibrate(logits)  # another position's map
    assert (served_probs - other).abs().max() > 1e-3
    for p, row in zip(served, sets, strict=True):
        assert p["prediction_set"] == [str(i) for i in row.nonzero().flatten().tolist()]


def test_rows_past_the_calibrated_horizon_answer_the_raw_softmax_without_a_set(
    builtin: httpx.Client,
) -> None:
    """No calibration covers a ninth row: the answer says so instead of borrowing step 8's."""
    images = load_digits_seq("test").inputs[:4]
    nine = torch.cat([images, images[:, -1:]], dim=1)  # [4, 9, 8]
    body = builtin.post("/v1/models/digits-lru/predict", json={"inputs": nine.tolist()}).json()
    assert body["calibrated"] is False
    assert len(body["warnings"]) == 1 and "position 9 lies past the 8 steps" in body["warnings"][0]
    raw = torch.softmax(last_step_logits(REPOSITORY.load("digits-lru").model, nine).double(), -1)
    served = torch.tensor([p["probabilities"] for p in body["predictions"]], dtype=torch.float64)
    torch.testing.assert_close(served, raw, atol=1e-5, rtol=0)
    for p in body["predictions"]:
        assert (p["calibrated"], p["position"]) == (False, 9)
        assert p["prediction_set"] is None and p["set_size"] is None and p["abstain"] is None


def test_inputs_far_outside_the_training_range_are_answered_with_a_warning(
    builtin: httpx.Client,
) -> None:
    """Pixel values of 24 (the digits span 0..16) are answered as usual, with a warning."""
    body = builtin.post("/v1/models/digits-lru/predict", json={"inputs": [[[24.0] * 8] * 8]})
    answer = body.json()
    assert body.status_code == 200 and answer["calibrated"] is True
    assert answer["predictions"][0]["prediction_set"] is not None
    assert len(answer["warnings"]) == 1
    assert "far outside the range [0, 16]" in answer["warnings"][0]


# ---- scores and options -----------------------------------------------------------------------


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_every_score_answers_consistent_sets(keyed: httpx.Client, score: str) -> None:
    """Every score's set is its position's calibrated set (with the server's U for the
    randomised ones), never empty, and the most probable labels first."""
    inputs = load_digits_seq("test").inputs[:32]
    body = {"inputs": inputs.tolist(), "score": score, "alpha": 0.05}
    first = keyed.post("/v1/models/digits-lru/predict", json=body).json()
    second = keyed.post("/v1/models/digits-lru/predict", json=body).json()
    assert (first["score"], first["alpha"]) == (score, 0.05)
    assert "seed" not in first and first["warnings"] == []
    randomized = score.endswith("_randomized")
    artifact = stored("digits-lru").at(8)
    draws = ConformalDraws(CONFORMAL_KEY)
    for a, b in zip(first["predictions"], second["predictions"], strict=True):
        assert a["id"] != b["id"]
        assert a["calibrated"] is True and a["position"] == 8
        uniform = draws.uniform(a["id"]) if randomized else None
        assert a["prediction_set"] == expected_set(artifact, a, score, 0.05, uniform)
        if not randomized:  # deterministic: the same sets again
            assert a["prediction_set"] == b["prediction_set"]
        assert a["set_size"] == len(a["prediction_set"]) >= 1
        assert math.fsum(a["probabilities"]) == pytest.approx(1.0, abs=1e-12)
        assert a["confidence"] == max(a["probabilities"])
        ranked = sorted(range(10), key=lambda i: -a["probabilities"][i])
        if score in ("aps", "raps", "topk", "lac"):
            # Deterministic sets of these scores hold the most probable labels first.
            assert a["prediction_set"] == sorted(str(i) for i in ranked[: a["set_size"]])


@pytest.mark.parametrize("seed", [None, 7, -3, "12345"])
def test_randomised_sets_use_the_servers_draw_whatever_seed_is_sent(
    keyed: httpx.Client, seed: int | str | None
) -> None:
    """U = HMAC(server key, prediction id): every set is reproduced from its id with the key
    (and not with another key); a request's seed is ignored, with a warning."""
    inputs = load_digits_seq("test").inputs[:64].tolist()
    body = {"inputs": inputs, "score": "aps_randomized", "alpha": 0.2, "never_empty": False}
    answer = keyed.post(
        "/v1/models/digits-lru/predict", json=body if seed is None else {**body, "seed": seed}
    ).json()
    assert "seed" not in answer
    assert answer["warnings"] == ([] if seed is None else [IGNORED_SEED_WARNING])
    artifact = stored("digits-lru").at(8)
    served = [p["prediction_set"] for p in answer["predictions"]]

    def reproduced(key: str) -> list[list[str]]:
        draws = ConformalDraws(key)
        return [
            expected_set(artifact, p, "aps_randomized", 0.2, draws.uniform(p["id"]), False)
            for p in answer["predictions"]
        ]

    assert served == reproduced(CONFORMAL_KEY)
    # At alpha 0.2 a confident digit's set is {top} or {} depending on U: another key's draws
    # change some of 64 sets (all equal has probability far below 1e-9).
    assert served != reproduced("another key")


def test_never_empty_and_class_conditional(builtin: httpx.Client) -> None:
    """Sets are never empty unless `never_empty: false` asks for the plain set; an empty
    plain set abstains. Class-conditional sets are served too."""
    inputs = load_digits_seq("test").inputs[:64].tolist()
    body = {"inputs": inputs, "score": "lac", "alpha": 0.2}
    plain = builtin.post(
        "/v1/models/digits-lru/predict", json={**body, "never_empty": False}
    ).json()["predictions"]
    assert any(p["set_size"] == 0 for p in plain)  # a 98%-accurate model at alpha 0.2
    default = builtin.post("/v1/models/digits-lru/predict", json=body).json()["predictions"]
    filled = builtin.post(
        "/v1/models/digits-lru/predict", json={**body, "never_empty": True}
    ).json()["predictions"]
    for before, after, asked in zip(plain, default, filled, strict=True):
        expected = before["prediction_set"] or [before["label"]]
        assert after["prediction_set"] == asked["prediction_set"] == expected
        assert before["abstain"] is (before["set_size"] != 1)
        assert after["abstain"] is (after["set_size"] != 1)
    mondrian = builtin.post(
        "/v1/models/digits-lru/predict",
        json={"inputs": inputs, "class_conditional": True, "alpha": 0.2},
    )
    assert mondrian.status_code == 200, mondrian.text
    assert all(p["set_size"] >= 1 for p in mondrian.json()["predictions"])


def test_max_set_size_overrides_when_to_abstain(builtin: httpx.Client) -> None:
    """`abstain` is true when the (never empty) set holds more than max_set_size labels."""
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
        assert d["set_size"] >= 1
        assert d["abstain"] is (d["set_size"] > 1)
        assert s["abstain"] is True
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
    ("seed of the wrong type", {"seed": [7]}, "seed"),
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
    assert (prediction["calibrated"], prediction["position"]) == (False, 8)
    assert prediction["prediction_set"] is None and prediction["abstain"] is None


def test_the_language_model_answers_each_prompt_with_its_context_lengths_calibration(
    builtin: httpx.Client,
) -> None:
    """Each prompt is answered with the calibration of its length's bucket (LAC by default);
    a prompt past the calibrated 1024 characters is answered uncalibrated, without a set."""
    vocabulary = builtin.get("/v1/models/charlm-selective").json()["vocabulary"]
    calibration = stored("charlm-selective")
    assert calibration.positional.horizon == 1024
    beyond = ("If the argument is " * 60)[:1025]
    prompts = ["R", "Ret", "Return ", "Return the ", "def __init__(self", beyond]
    body = builtin.post(
        "/v1/models/charlm-selective/predict", json={"inputs": prompts, "alpha": 0.1}
    ).json()
    assert body["score"] == "lac" and body["calibrated"] is False  # the last prompt is not
    assert len(body["warnings"]) == 1
    assert "position 1025 lies past the 1024" in body["warnings"][0]
    model = REPOSITORY.load("charlm-selective").model
    for prompt, prediction in zip(prompts, body["predictions"], strict=True):
        tokens = torch.tensor([[vocabulary.index(char) for char in prompt]])  # [1, T]
        logits = last_step_logits(model, tokens).double()  # [1, 97]
        artifact = calibration.at(len(prompt))
        expected = torch.softmax(logits, -1) if artifact is None else artifact.calibrate(logits)
        served = torch.tensor([prediction["probabilities"]], dtype=torch.float64)
        torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)
        assert len(prediction["probabilities"]) == len(vocabulary) == 97
        assert math.fsum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-12)
        assert prediction["position"] == len(prompt)
        assert prediction["calibrated"] is (artifact is not None)
        if artifact is None:
            assert prediction["prediction_set"] is None and prediction["set_size"] is None
            continue
        members = prediction["prediction_set"]
        assert members == expected_set(artifact, prediction, "lac", 0.1, labels=vocabulary)
        assert prediction["label"] in members and prediction["set_size"] == len(members)
