"""service.metrics and service.api.metrics_route: recording, exposition, multiprocess merging."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import APIRouter, FastAPI, HTTPException, Request, WebSocket
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from service.api.metrics_route import (
    UNMATCHED_ROUTE,
    RequestMetricsMiddleware,
    label_request,
    route_template,
)
from service.api.metrics_route import router as metrics_router

REPO_ROOT = Path(__file__).resolve().parents[2]


def unique(prefix: str) -> str:
    """A label value no other test uses, so tests can share the process-wide registry."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sample(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def parse_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Exposition text -> {(sample name, labels): value}."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# ---- the contract: names from the observability issue ---------------------------------------

REQUIRED_SERIES = {
    "neuroserve_requests_total": "counter",
    "neuroserve_request_duration_seconds_bucket": "histogram",
    "neuroserve_batch_size_bucket": "histogram",
    "neuroserve_active_sessions": "gauge",
    "neuroserve_state_store_operation_duration_seconds_bucket": "histogram",
    "neuroserve_state_store_errors_total": "counter",
    "neuroserve_predictions_total": "counter",
    "neuroserve_prediction_set_size_bucket": "histogram",
    "neuroserve_prediction_confidence_bucket": "histogram",
    "neuroserve_abstentions_total": "counter",
    "neuroserve_feedback_total": "counter",
    "neuroserve_coverage_target_ratio": "gauge",
    "neuroserve_reliability_predictions_total": "counter",
    "neuroserve_reliability_correct_total": "counter",
    "neuroserve_reliability_confidence_sum_total": "counter",
    "neuroserve_aci_alpha": "gauge",
    "neuroserve_spikes_total": "counter",
    "neuroserve_neuron_steps_total": "counter",
    "neuroserve_macs_total": "counter",
    "neuroserve_accumulates_total": "counter",
    "neuroserve_energy_joules_total": "counter",
    "neuroserve_finetune_jobs_total": "counter",
    "neuroserve_finetune_job_duration_seconds_bucket": "histogram",
}


def test_every_required_series_is_defined_with_its_type() -> None:
    defined = metrics.series_names()
    for name, kind in REQUIRED_SERIES.items():
        assert defined.get(name) == kind, name


def test_set_size_buckets_match_the_issue() -> None:
    assert metrics.PREDICTION_SET_SIZE._upper_bounds[:-1] == [0, 1, 2, 3, 5, 10, 20, 50, 100]


# ---- reliability bins ------------------------------------------------------------------------


def test_reliability_bins_are_fifteen_upper_edges() -> None:
    assert len(metrics.RELIABILITY_BIN_LABELS) == 15
    assert metrics.RELIABILITY_BIN_LABELS[0] == "0.0667"
    assert metrics.RELIABILITY_BIN_LABELS[-1] == "1.0000"


@pytest.mark.parametrize(
    ("confidence", "label"),
    [
        (0.0, "0.0667"),  # 0 belongs to the first bin
        (1 / 15, "0.0667"),  # an edge closes its own bin
        (1 / 15 + 1e-9, "0.1333"),
        (2 / 15, "0.1333"),
        (0.5, "0.5333"),
        (14 / 15, "0.9333"),
        (0.99, "1.0000"),
        (1.0, "1.0000"),
    ],
)
def test_reliability_bin_is_closed_on_the_right(confidence: float, label: str) -> None:
    assert metrics.reliability_bin(confidence) == label


@pytest.mark.parametrize("bad", [-0.01, 1.0001, math.nan, math.inf])
def test_reliability_bin_rejects_confidences_outside_the_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match="confidence"):
        metrics.reliability_bin(bad)


