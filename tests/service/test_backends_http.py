"""Hardware backends behind `/v1/models/{name}/predict` over real HTTP: every built-in backend
answers calibrated sets with its usage; conformal coverage holds on the simulated analog
chip; backend options the calibration was not fitted with are answered uncalibrated; a
sampling backend reports its epistemic uncertainty from the predictive mean; model info lists
the backends and their calibration per step; an installed plugin works, an unavailable one
gets 503."""

from __future__ import annotations

import math
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from hardware_backends.registry import ENTRY_POINT_GROUP, default_registry, prepare_runner
from hardware_backends.stochastic import mutual_information, predictive_probabilities
from models.digits import load_digits_seq
from models.repository import ModelRepository, default_repository_root
from service.dataplane.plane import runner_key
from service.dataplane.predictions import run_last_step
from tests.service.test_calibrated_predict import coverage_band, empirical_coverage, predict_split

BUILT_IN_BACKENDS = ("torch", "onnxruntime", "analog_imc", "stochastic")
STEPS = 8  # rows of a digit: the calibrated horizon of the digits models
USAGE_KEYS = ("macs", "accumulates", "spikes", "neuron_steps", "sparsity", "energy_joules",
              "dense_equivalent_energy_joules")  # fmt: skip


@pytest.fixture(scope="module")
def builtin(builtin_server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=builtin_server_url, timeout=120) as http:
        yield http


def predict(http: httpx.Client, model: str, inputs: torch.Tensor, **body: Any) -> dict[str, Any]:
    response = http.post(f"/v1/models/{model}/predict", json={"inputs": inputs.tolist(), **body})
    assert response.status_code == 200, response.text
    return response.json()


