"""A real Prometheus scraping a real neuroserve server.

The server runs as its own `neuroserve serve` process (so its counters start at zero and hold
only what these tests send) over a temporary copy of the built-in digits models (a fine-tuning
job publishes a new version there). Prometheus runs from a generated config: 1 s scrapes and
rule evaluations, the repository's rules file, storage in a temporary folder.

- Every metric family the issue promises has samples once the server has served predictions
  (online ones among them), a session step, feedback and a fine-tuning job.
- The coverage recording rule, read back through Prometheus's HTTP API, equals the coverage
  computed from the `covered` flags of the feedback answers.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from models.digits import load_digits_seq
from models.repository import default_repository_root
from service import metrics
from service.settings import Settings
from tests.conftest import free_tcp_port
from tests.deploy.helpers import RULES_FILE
from tests.service.test_cli import COMMAND, cli_env

PROMETHEUS_BINARY = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS_BINARY is None,
    reason="the prometheus binary is not installed (Debian: apt-get install prometheus)",
)

MODEL = "digits-lru"
SPIKING_MODEL = "digits-snn"
VERSION = "1"  # pinned: the fine-tuning job publishes version 2 (uncalibrated)
BACKEND = "torch"
SCORE = "raps"
COVERAGE_RULE = "model_backend_score:neuroserve_coverage:ratio_rate5m"
SERIES = f'model="{MODEL}",backend="{BACKEND}",score="{SCORE}"'
START_TIMEOUT_S = 90.0  # server and Prometheus start-up on a busy two-core machine
LIVE_TEST_BUDGET_S = 150.0  # the whole live test, well inside the rule's 5 minute window
JOB_TIMEOUT_S = 180.0
REQUEST_BATCH = 50  # sequences per predict request (the server's default limit is 64)
ALPHA = 0.1  # the default miscoverage
GAMMA = Settings.model_fields["aci_gamma"].default  # the server runs with default settings
# A request or job in flight is never the reason a test waits: these series need a failure.
NEVER_RECORDED_WITHOUT_FAILURES = {metrics.STORE_ERRORS._name}

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], what: str, timeout: float) -> T:
    """Poll `probe` until it returns something other than None; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = probe()
        except httpx.TransportError:
            result = None
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.25)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"


# ---- the server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a `neuroserve serve` process over a copy of the digits models."""
    workdir = tmp_path_factory.mktemp("live-server")
    repository = workdir / "repository"
    for name in (MODEL, SPIKING_MODEL):
        shutil.copytree(default_repository_root() / name, repository / name)
    port = free_tcp_port()
    log = workdir / "server.log"
    command = [*COMMAND, "serve", "--host", "127.0.0.1", "--port", str(port),
               "--repository", str(repository), "--log-level", "warning"]  # fmt: skip
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env=cli_env(),
        )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool | None:
            if process.poll() is not None:
                pytest.fail(f"neuroserve serve exited early:\n{log_tail(log)}")
            return httpx.get(f"{base_url}/v2/health/ready", timeout=5).status_code == 200 or None

        wait_for(ready, "neuroserve serve to be ready", START_TIMEOUT_S)
        yield base_url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


def predict(http: httpx.Client, model: str, inputs: Any, **body: Any) -> list[dict[str, Any]]:
    """Predictions for every sequence of `inputs`, in requests of at most REQUEST_BATCH."""
    predictions = []
    for start in range(0, len(inputs), REQUEST_BATCH):
        batch = inputs[start : start + REQUEST_BATCH].tolist()
        response = http.post(
            f"/v1/models/{model}/predict",
            json={"inputs": batch, "version": VERSION, "backend": BACKEND, **body},
        )
        assert response.status_code == 200, response.text
        predictions += response.json()["predictions"]
    return predictions


def send_true_labels(
    http: httpx.Client, predictions: list[dict[str, Any]], labels: list[int]
) -> list[bool]:
    """Feedback with the true labels; the `covered` flag of every answer."""
    covered = []
    for prediction, label in zip(predictions, labels, strict=True):
        answer = http.post(
            "/v1/feedback", json={"prediction_id": prediction["id"], "label": str(label)}
        )
        assert answer.status_code == 200, answer.text
        assert isinstance(answer.json()["covered"], bool), answer.json()
        covered.append(answer.json()["covered"])
    return covered


def feedback_counts(http: httpx.Client) -> dict[str, float]:
    """{"true": n, "false": m}: the server's feedback counters of MODEL, BACKEND and SCORE."""
    wanted = {"model": MODEL, "backend": BACKEND, "score": SCORE}
    return {
        sample.labels["covered"]: sample.value
        for family in text_string_to_metric_families(http.get("/metrics").text)
        for sample in family.samples
        if sample.name == "neuroserve_feedback_total"
        and {key: sample.labels.get(key) for key in wanted} == wanted
    }