def test_reliability_bin_agrees_with_numpy_digitize() -> None:
    # Reference binning: np.digitize with right=True puts x in bin i when e[i-1] < x <= e[i].
    confidences = np.random.default_rng(0).uniform(0.0, 1.0, size=2000)
    inner_edges = np.arange(1, 15) / 15
    expected = np.digitize(confidences, inner_edges, right=True)
    got = [metrics.RELIABILITY_BIN_LABELS.index(metrics.reliability_bin(c)) for c in confidences]
    assert got == expected.tolist()


# ---- recording functions ---------------------------------------------------------------------


def test_record_request_counts_and_times() -> None:
    route = unique("/r")
    metrics.record_request(route, "m", "torch", 200, 0.003)
    metrics.record_request(route, "m", "torch", 200, 0.2)
    metrics.record_request(route, "m", "torch", 503, 0.004)
    labels = {"route": route, "model": "m", "backend": "torch", "protocol": "http"}
    assert sample("neuroserve_requests_total", **labels, status="200") == 2
    assert sample("neuroserve_requests_total", **labels, status="503") == 1
    assert sample("neuroserve_request_duration_seconds_count", **labels) == 3
    assert sample("neuroserve_request_duration_seconds_sum", **labels) == pytest.approx(0.207)
    # 0.003 and 0.004 fall at or below the 0.005 s bucket, 0.2 does not.
    assert sample("neuroserve_request_duration_seconds_bucket", **labels, le="0.005") == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: metrics.record_request("/r", "m", "b", 600, 0.1), "status"),
        (lambda: metrics.record_request("/r", "m", "b", 200, -1.0), "seconds"),
        (lambda: metrics.record_request("/r", "m", "b", 200, math.nan), "seconds"),
        (lambda: metrics.record_batch("m", "b", 0), "batch size"),
        (lambda: metrics.set_active_sessions("m", -1), "session count"),
        (lambda: metrics.record_prediction("m", "b", "aps", -1, 0.5, False), "set_size"),
        (lambda: metrics.record_prediction("m", "b", "aps", 1, 1.5, False), "confidence"),
        (lambda: metrics.record_prediction("m", "b", "aps", 1, 0.5, False, alpha=2.0), "alpha"),
        (lambda: metrics.set_aci_alpha("m", "b", -0.1), "alpha"),
        (lambda: metrics.record_usage("m", "b", {"macs": -5}), "macs"),
        (lambda: metrics.record_job("Not A Status"), "job status"),
        (lambda: metrics.record_job("succeeded", -3.0), "seconds"),
    ],
)
def test_bad_values_raise_naming_the_problem(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.record_request("/r", None, "b", 200, 0.1),
        lambda: metrics.record_prediction("m", "b", "aps", 1, 0.5, "yes"),
        lambda: metrics.record_feedback("m", "b", "aps", 1, 0.5, True),
        lambda: metrics.record_batch("m", "b", 2.0),
        lambda: metrics.record_usage("m", "b", [("macs", 1)]),
    ],
)
def test_wrong_types_raise_type_error(call) -> None:
    with pytest.raises(TypeError):
        call()


def test_record_prediction_sets_histograms_abstentions_and_target() -> None:
    model = unique("m")
    metrics.record_prediction(model, "torch", "aps", 0, 0.97, True, alpha=0.1)
    metrics.record_prediction(model, "torch", "aps", 1, 0.91, False, alpha=0.1)
    metrics.record_prediction(model, "torch", "aps", 4, 0.35, True, alpha=0.05)
    base = {"model": model, "backend": "torch"}
    assert sample("neuroserve_predictions_total", **base) == 3
    assert sample("neuroserve_abstentions_total", **base) == 2
    set_size = {**base, "score": "aps"}
    assert sample("neuroserve_prediction_set_size_bucket", **set_size, le="0.0") == 1
    assert sample("neuroserve_prediction_set_size_bucket", **set_size, le="3.0") == 2
    assert sample("neuroserve_prediction_set_size_bucket", **set_size, le="5.0") == 3
    assert sample("neuroserve_prediction_set_size_sum", **set_size) == 5
    assert sample("neuroserve_prediction_confidence_bucket", **base, le="0.9") == 1
    assert sample("neuroserve_prediction_confidence_count", **base) == 3
    # The target follows the latest request's alpha.
    assert sample("neuroserve_coverage_target_ratio", **set_size) == pytest.approx(0.95)