def metric_value(http: httpx.Client, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when the series does not exist yet)."""
    for line in http.get("/metrics").text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if found == labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- every built-in backend -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["digits-lru", "digits-snn", "digits-snn-lite"])
@pytest.mark.parametrize("backend", BUILT_IN_BACKENDS)
def test_every_built_in_backend_answers_calibrated_sets_with_usage(
    builtin: httpx.Client, backend: str, model: str
) -> None:
    inputs = load_digits_seq("test").inputs[:16]  # [16, 8, 8]
    macs_before = metric_value(builtin, "neuroserve_macs_total", backend=backend, model=model)
    body = predict(builtin, model, inputs, backend=backend)
    assert (body["backend"], body["calibrated"], body["warnings"]) == (backend, True, [])
    usage = body["usage"]
    assert (usage["sequences"], usage["steps"]) == (16, 16 * 8)
    assert usage["macs"] > 0 and usage["energy_joules"] > 0
    assert usage["dense_equivalent_energy_joules"] >= usage["energy_joules"]
    if model.startswith("digits-snn"):
        assert usage["spikes"] > 0 and 0 < usage["sparsity"] < 1
        assert usage["accumulates"] > 0
    else:
        assert usage["spikes"] == 0 and usage["sparsity"] is None
    macs_after = metric_value(builtin, "neuroserve_macs_total", backend=backend, model=model)
    assert macs_after - macs_before == usage["macs"]  # the same figure reaches the metrics
    for prediction in body["predictions"]:
        assert prediction["calibrated"] is True and prediction["position"] == STEPS
        assert prediction["set_size"] == len(prediction["prediction_set"]) >= 1
        assert (prediction["epistemic"] is not None) is (backend == "stochastic")


def test_served_usage_is_the_runners_usage(builtin: httpx.Client) -> None:
    repository = ModelRepository(default_repository_root())
    card = repository.card("digits-snn")
    inputs = load_digits_seq("test").inputs[:16]
    runner = prepare_runner("torch", repository.load("digits-snn").model, model_key="ref/1")
    _, expected = run_last_step(runner, inputs)
    served = predict(builtin, card.name, inputs, backend="torch")["usage"]
    for key in USAGE_KEYS:
        assert served[key] == pytest.approx(expected.to_dict()[key], rel=1e-12), key


def test_model_info_lists_backends_and_their_calibration(builtin: httpx.Client) -> None:
    """Every built-in backend is calibrated once per step 1..8, each step on the same 400
    calibration examples (split into map-fitting and conformal halves)."""
    info = builtin.get("/v1/models/digits-lru").json()
    backends = {entry["name"]: entry for entry in info["backends"]}
    assert set(BUILT_IN_BACKENDS) <= set(backends)
    for name in BUILT_IN_BACKENDS:
        entry = backends[name]
        assert entry["available"] is True and entry["reason"] is None
        assert entry["calibrated"] is True
        calibration = entry["calibration"]
        assert calibration["source"]["data"] == "digits-seq/rows/calibration"
        assert calibration["backend_options"] == {}
        assert re.fullmatch(r"[0-9a-f]{16}", calibration["calibration_id"])
        assert calibration["horizon"] == STEPS
        positions = calibration["positions"]
        assert [(p["first"], p["last"]) for p in positions] == [(t, t) for t in range(1, STEPS + 1)]
        for position in positions:
            assert position["n_conformal"] + position["n_tune"] == 400
            assert position["map"]["kind"] in ("identity", "temperature", "vector_scaling")
            metrics = position["metrics"]
            assert metrics["nll_after"] >= 0
            assert 0 <= metrics["ece_after"] <= 1 and 0 <= metrics["accuracy_after"] <= 1
        for metric in ("nll", "ece", "accuracy"):  # after all 8 rows: a confident model
            assert 0 <= positions[-1]["metrics"][f"{metric}_after"] < 1.0


# ---- the analog chip: coverage after calibrating on it ----------------------------------------


def test_conformal_coverage_holds_on_the_analog_backend(builtin: httpx.Client) -> None:
    test_split = load_digits_seq("test")
    alpha = 0.1
    predictions = predict_split(
        builtin, "digits-lru", test_split.inputs, alpha=alpha, backend="analog_imc"
    )
    coverage = empirical_coverage(predictions, test_split.labels)
    low, _ = coverage_band(alpha, len(test_split))  # never-empty sets: only the floor holds
    assert coverage >= low, coverage


def test_options_other_than_the_calibrated_ones_are_answered_uncalibrated(
    builtin: httpx.Client,
) -> None:
    """The analog calibration was fitted with no options: an hour of conductance drift is
    another output distribution, answered with the raw softmax, no set and a warning that
    names the command calibrating those options."""
    inputs = load_digits_seq("test").inputs[:4]
    body = predict(
        builtin, "digits-lru", inputs, backend="analog_imc", backend_options={"t_inference": 3600}
    )
    assert body["calibrated"] is False
    (warning,) = body["warnings"]
    assert "fitted with backend options {}" in warning and "'t_inference': 3600" in warning
    assert "neuroserve calibrate digits-lru --backend analog_imc --backend-option" in warning
    for prediction in body["predictions"]:
        assert (prediction["calibrated"], prediction["position"]) == (False, STEPS)
        assert prediction["prediction_set"] is None and prediction["set_size"] is None
        assert prediction["abstain"] is None
        assert math.fsum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-12)
    calibrated = predict(builtin, "digits-lru", inputs, backend="analog_imc")
    assert calibrated["calibrated"] is True and calibrated["warnings"] == []


# ---- a sampling backend: predictive mean and epistemic uncertainty ----------------------------


def test_sampling_backend_calibrates_the_predictive_mean(builtin: httpx.Client) -> None:
    repository = ModelRepository(default_repository_root())
    card = repository.card("digits-lru")
    # Noisy digits make the weight samples disagree, so the epistemic part is not ~0.
    inputs = load_digits_seq("test", shift="gaussian_noise").inputs[:32]
    runner = prepare_runner(
        "stochastic", repository.load(card.name).model, model_key=runner_key(card)
    )
    sampled, _ = run_last_step(runner, inputs)  # [S, 32, 10]
    assert sampled.dim() == 3 and sampled.shape[0] > 1
    body = predict(builtin, card.name, inputs, backend="stochastic")
    served = torch.tensor([p["probabilities"] for p in body["predictions"]], dtype=torch.float64)
    epistemic = torch.tensor([p["epistemic"] for p in body["predictions"]], dtype=torch.float64)
    # This calibration's map after all 8 rows is the identity, so the served probabilities are
    # the predictive mean itself; the references compute in float32.
    backends = {b["name"]: b for b in builtin.get("/v1/models/digits-lru").json()["backends"]}
    last = backends["stochastic"]["calibration"]["positions"][-1]
    assert (last["last"], last["map"]) == (STEPS, {"kind": "identity"})
    torch.testing.assert_close(
        served, predictive_probabilities(sampled).double(), atol=2e-6, rtol=0
    )
    torch.testing.assert_close(epistemic, mutual_information(sampled).double(), atol=2e-6, rtol=0)
    assert epistemic.max() > 1e-3
    entropy = torch.tensor([p["entropy"] for p in body["predictions"]], dtype=torch.float64)
    assert (epistemic <= entropy + 1e-9).all()  # MI is a part of the total entropy


# ---- plugins: one that runs, one that cannot --------------------------------------------------

PLUGIN_MODULE = textwrap.dedent(
    '''
    """A third-party backend package: a mirror of the torch backend, and a chip that is absent."""

    from hardware_backends.torch_backend import TorchBackend


    class MirrorBackend:
        name = "mirror"

        def availability(self):
            return None

        def prepare(self, model, *, model_key, options=None):
            return TorchBackend().prepare(model, model_key=model_key, options=options)


    class OfflineChipBackend:
        name = "offline_chip"

        def availability(self):
            return "no offline chip is attached to this host"

        def prepare(self, model, *, model_key, options=None):
            raise RuntimeError("an unavailable backend is never asked to prepare")
    '''
)


@pytest.fixture()
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A distribution registering two backends, put on sys.path as pip would install it."""
    (tmp_path / "ns_http_plugin.py").write_text(PLUGIN_MODULE)
    dist_info = tmp_path / "ns_http_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: ns-http-plugin\nVersion: 0.1\n"
    )
    (dist_info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nmirror = ns_http_plugin:MirrorBackend\n"
        "offline_chip = ns_http_plugin:OfflineChipBackend\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ns_http_plugin", raising=False)
    default_registry().refresh()
    yield
    monkeypatch.undo()
    default_registry().refresh()


