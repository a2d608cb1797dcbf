"""Prometheus metrics: every series neuroserve exports, and small typed functions to record them.

The dataplane, routers, state stores and job worker call the `record_*` / `set_*` functions;
`GET /metrics` (service/api/metrics_route.py) renders `render_metrics()`.

Several worker processes: when `PROMETHEUS_MULTIPROC_DIR` is set *before* `prometheus_client`
is first imported, every process writes its values to memory-mapped files in that folder and
`render_metrics()` merges them with `MultiProcessCollector` (counters and histograms are summed;
each gauge declares how it merges). The parent process must empty the folder before it starts
the workers (`clear_multiprocess_dir()`), or counts from an earlier run are added in.

Reliability bins split confidence into 15 equal-width bins, each closed on the right:
bin b holds confidences in (b/15, (b+1)/15] (bin 0 also holds 0) and is labelled by its upper
edge, "0.0667" ... "1.0000". Per bin three counters grow on feedback (predictions, correct
ones, and the sum of their confidences), so over any window
ECE = sum_b |correct_b - confidence_sum_b| / sum_b predictions_b.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The multiprocess folder must exist before the first metric is created below.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

from prometheus_client import (  # noqa: E402
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.exposition import choose_encoder  # noqa: E402
from prometheus_client.metrics import MetricWrapperBase  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Buckets (base units: seconds, counts, ratios)

REQUEST_SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
STORE_SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
JOB_SECONDS_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SET_SIZE_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

RELIABILITY_BIN_COUNT = 15
# Upper edges b/15 for b = 1..15, computed once so that a confidence equal to an edge lands in
# the bin that edge closes (bisect compares against these exact floats).
RELIABILITY_BIN_EDGES: tuple[float, ...] = tuple(
    (b + 1) / RELIABILITY_BIN_COUNT for b in range(RELIABILITY_BIN_COUNT)
)
RELIABILITY_BIN_LABELS: tuple[str, ...] = tuple(f"{edge:.4f}" for edge in RELIABILITY_BIN_EDGES)

JOB_STATUS_PATTERN = re.compile(r"^[a-z][a-z_]*$")
WORKER_METRICS_PORT = 9100  # where `neuroserve worker` serves its own /metrics

# ---------------------------------------------------------------------------------------------
# The registry every neuroserve metric lives in (not prometheus_client's global one, so that
# importing this module twice in tests or beside other libraries never clashes).

REGISTRY = CollectorRegistry(auto_describe=True)


def _multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


if _multiprocess_dir() is None:
    # CPU, memory and file-descriptor series of this process; meaningless merged over workers.
    ProcessCollector(registry=REGISTRY)
    PlatformCollector(registry=REGISTRY)

# ---- requests -------------------------------------------------------------------------------

REQUESTS = Counter(
    "neuroserve_requests_total",
    "Requests served, by protocol (http, grpc), route template or gRPC method, and status "
    "code (for gRPC, the HTTP status of the same answer).",
    ["route", "model", "backend", "status", "protocol"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "neuroserve_request_duration_seconds",
    "Time from request start to the end of the response body, by protocol and route template "
    "(gRPC: method).",
    ["route", "model", "backend", "protocol"],
    buckets=REQUEST_SECONDS_BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "neuroserve_batch_size",
    "Sequences in one micro-batched session step or shared stateless forward pass.",
    ["model", "backend"],
    buckets=BATCH_SIZE_BUCKETS,
    registry=REGISTRY,
)
ACTIVE_SESSIONS = Gauge(
    "neuroserve_active_sessions",
    "Live sessions the state store holds for a model (the latest count any process reported).",
    ["model"],
    multiprocess_mode="mostrecent",  # every process counts the same shared store
    registry=REGISTRY,
)

# ---- state store ----------------------------------------------------------------------------

STORE_OPERATION_DURATION = Histogram(
    "neuroserve_state_store_operation_duration_seconds",
    "Duration of one state-store operation (get, put, delete, ...).",
    ["store", "operation"],
    buckets=STORE_SECONDS_BUCKETS,
    registry=REGISTRY,
)
STORE_ERRORS = Counter(
    "neuroserve_state_store_errors_total",
    "State-store operations that failed (an expected outcome such as a lost compare-and-set "
    "is not an error).",
    ["store", "operation"],
    registry=REGISTRY,
)

# ---- predictions and conformal sets ---------------------------------------------------------

PREDICTIONS = Counter(
    "neuroserve_predictions_total",
    "Predictions returned (one per sequence, session step or generated token).",
    ["model", "backend"],
    registry=REGISTRY,
)
PREDICTION_SET_SIZE = Histogram(
    "neuroserve_prediction_set_size",
    "Labels in the conformal prediction set.",
    ["model", "backend", "score"],
    buckets=SET_SIZE_BUCKETS,
    registry=REGISTRY,
)
PREDICTION_CONFIDENCE = Histogram(
    "neuroserve_prediction_confidence",
    "Calibrated confidence of the top label.",
    ["model", "backend"],
    buckets=CONFIDENCE_BUCKETS,
    registry=REGISTRY,
)
ABSTENTIONS = Counter(
    "neuroserve_abstentions_total",
    "Predictions on which the server abstained (declined to commit to a single label).",
    ["model", "backend"],
    registry=REGISTRY,
)

# ---- feedback: coverage, reliability, online conformal --------------------------------------

FEEDBACK = Counter(
    "neuroserve_feedback_total",
    "Labels received as feedback, by whether the prediction set contained the label.",
    ["model", "backend", "score", "covered"],
    registry=REGISTRY,
)
COVERAGE_TARGET = Gauge(
    "neuroserve_coverage_target_ratio",
    "Coverage the requests asked for: 1 - alpha of the latest prediction.",
    ["model", "backend", "score"],
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
RELIABILITY_PREDICTIONS = Counter(
    "neuroserve_reliability_predictions_total",
    "Feedback received, by confidence bin (label bin = the bin's upper edge).",
    ["model", "backend", "bin"],
    registry=REGISTRY,
)
RELIABILITY_CORRECT = Counter(
    "neuroserve_reliability_correct_total",
    "Feedback whose top label was correct, by confidence bin.",
    ["model", "backend", "bin"],
    registry=REGISTRY,
)
RELIABILITY_CONFIDENCE_SUM = Counter(
    "neuroserve_reliability_confidence_sum_total",
    "Sum of the confidences of the feedback in each confidence bin.",
    ["model", "backend", "bin"],
    registry=REGISTRY,
)
ACI_ALPHA = Gauge(
    "neuroserve_aci_alpha",
    "Miscoverage level the online (ACI) monitor currently uses.",
    ["model", "backend"],
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)

# ---- work and energy ------------------------------------------------------------------------

SPIKES = Counter(
    "neuroserve_spikes_total", "Spikes emitted.", ["model", "backend"], registry=REGISTRY
)
NEURON_STEPS = Counter(
    "neuroserve_neuron_steps_total",
    "Neuron updates (spike sparsity = spikes / neuron steps).",
    ["model", "backend"],
    registry=REGISTRY,
)
MACS = Counter(
    "neuroserve_macs_total",
    "Multiply-accumulates executed (dense work).",
    ["model", "backend"],
    registry=REGISTRY,
)
ACCUMULATES = Counter(
    "neuroserve_accumulates_total",
    "Accumulates driven by spikes (event-driven work).",
    ["model", "backend"],
    registry=REGISTRY,
)
ENERGY = Counter(
    "neuroserve_energy_joules_total",
    "Estimated energy on the backend, event-driven where it applies.",
    ["model", "backend"],
    registry=REGISTRY,
)
DENSE_EQUIVALENT_ENERGY = Counter(
    "neuroserve_dense_equivalent_energy_joules_total",
    "The same work counted as dense multiply-accumulates, for comparison.",
    ["model", "backend"],
    registry=REGISTRY,
)

# ---- fine-tuning jobs -----------------------------------------------------------------------

FINETUNE_JOBS = Counter(
    "neuroserve_finetune_jobs_total",
    "Fine-tuning jobs by status reached (queued, succeeded, failed, cancelled).",
    ["status"],
    registry=REGISTRY,
)
FINETUNE_JOB_DURATION = Histogram(
    "neuroserve_finetune_job_duration_seconds",
    "Run time of fine-tuning jobs that finished.",
    buckets=JOB_SECONDS_BUCKETS,
    registry=REGISTRY,
)
FINETUNE_WORKERS = Gauge(
    "neuroserve_finetune_workers",
    "Live `neuroserve worker` processes listening on the job queue (RQ's worker registry), "
    "as the server last saw them; 0 while jobs are queued means they wait for nobody.",
    ["queue"],
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
FINETUNE_JOBS_WITHOUT_WORKER = Gauge(
    "neuroserve_finetune_jobs_waiting_without_worker",
    "Queued fine-tuning jobs while no worker listens on their queue (start `neuroserve worker`).",
    ["queue"],
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)

ALL_METRICS: tuple[MetricWrapperBase, ...] = (
    REQUESTS, REQUEST_DURATION, BATCH_SIZE, ACTIVE_SESSIONS,
    STORE_OPERATION_DURATION, STORE_ERRORS,
    PREDICTIONS, PREDICTION_SET_SIZE, PREDICTION_CONFIDENCE, ABSTENTIONS,
    FEEDBACK, COVERAGE_TARGET,
    RELIABILITY_PREDICTIONS, RELIABILITY_CORRECT, RELIABILITY_CONFIDENCE_SUM, ACI_ALPHA,
    SPIKES, NEURON_STEPS, MACS, ACCUMULATES, ENERGY, DENSE_EQUIVALENT_ENERGY,
    FINETUNE_JOBS, FINETUNE_JOB_DURATION, FINETUNE_WORKERS, FINETUNE_JOBS_WITHOUT_WORKER,
)  # fmt: skip

# Usage keys (hardware_backends.base.Usage.to_dict) and the counter each one feeds.
_USAGE_COUNTERS: dict[str, Counter] = {
    "spikes": SPIKES,
    "neuron_steps": NEURON_STEPS,
    "macs": MACS,
    "accumulates": ACCUMULATES,
    "energy_joules": ENERGY,
    "dense_equivalent_energy_joules": DENSE_EQUIVALENT_ENERGY,
}
COUNTED_USAGE = tuple(_USAGE_COUNTERS)  # the usage keys `record_usage` counts


def series_names() -> dict[str, str]:
    """Every sample name this module can export, mapped to its metric type.

    A counter `x_total` exports `x_total`; a histogram `x` exports `x_bucket`, `x_sum` and
    `x_count`; a gauge exports its own name. Used to check dashboards and rules.
    """
    names: dict[str, str] = {}
    for metric in ALL_METRICS:
        kind = metric._type
        if kind == "counter":
            names[f"{metric._name}_total"] = kind
        elif kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[f"{metric._name}{suffix}"] = kind
        else:
            names[metric._name] = kind
    return names


# ---------------------------------------------------------------------------------------------
# Input checks: metrics are recorded from our own code, but a wrong value should fail loudly
# with the name of the problem rather than export a nonsensical series.


def _check_label(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"metric label {name!r} must be a str, got {type(value).__name__}")
    return value


def _check_non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_probability(name: str, value: float) -> float:
    value = _check_non_negative(name, value)
    if value > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return value


def _check_count(name: str, value: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def reliability_bin(confidence: float) -> str:
    """Label of the reliability bin holding `confidence`: the bin's upper edge, e.g. "0.0667"."""
    confidence = _check_probability("confidence", confidence)
    # First edge >= confidence: bins are closed on the right, and 0 falls in the first bin.
    return RELIABILITY_BIN_LABELS[bisect.bisect_left(RELIABILITY_BIN_EDGES, confidence)]