# ---- Prometheus -----------------------------------------------------------------------------


class Prometheus:
    """A prometheus process scraping one target every second; `stop` ends it."""

    def __init__(self, workdir: Path, target: str) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES_FILE)],
            "scrape_configs": [
                {"job_name": "neuroserve", "static_configs": [{"targets": [target]}]}
            ],
        }
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        port = free_tcp_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log_file:
            self.process = subprocess.Popen(
                [PROMETHEUS_BINARY, f"--config.file={config_file}",
                 f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_ready(self, timeout: float) -> None:
        def ready() -> bool | None:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited early:\n{log_tail(self.log)}")
            return httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200 or None

        wait_for(ready, "prometheus to be ready", timeout)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result vector of an instant query at the current time."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", response.text
        assert body["data"]["resultType"] == "vector", body
        return body["data"]["result"]

    def values(self, promql: str, by: str) -> dict[str, float]:
        """{value of label `by`: sample value} of an instant query."""
        return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(promql)}

    def stop(self) -> None:
        stop(self.process)


# ---- tests ----------------------------------------------------------------------------------


@needs_prometheus
def test_the_coverage_rule_read_from_prometheus_equals_the_feedback_coverage(
    http: httpx.Client, server: str, tmp_path: Path
) -> None:
    started = time.monotonic()

    def budget_left() -> float:
        return max(1.0, LIVE_TEST_BUDGET_S - (time.monotonic() - started))

    test_split = load_digits_seq("test")
    inputs, labels = test_split.inputs, test_split.labels.tolist()

    # rate() counts what a series gained after its first sample in the window, so both series
    # (covered and not) must exist, and hold still, before Prometheus first scrapes them.
    # Small plain sets (alpha 0.5, never_empty off: the top label is not added to an empty
    # set) miss often enough that a few dozen labels give both outcomes.
    warm_up: list[bool] = []
    for start in range(0, 150, 30):
        chunk = slice(start, start + 30)
        small = predict(http, MODEL, inputs[chunk], alpha=0.5, never_empty=False)
        warm_up += send_true_labels(http, small, labels[chunk])
        if all(outcome in warm_up for outcome in (True, False)):
            break
    assert True in warm_up and False in warm_up, "the warm-up never saw both outcomes"
    before = feedback_counts(http)

    prometheus = Prometheus(tmp_path, server.removeprefix("http://"))
    try:
        prometheus.wait_ready(budget_left())
        totals = f"neuroserve_feedback_total{{{SERIES}}}"
        wait_for(lambda: prometheus.values(totals, "covered") == before or None,
                 "the first scrape of the feedback counters", budget_left())  # fmt: skip

        # The measured labels: 150 more test images at the default level (alpha 0.1).
        measured_slice = slice(150, 300)
        measured = send_true_labels(
            http, predict(http, MODEL, inputs[measured_slice]), labels[measured_slice]
        )
        expected_coverage = sum(measured) / len(measured)
        after = {"true": before["true"] + sum(measured),
                 "false": before["false"] + len(measured) - sum(measured)}  # fmt: skip
        wait_for(lambda: prometheus.values(totals, "covered") == after or None,
                 "Prometheus to scrape the measured feedback", budget_left())  # fmt: skip

        # rate() extrapolates each series to the window's edges; the two series get the same
        # factor (so the ratio is exact) once the extrapolation towards the counter's zero
        # point, first / gain * sampled interval, is over 1.1 scrape intervals for both:
        # that takes at least 1 + 1.1 * gain / first samples.
        gains = {key: after[key] - before[key] for key in after}
        samples_needed = 1 + max(1.1 * gains[key] / before[key] for key in gains)
        samples = f"count_over_time({totals}[5m])"
        wait_for(
            lambda: min(prometheus.values(samples, "covered").values()) > samples_needed or None,
            f"{samples_needed:.0f} scrapes of the feedback counters",
            budget_left(),
        )
        enough_samples_at = time.time()
        # The rule's latest evaluation must come after that point (evaluations run every 1 s).
        rule_timestamp = f"timestamp({COVERAGE_RULE}{{{SERIES}}})"
        wait_for(
            lambda: (
                next(iter(prometheus.values(rule_timestamp, "score").values()), 0.0)
                > enough_samples_at + 0.5
                or None
            ),
            "an evaluation of the coverage rule",
            budget_left(),
        )
        recorded = prometheus.values(f"{COVERAGE_RULE}{{{SERIES}}}", "score")
    finally:
        prometheus.stop()

    print(f"\n{COVERAGE_RULE} from Prometheus: {recorded[SCORE]!r}; "
          f"from the feedback answers: {sum(measured)}/{len(measured)} = {expected_coverage!r}; "
          f"all labels incl. the alpha 0.5 warm-up: {after['true'] / sum(after.values()):.4f}; "
          f"{time.monotonic() - started:.1f}s")  # fmt: skip
    assert recorded == {SCORE: pytest.approx(expected_coverage, rel=1e-9, abs=1e-12)}, (
        f"expected {sum(measured)}/{len(measured)} = {expected_coverage}"
    )
    assert 0.8 <= expected_coverage <= 1.0  # a calibrated 90% set on clean digits
    assert time.monotonic() - started < LIVE_TEST_BUDGET_S


def test_every_promised_metric_family_is_recorded_by_the_running_server(
    http: httpx.Client,
) -> None:
    test_split = load_digits_seq("test")
    inputs, labels = test_split.inputs[:12], test_split.labels[:12].tolist()

    # Predictions with feedback (max_set_size 0: abstain on every set), online ones among
    # them (a label for an online prediction moves its ACI level: the aci_alpha gauge), ...
    predictions = predict(http, MODEL, inputs[:6], max_set_size=0)
    assert all(p["abstain"] for p in predictions), predictions
    online = predict(http, MODEL, inputs[6:], online=True)
    assert all(p["aci_alpha"] is not None for p in online), online
    covered = send_true_labels(http, predictions + online, labels)
    # ... a spiking model (spikes and neuron steps), ...
    predict(http, SPIKING_MODEL, inputs[:4])
    # ... a session step (micro-batches, active sessions, state-store operations), ...
    created = http.post("/v1/sessions", json={"model": MODEL, "version": VERSION})
    assert created.status_code in (200, 201), created.text
    step = http.post(
        f"/v1/sessions/{created.json()['session_id']}/step", json={"inputs": inputs[0].tolist()}
    )
    assert step.status_code == 200, step.text
    # ... and a fine-tuning job run to its end (job counts and durations).
    spec = {"model": MODEL, "version": VERSION,
            "data": {"kind": "builtin", "name": "digits-seq", "shift": "translated"},
            "steps": 4, "batch_size": 8, "eval_every": 2, "lr": 1e-3}  # fmt: skip
    submitted = http.post("/v1/finetune/jobs", json=spec)
    assert submitted.status_code == 202, submitted.text
    job_url = f"/v1/finetune/jobs/{submitted.json()['job_id']}"
    job = wait_for(
        lambda: (
            (body := http.get(job_url).json())["status"] in ("succeeded", "failed") and body or None
        ),
        "the fine-tuning job to end",
        JOB_TIMEOUT_S,
    )
    assert job["status"] == "succeeded", job

    exposition = http.get("/metrics")
    assert exposition.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(exposition.text)}
    promised = {metric._name for metric in metrics.ALL_METRICS}
    missing = sorted(
        name
        for name in promised - NEVER_RECORDED_WITHOUT_FAILURES
        if name not in families or not families[name].samples
    )
    assert missing == [], f"families without samples: {missing}"
    assert metrics.STORE_ERRORS._name in families  # declared, with no error to count

    def labels_of(name: str) -> list[dict[str, str]]:
        return [sample.labels for sample in families[name].samples]

    # Requests carry the route template, model, backend, status and protocol they served.
    assert {"route": "/v1/models/{name}/predict", "model": MODEL, "backend": BACKEND,
            "status": "200", "protocol": "http"} in labels_of("neuroserve_requests")  # fmt: skip
    assert {"route": "/v1/feedback", "model": MODEL, "backend": BACKEND,
            "status": "200", "protocol": "http"} in labels_of("neuroserve_requests")  # fmt: skip
    spikes = {s.labels["model"]: s.value for s in families["neuroserve_spikes"].samples
              if s.name == "neuroserve_spikes_total"}  # fmt: skip
    assert spikes.get(SPIKING_MODEL, 0) > 0, spikes
    jobs = {s.labels["status"]: s.value for s in families["neuroserve_finetune_jobs"].samples
            if s.name == "neuroserve_finetune_jobs_total"}  # fmt: skip
    assert jobs.get("queued") == 1 and jobs.get("succeeded") == 1, jobs
    # One online level (this model, score, alpha and position) took the six online labels:
    # alpha_T = alpha + gamma * (T * alpha - misses).
    misses = len(online) - sum(covered[len(predictions) :])
    (aci,) = families["neuroserve_aci_alpha"].samples
    assert aci.labels == {"model": MODEL, "backend": BACKEND}
    assert aci.value == pytest.approx(ALPHA + GAMMA * (len(online) * ALPHA - misses), abs=1e-12)