def test_observing_many_exports_what_observing_one_by_one_does() -> None:
    rng = np.random.default_rng(0)
    buckets = (0.0, 0.1, 0.5, 0.9, 1.0, 3.0)
    amounts = [*rng.uniform(-0.5, 4.0, 500).tolist(), 0.0, 0.1, 0.5, 3.0, 1e9, -1.0]
    exported = []
    for many in (False, True):
        registry = CollectorRegistry()
        histogram = Histogram("h", "h", ["l"], buckets=buckets, registry=registry).labels("x")
        if many:
            metrics.observe_many(histogram, amounts[:250])
            metrics.observe_many(histogram, amounts[250:])
        else:
            for amount in amounts:
                histogram.observe(amount)
        exported.append(
            {
                (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(generate_latest(registry).decode())
                for sample in family.samples
                if not sample.name.endswith("_created")
            }
        )
    one_by_one, batched = exported
    assert batched.keys() == one_by_one.keys()
    for key, value in one_by_one.items():
        assert batched[key] == pytest.approx(value, rel=1e-12), key


def test_recording_a_batch_of_predictions_counts_each_one() -> None:
    model = unique("m")
    metrics.record_predictions(
        model, "torch", "lac", [0, 1, 4], [0.97, 0.91, 0.35], [True, False, True], alpha=0.1
    )
    base = {"model": model, "backend": "torch"}
    assert sample("neuroserve_predictions_total", **base) == 3
    assert sample("neuroserve_abstentions_total", **base) == 2
    sizes = {**base, "score": "lac"}
    assert sample("neuroserve_prediction_set_size_bucket", **sizes, le="3.0") == 2
    assert sample("neuroserve_prediction_set_size_sum", **sizes) == 5
    with pytest.raises(ValueError, match="one entry per prediction"):
        metrics.record_predictions(model, "torch", "lac", [1, 2], [0.5], [False])
    with pytest.raises(ValueError, match="confidence"):
        metrics.record_predictions(model, "torch", "lac", [1, 2], [0.5, 1.5], [False, False])


def test_feedback_counters_give_coverage_and_the_same_ece_as_a_direct_computation() -> None:
    """Reference path: ECE from the exported bin counters equals ECE computed from the pairs."""
    model = unique("m")
    rng = np.random.default_rng(1)
    n = 3000
    confidence = rng.beta(5.0, 1.5, size=n)  # skewed towards 1, like a trained classifier
    correct = rng.uniform(size=n) < confidence**1.3  # a slightly over-confident model
    covered = rng.uniform(size=n) < 0.9
    for c, ok, cov in zip(confidence, correct, covered, strict=True):
        metrics.record_feedback(model, "torch", "lac", bool(cov), float(c), bool(ok))

    base = {"model": model, "backend": "torch"}
    hits = sample("neuroserve_feedback_total", **base, score="lac", covered="true")
    misses = sample("neuroserve_feedback_total", **base, score="lac", covered="false")
    assert hits == covered.sum() and misses == n - covered.sum()

    gaps, total = 0.0, 0.0
    for label in metrics.RELIABILITY_BIN_LABELS:
        count = sample("neuroserve_reliability_predictions_total", **base, bin=label)
        right = sample("neuroserve_reliability_correct_total", **base, bin=label)
        confidence_sum = sample("neuroserve_reliability_confidence_sum_total", **base, bin=label)
        gaps += abs(right - confidence_sum)
        total += count
    ece_from_counters = gaps / total

    bins = np.digitize(confidence, np.arange(1, 15) / 15, right=True)
    ece_direct = (
        sum(abs(correct[bins == b].sum() - confidence[bins == b].sum()) for b in range(15)) / n
    )
    assert total == n
    assert ece_from_counters == pytest.approx(ece_direct, rel=1e-9)
    assert ece_direct > 0.01  # the simulated model really is miscalibrated


def test_record_usage_feeds_the_work_counters_and_skips_derived_keys() -> None:
    model = unique("m")
    usage = {
        "macs": 1000,
        "accumulates": 250,
        "spikes": 30,
        "neuron_steps": 300,
        "energy_joules": 2.5e-9,
        "dense_equivalent_energy_joules": 4.6e-9,
        "sparsity": 0.1,  # derived: spikes / neuron_steps
    }
    metrics.record_usage(model, "analog_imc", usage)
    metrics.record_usage(model, "analog_imc", {"macs": 24, "spikes": None})
    base = {"model": model, "backend": "analog_imc"}
    assert sample("neuroserve_macs_total", **base) == 1024
    assert sample("neuroserve_accumulates_total", **base) == 250
    assert sample("neuroserve_spikes_total", **base) == 30
    assert sample("neuroserve_neuron_steps_total", **base) == 300
    assert sample("neuroserve_energy_joules_total", **base) == pytest.approx(2.5e-9)
    assert sample("neuroserve_dense_equivalent_energy_joules_total", **base) == pytest.approx(
        4.6e-9
    )


def test_record_usage_is_all_or_nothing() -> None:
    model = unique("m")
    with pytest.raises(ValueError, match="spikes"):
        metrics.record_usage(model, "torch", {"macs": 10, "spikes": -1})
    assert sample("neuroserve_macs_total", model=model, backend="torch") == 0


def test_batch_sessions_aci_and_jobs() -> None:
    model = unique("m")
    for size in (1, 3, 64):
        metrics.record_batch(model, "torch", size)
    base = {"model": model, "backend": "torch"}
    assert sample("neuroserve_batch_size_bucket", **base, le="4.0") == 2
    assert sample("neuroserve_batch_size_sum", **base) == 68

    metrics.set_active_sessions(model, 7)
    metrics.set_active_sessions(model, 5)
    assert sample("neuroserve_active_sessions", model=model) == 5

    metrics.set_aci_alpha(model, "torch", 0.12)
    assert sample("neuroserve_aci_alpha", **base) == pytest.approx(0.12)

    status = "done_" + "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:8])
    before = sample("neuroserve_finetune_job_duration_seconds_count")
    metrics.record_job(status)
    metrics.record_job(status, seconds=42.0)
    assert sample("neuroserve_finetune_jobs_total", status=status) == 2
    assert sample("neuroserve_finetune_job_duration_seconds_count") == before + 1


class LostRace(Exception):
    pass


def test_record_store_op_times_and_counts_only_unexpected_errors() -> None:
    store = unique("redis")
    with metrics.record_store_op(store, "get"):
        time.sleep(0.01)
    with pytest.raises(LostRace), metrics.record_store_op(store, "put", expected=(LostRace,)):
        raise LostRace
    with pytest.raises(ConnectionError), metrics.record_store_op(store, "put"):
        raise ConnectionError("redis went away")

    get = {"store": store, "operation": "get"}
    put = {"store": store, "operation": "put"}
    assert sample("neuroserve_state_store_operation_duration_seconds_count", **get) == 1
    assert sample("neuroserve_state_store_operation_duration_seconds_sum", **get) >= 0.01
    assert sample("neuroserve_state_store_operation_duration_seconds_count", **put) == 2
    assert sample("neuroserve_state_store_errors_total", **put) == 1
    assert sample("neuroserve_state_store_errors_total", **get) == 0


# ---- HTTP: middleware and GET /metrics -------------------------------------------------------


def tiny_app() -> FastAPI:
    app = FastAPI()
    app.include_router(metrics_router)
    app.add_middleware(RequestMetricsMiddleware)

    @app.post("/v1/models/{name}/predict")
    def predict(name: str, request: Request) -> dict:
        if name != "digits-gru":
            raise HTTPException(status_code=404, detail=f"no model {name!r}")
        label_request(request, backend="analog_imc")
        return {"model": name}

    @app.post("/v1/sessions/{session_id}/step")
    def step(session_id: str, request: Request) -> dict:
        label_request(request, model="digits-lif", backend="torch")
        return {"session_id": session_id}

    @app.get("/v2/models/{name}/ready")
    def ready(name: str) -> dict:
        return {"name": name}

    @app.get("/boom")
    def boom() -> dict:
        raise RuntimeError("handler bug")

    return app


def test_middleware_labels_by_route_template_model_backend_and_status() -> None:
    client = TestClient(tiny_app(), raise_server_exceptions=False)
    for _ in range(2):
        assert client.post("/v1/models/digits-gru/predict").status_code == 200
    assert client.post("/v1/models/nope-123/predict").status_code == 404
    # Ids no label of another test can contain (unique() labels carry random hex).
    for session in ("id-from-path-1", "id-from-path-2", "id-from-path-3"):
        assert client.post(f"/v1/sessions/{session}/step").status_code == 200
    for _ in range(2):
        assert client.get("/v2/models/digits-gru/ready").status_code == 200
    assert client.get("/boom").status_code == 500
    assert client.get("/no/such/path").status_code == 404

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_samples(response.text)

    def requests(route: str, model: str, backend: str, status: str) -> float:
        labels = {"route": route, "model": model, "backend": backend, "status": status}
        labels["protocol"] = "http"
        return samples.get(("neuroserve_requests_total", frozenset(labels.items())), 0.0)

    predict = "/v1/models/{name}/predict"
    assert requests(predict, "digits-gru", "analog_imc", "200") >= 2
    # A failed request keeps no model taken from the path: random names make no series.
    assert requests(predict, "", "", "404") >= 1
    assert requests("/v1/sessions/{session_id}/step", "digits-lif", "torch", "200") >= 3
    assert requests("/v2/models/{name}/ready", "digits-gru", "", "200") >= 2
    assert requests("/boom", "", "", "500") >= 1
    assert requests(UNMATCHED_ROUTE, "", "", "404") >= 1

    routes = {dict(labels).get("route") for (name, labels) in samples if "route" in dict(labels)}
    leaked = [
        r for r in routes if r and ("nope-123" in r or "id-from-path" in r or "/no/such" in r)
    ]
    assert not leaked, f"route labels that carry ids from request paths: {leaked}"
    assert "/metrics" not in routes  # scrapes are not counted as traffic


def test_metrics_endpoint_speaks_openmetrics_when_asked() -> None:
    client = TestClient(tiny_app())
    response = client.get("/metrics", headers={"accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_route_template_without_a_route_is_unmatched() -> None:
    assert route_template({"type": "http", "path": "/x"}) == UNMATCHED_ROUTE


def test_route_templates_keep_include_prefixes_and_mounts() -> None:
    inner = APIRouter()

    @inner.get("/jobs/{job_id}")
    def job(job_id: str) -> dict:
        return {"job_id": job_id}

    @inner.get("/files/{rest:path}")
    def files(rest: str) -> dict:
        return {"rest": rest}

    sub_app = FastAPI()

    @sub_app.get("/items/{item_id}")
    def item(item_id: str) -> dict:
        return {"item_id": item_id}

    app = tiny_app()
    app.include_router(inner, prefix="/v1/finetune")
    app.mount("/admin", sub_app)
    client = TestClient(app)
    assert client.get("/v1/finetune/jobs/j-42").status_code == 200
    assert client.get("/v1/finetune/files/a/b/c").status_code == 200
    assert client.get("/admin/items/i-7").status_code == 200

    routes = {
        dict(labels)["route"]
        for (name, labels) in parse_samples(client.get("/metrics").text)
        if name == "neuroserve_requests_total"
    }
    assert "/v1/finetune/jobs/{job_id}" in routes
    assert "/admin/items/{item_id}" in routes
    assert not any("j-42" in route or "i-7" in route for route in routes)
    assert any(route.endswith("/files/{rest:path}") for route in routes)


def test_websockets_pass_through_the_middleware() -> None:
    app = tiny_app()

    @app.websocket("/v1/echo")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    with TestClient(app).websocket_connect("/v1/echo") as websocket:
        websocket.send_text("ping")
        assert websocket.receive_text() == "ping"


# ---- several processes -----------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from service import metrics
    model, n, target = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    for i in range(n):
        metrics.record_request("/v1/models/{name}/predict", model, "torch", 200, 0.01 * (i + 1))
        metrics.record_prediction(model, "torch", "aps", i % 3, 0.9, False, alpha=1 - target)
        metrics.record_feedback(model, "torch", "aps", i % 2 == 0, 0.9, True)
    metrics.record_job("succeeded", seconds=float(n))
    """
)

EXPORTER = textwrap.dedent(
    """
    import sys, time
    from service import metrics
    metrics.start_metrics_server(int(sys.argv[1]), addr="127.0.0.1")
    print("ready", flush=True)
    time.sleep(60)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multiprocess_env(folder: Path) -> dict[str, str]:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(folder))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def test_two_processes_are_summed_in_one_exposition(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "prom"  # does not exist yet: the metrics module creates it
    env = multiprocess_env(folder)
    model = unique("mp")
    # Sequential writers: the second one's gauge write is the most recent.
    for n, target in ((3, 0.9), (4, 0.8)):
        subprocess.run(
            [sys.executable, "-c", WRITER, model, str(n), str(target)], env=env, check=True
        )
    assert len(list(folder.glob("*.db"))) >= 2

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    body, _ = metrics.render_metrics()
    samples = parse_samples(body.decode())

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    request = {"route": "/v1/models/{name}/predict", "model": model, "backend": "torch"}
    request["protocol"] = "http"
    assert value("neuroserve_requests_total", **request, status="200") == 7
    assert value("neuroserve_request_duration_seconds_count", **request) == 7
    # sum of 0.01*(1+2+3) and 0.01*(1+2+3+4)
    assert value("neuroserve_request_duration_seconds_sum", **request) == pytest.approx(0.16)
    base = {"model": model, "backend": "torch"}
    assert value("neuroserve_predictions_total", **base) == 7
    # covered on even i: 2 of 3 plus 2 of 4
    assert value("neuroserve_feedback_total", **base, score="aps", covered="true") == 4
    assert value("neuroserve_finetune_jobs_total", status="succeeded") == 2
    assert value("neuroserve_coverage_target_ratio", **base, score="aps") == pytest.approx(0.8)

    metrics.clear_multiprocess_dir()
    assert list(folder.glob("*.db")) == []


def test_worker_exporter_serves_the_merged_values_over_http(tmp_path: Path) -> None:
    folder = tmp_path / "prom"
    env = multiprocess_env(folder)
    model = unique("worker")
    subprocess.run([sys.executable, "-c", WRITER, model, "5", "0.9"], env=env, check=True)
    port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-c", EXPORTER, str(port)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert exporter.stdout.readline().strip() == "ready"
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        # A job recorded after the exporter started shows up too: it reads the files per scrape.
        subprocess.run([sys.executable, "-c", WRITER, model, "1", "0.9"], env=env, check=True)
        later = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)
    labels = frozenset({"model": model, "backend": "torch"}.items())
    assert parse_samples(text)[("neuroserve_predictions_total", labels)] == 5
    assert parse_samples(later)[("neuroserve_predictions_total", labels)] == 6