# ---------------------------------------------------------------------------------------------
# Recording functions

_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, cached: prometheus_client checks and locks on every call, and
    a session step records a dozen series. Series are never removed here, so a cached child
    stays the one the registry exports."""
    key = (id(metric), labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def record_request(
    route: str, model: str, backend: str, status: int, seconds: float, protocol: str = "http"
) -> None:
    """One request: `route` is the route template ("/v1/sessions/{session_id}/step") or the
    gRPC method ("/inference.GRPCInferenceService/ModelInfer"); `status` an HTTP status (a
    gRPC answer counts under the status HTTP gives the same answer)."""
    route, model = _check_label("route", route), _check_label("model", model)
    protocol = _check_label("protocol", protocol)
    backend = _check_label("backend", backend)
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError(f"status must be an HTTP status code 100..599, got {status!r}")
    seconds = _check_non_negative("seconds", seconds)
    _child(REQUESTS, route, model, backend, str(status), protocol).inc()
    _child(REQUEST_DURATION, route, model, backend, protocol).observe(seconds)


def record_batch(model: str, backend: str, size: int) -> None:
    """One micro-batched step over `size` sequences."""
    size = _check_count("batch size", size, minimum=1)
    _child(BATCH_SIZE, _check_label("model", model), _check_label("backend", backend)).observe(size)


def set_active_sessions(model: str, count: int) -> None:
    """The number of live sessions the state store holds for `model`."""
    _child(ACTIVE_SESSIONS, _check_label("model", model)).set(_check_count("session count", count))


def record_prediction(
    model: str,
    backend: str,
    score: str,
    set_size: int,
    confidence: float,
    abstained: bool,
    *,
    alpha: float | None = None,
) -> None:
    """One prediction; `alpha` (the request's miscoverage level) sets the coverage target."""
    record_predictions(model, backend, score, [set_size], [confidence], [abstained], alpha=alpha)


def record_predictions(
    model: str,
    backend: str,
    score: str,
    set_sizes: Sequence[int],
    confidences: Sequence[float],
    abstained: Sequence[bool],
    *,
    alpha: float | None = None,
) -> None:
    """Predictions of one model, backend and score (`record_prediction` for each), with one
    update per series touched: a batch of answers costs a few updates, not a few per answer."""
    model, backend = _check_label("model", model), _check_label("backend", backend)
    score = _check_label("score", score)
    if not len(set_sizes) == len(confidences) == len(abstained):
        raise ValueError("set_sizes, confidences and abstained must have one entry per prediction")
    for set_size, confidence, flag in zip(set_sizes, confidences, abstained, strict=True):
        _check_count("set_size", set_size)
        _check_probability("confidence", confidence)
        if not isinstance(flag, bool):
            raise TypeError(f"abstained must be a bool, got {type(flag).__name__}")
    if alpha is not None:
        alpha = _check_probability("alpha", alpha)
        _child(COVERAGE_TARGET, model, backend, score).set(1.0 - alpha)
    if not set_sizes:
        return
    _child(PREDICTIONS, model, backend).inc(len(set_sizes))
    observe_many(_child(PREDICTION_SET_SIZE, model, backend, score), set_sizes)
    observe_many(_child(PREDICTION_CONFIDENCE, model, backend), confidences)
    abstentions = sum(abstained)
    if abstentions:
        _child(ABSTENTIONS, model, backend).inc(abstentions)


def observe_many(histogram: Any, amounts: Sequence[float]) -> None:
    """`histogram.observe(amount)` for every amount, with one increment per bucket touched and
    one of the sum (prometheus_client observes one value at a time, each under its lock).
    Reads the child's buckets as `observe` itself does; a test checks that the exposition is
    the same as observing one by one."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:  # another prometheus_client
        for amount in amounts:
            histogram.observe(amount)
        return
    counts: dict[int, int] = {}
    for amount in amounts:  # observe's bucket: the first bound >= amount (none for NaN)
        if amount == amount:
            index = bisect.bisect_left(bounds, amount)
            counts[index] = counts.get(index, 0) + 1
    total.inc(math.fsum(amounts))
    for index, count in counts.items():
        buckets[index].inc(count)


def record_feedback(
    model: str, backend: str, score: str, covered: bool, confidence: float, correct: bool
) -> None:
    """A label that arrived for an earlier prediction.

    `covered`: the prediction set contained the label; `correct`: the top label was the label;
    `confidence`: the confidence the prediction reported.
    """
    model, backend = _check_label("model", model), _check_label("backend", backend)
    score = _check_label("score", score)
    for name, flag in (("covered", covered), ("correct", correct)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    bin_label = reliability_bin(confidence)
    _child(FEEDBACK, model, backend, score, "true" if covered else "false").inc()
    _child(RELIABILITY_PREDICTIONS, model, backend, bin_label).inc()
    _child(RELIABILITY_CONFIDENCE_SUM, model, backend, bin_label).inc(confidence)
    # Touch the correct counter even when it stays 0, so the bin exists in every window.
    _child(RELIABILITY_CORRECT, model, backend, bin_label).inc(1.0 if correct else 0.0)


def set_aci_alpha(model: str, backend: str, alpha: float) -> None:
    """The online (ACI) monitor's current miscoverage level."""
    model, backend = _check_label("model", model), _check_label("backend", backend)
    _child(ACI_ALPHA, model, backend).set(_check_probability("alpha", alpha))


def record_usage(model: str, backend: str, usage: Mapping[str, float | int | None]) -> None:
    """Work a backend reported for one request (`Usage.to_dict()`).

    Keys other than spikes, neuron_steps, macs, accumulates, energy_joules and
    dense_equivalent_energy_joules (such as the derived `sparsity`) are ignored; None means
    "not measured" and is skipped.
    """
    model, backend = _check_label("model", model), _check_label("backend", backend)
    if not isinstance(usage, Mapping):
        raise TypeError(f"usage must be a mapping, got {type(usage).__name__}")
    amounts = {
        key: _check_non_negative(f"usage[{key!r}]", value)
        for key, value in usage.items()
        if key in _USAGE_COUNTERS and value is not None
    }
    for key, amount in amounts.items():
        _child(_USAGE_COUNTERS[key], model, backend).inc(amount)


@contextmanager
def record_store_op(
    store: str,
    operation: str,
    *,
    expected: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """Time one state-store operation; count it as an error if it raises.

    Exceptions of the `expected` types (a lost compare-and-set, a missing session) are normal
    outcomes: they are timed but not counted as errors. Every exception is re-raised.
    """
    labels = (_check_label("store", store), _check_label("operation", operation))
    start = time.perf_counter()
    try:
        yield
    except expected:
        raise
    except BaseException:
        _child(STORE_ERRORS, *labels).inc()
        raise
    finally:
        _child(STORE_OPERATION_DURATION, *labels).observe(time.perf_counter() - start)


def record_job(status: str, seconds: float | None = None) -> None:
    """A fine-tuning job reached `status`; pass `seconds` when it finished (run time)."""
    status = _check_label("status", status)
    if not JOB_STATUS_PATTERN.match(status):
        raise ValueError(f"job status must be a lower-case word like 'succeeded', got {status!r}")
    _child(FINETUNE_JOBS, status).inc()
    if seconds is not None:
        FINETUNE_JOB_DURATION.observe(_check_non_negative("seconds", seconds))


def set_job_workers(queue: str, workers: int, queued: int) -> None:
    """What the server last saw of a job queue: its live workers, and its queued jobs when
    there are none."""
    queue = _check_label("queue", queue)
    _child(FINETUNE_WORKERS, queue).set(_check_count("worker count", workers))
    waiting = _check_count("queued jobs", queued) if workers == 0 else 0
    _child(FINETUNE_JOBS_WITHOUT_WORKER, queue).set(waiting)


# ---------------------------------------------------------------------------------------------
# Exposition


def collector_registry() -> CollectorRegistry:
    """The registry to expose: merged over processes in multiprocess mode, else this process's."""
    path = _multiprocess_dir()
    if path is None:
        return REGISTRY
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=path)
    return merged


def render_metrics(accept: str | None = None) -> tuple[bytes, str]:
    """The exposition body and its content type, in the format the `Accept` header asks for."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(collector_registry()), content_type


def clear_multiprocess_dir() -> None:
    """Delete the value files in `PROMETHEUS_MULTIPROC_DIR`.

    Call it once in the parent process before it starts the worker processes; files left by
    an earlier run would otherwise be added to this run's counts.
    """
    path = _multiprocess_dir()
    if path is None:
        return
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.glob("*.db"):  # only prometheus_client's files, whatever else is there
        entry.unlink()


def start_metrics_server(port: int = WORKER_METRICS_PORT, addr: str = "0.0.0.0") -> None:
    """Serve /metrics from a background thread, for processes without an HTTP app (the worker)."""
    start_http_server(port, addr=addr, registry=collector_registry())