@pytest.mark.usefixtures("installed_plugin")
def test_an_installed_plugin_is_served_and_an_unavailable_one_gets_503(
    builtin: httpx.Client,
) -> None:
    backends = {b["name"]: b for b in builtin.get("/v1/models/digits-lru").json()["backends"]}
    assert backends["mirror"]["available"] is True and backends["mirror"]["calibrated"] is False
    assert backends["offline_chip"]["available"] is False
    assert "no offline chip" in backends["offline_chip"]["reason"]

    inputs = [[[0.0] * 8] * 8]
    offline = builtin.post(
        "/v1/models/digits-lru/predict", json={"inputs": inputs, "backend": "offline_chip"}
    )
    assert offline.status_code == 503, offline.text
    assert offline.json()["error"]["code"] == "backend_unavailable"
    assert "no offline chip is attached" in offline.json()["error"]["message"]

    mirror = builtin.post(
        "/v1/models/digits-lru/predict", json={"inputs": inputs, "backend": "mirror"}
    )
    assert mirror.status_code == 409, mirror.text  # runs here, but nobody calibrated it
    assert "neuroserve calibrate digits-lru --version 1 --backend mirror" in mirror.text


@pytest.mark.usefixtures("installed_plugin")
def test_a_plugin_backend_runs_the_model(client: httpx.Client) -> None:
    # The test server allows uncalibrated answers: the mirror must equal the torch backend.
    inputs = [[[float((t * 8 + f) % 17) for f in range(8)] for t in range(8)]] * 3
    answers = {
        backend: client.post(
            "/v1/models/tiny-digits/predict", json={"inputs": inputs, "backend": backend}
        ).json()
        for backend in ("mirror", "torch")
    }
    assert answers["mirror"]["backend"] == "mirror"
    assert answers["mirror"]["calibrated"] is False
    assert [p["probabilities"] for p in answers["mirror"]["predictions"]] == [
        p["probabilities"] for p in answers["torch"]["predictions"]
    ]
