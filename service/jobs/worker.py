"""What runs a fine-tuning job, in either kind of worker process.

`execute_finetune` is the one place a job meets `service.finetuning.job.run_finetune`: it
materialises an uploaded .npz in a private scratch folder, validates the spec, runs the
tuning with a progress callback and a cancel check, and turns whatever happens into an
outcome dictionary (`status` succeeded | cancelled | failed, `result`, `error`, `progress`).
An error of the job itself (bad data, a loss that diverged) becomes a `failed` outcome and
is never retried; only the death of the process running it is.

Around it, two hosts:
- `run_queued_job`, the RQ job function, runs in the forked work-horse of a
  `FinetuneWorker` (`neuroserve worker`): progress goes to the job's meta, cancellation is a
  Redis key, a heartbeat thread keeps the job's alive key fresh (`service.jobs.redis_queue`).
- `local_worker_main` is the child process of the server's `LocalJobQueue`: jobs and
  messages travel as JSON over a pipe, cancellations (job ids) over a second one.

This module imports the job (and with it torch) at the top, so a `neuroserve worker` pays
for that once and every forked work-horse starts with it loaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rq import Worker, get_current_job
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.timeouts import BaseTimeoutException

from models.repository import ModelRepository
from service import metrics
from service.finetuning.job import run_finetune
from service.finetuning.spec import FinetuneSpec
from service.jobs.fencing import JobFence
from service.jobs.redis_queue import (
    LOST_AFTER_BEATS,
    RedisJobQueue,
    completed_keys,
    connect_job_redis,
)
from service.state.redis_connection import redact_url

logger = logging.getLogger("neuroserve.worker")

Progress = Callable[[dict[str, Any]], None]
PROGRESS_EVERY_SECONDS = 0.5  # progress writes are throttled to this (the last one is kept)
CANCEL_CHECK_SECONDS = 0.25  # the Redis cancel flag is read at most this often
RECORD_TTL_SECONDS = 7 * 24 * 3600  # fencing keys live this long when RQ keeps no result TTL


# ---- one job --------------------------------------------------------------------------------


class ProgressTracker:
    """Turn `service.finetuning.spec.ProgressEvent`s into the wire's progress dict and pass them on
    at most every `every` seconds (stage changes at once). The ETA of the tuning steps comes
    from their pace since tuning began; the validation accuracy is the latest evaluation's."""

    def __init__(self, sink: Progress, every: float = PROGRESS_EVERY_SECONDS) -> None:
        self.sink = sink
        self.every = every
        self.latest: dict[str, Any] | None = None
        self._tuning_from: tuple[float, int] | None = None  # (monotonic time, step)
        self._sent_at = -math.inf

    def __call__(self, event: Any) -> None:
        now = time.monotonic()
        step, total = int(event.step), int(event.total_steps)
        if event.stage == "tuning" and self._tuning_from is None:
            self._tuning_from = (now, step)
        eta = None
        if event.stage == "tuning" and self._tuning_from is not None:
            began, first_step = self._tuning_from
            if step > first_step:
                eta = (now - began) / (step - first_step) * (total - step)
        previous = self.latest or {}
        accuracy = event.validation_accuracy
        self.latest = {
            "stage": event.stage,
            "step": step,
            "total_steps": total,
            "loss": _finite_or_none(event.train_loss),
            "validation_accuracy": _finite_or_none(
                accuracy if accuracy is not None else previous.get("validation_accuracy")
            ),
            "best_step": event.best_step,
            "eta_seconds": eta,
        }
        if now - self._sent_at >= self.every or event.stage != previous.get("stage"):
            self._sent_at = now
            self.sink(self.latest)


def execute_finetune(
    payload: dict[str, Any],
    upload: bytes | None,
    repository_root: Path,
    *,
    progress: Progress,
    should_cancel: Callable[[], bool],
    passthrough: tuple[type[BaseException], ...] = (),
    before_publish: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run one job and describe how it ended; exceptions of `passthrough` types propagate
    (a host's own timeouts), every other failure is a `failed` outcome. `before_publish`
    runs just before a version is written and raises to stop it (the fencing claim)."""
    tracker = ProgressTracker(progress)
    scratch_file = "?"  # where an upload is written: never shown to the client
    try:
        if should_cancel():  # cancelled between being taken and starting
            return {"status": "cancelled", "result": None, "error": None, "progress": None}
        if payload["spec"] is None:
            raise ValueError("the job's spec is gone (its record expired before it ran)")
        with tempfile.TemporaryDirectory(prefix="neuroserve-job-") as scratch:
            spec_data = dict(payload["spec"])
            if payload.get("has_upload"):
                if upload is None:
                    raise ValueError("the uploaded .npz is gone (its record expired)")
                spec_data = _with_uploaded_dataset(spec_data, upload, Path(scratch))
                scratch_file = spec_data["data"]["path"]
            spec = FinetuneSpec.model_validate(spec_data)
            result = run_finetune(
                spec,
                ModelRepository(repository_root),
                progress=tracker,
                should_cancel=should_cancel,
                before_publish=before_publish,
            )
    except passthrough:
        raise
    except Exception as error:
        logger.warning("fine-tuning job %s failed: %s", payload.get("job_id"), error)
        return {
            "status": "failed",
            "result": None,
            "error": f"{type(error).__name__}: {error}".replace(scratch_file, "the uploaded .npz"),
            "progress": tracker.latest,
        }
    return _outcome(result, tracker.latest)


def _with_uploaded_dataset(spec: dict[str, Any], upload: bytes, scratch: Path) -> dict[str, Any]:
    """The spec with its `.npz` data pointing at the upload, written to `scratch`."""
    path = scratch / "dataset.npz"
    path.write_bytes(upload)
    return {**spec, "data": {"kind": "npz", "path": str(path)}}


def _outcome(result: Any, progress: dict[str, Any] | None) -> dict[str, Any]:
    """`FinetuneResult` -> outcome: "completed" is a success, "cancelled" published nothing."""
    status = "succeeded" if result.status == "completed" else "cancelled"
    return {
        "status": status,
        "result": result.model_dump(mode="json"),
        "error": None,
        "progress": progress,
    }


def _finite_or_none(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


# ---- RQ: the work-horse side ----------------------------------------------------------------

_repository_root: Path | None = None  # set in the worker process, inherited by work-horses


class Heartbeat:
    """Keep a run's alive key fresh (TTL = `lost_after` beats) from a daemon thread while
    the job runs, and only while the run owns its job (`JobFence.beat`)."""

    def __init__(self, fence: JobFence, every: float, lost_after: int) -> None:
        self.fence, self.every = fence, every
        self.ttl_ms = max(1, int(every * lost_after * 1000))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.fence.beat(self.ttl_ms)
        keys = self.fence.keys
        self.fence.connection.set(keys["beating"], repr(time.time()), ex=self.fence.ttl_seconds)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.fence.release()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.fence.beat(self.ttl_ms)
            except Exception as error:  # a blip: the next beat tries again
                logger.warning("heartbeat of %s failed: %s", self.fence.keys["alive"], error)


def redis_cancel_check(
    connection: Any, key: str, fence: JobFence | None = None
) -> Callable[[], bool]:
    """`should_cancel` over a Redis flag, and over the run's fencing token when given (a run
    that lost its job stops as if cancelled), read at most every CANCEL_CHECK_SECONDS."""
    state = {"checked": -math.inf, "cancelled": False}

    def should_cancel() -> bool:
        now = time.monotonic()
        if not state["cancelled"] and now - state["checked"] >= CANCEL_CHECK_SECONDS:
            state["checked"] = now
            if fence is None:
                state["cancelled"] = bool(connection.exists(key))
            else:
                cancel, token = connection.mget([key, fence.keys["fence"]])
                state["cancelled"] = cancel is not None or not fence.holds(token)
        return state["cancelled"]

    return should_cancel


def run_queued_job(payload: dict[str, Any]) -> dict[str, Any]:
    """The RQ job function (runs in a work-horse): one fine-tuning job, outcome as result."""
    if _repository_root is None:
        raise RuntimeError("run_queued_job runs only inside `neuroserve worker`")
    job = get_current_job()
    connection = job.connection
    keys = completed_keys(payload["keys"], job.id)
    fence = JobFence(connection, keys, int(job.result_ttl or RECORD_TTL_SECONDS))
    earlier = connection.get(keys["outcome"])
    if earlier is not None:  # an earlier run published and was lost afterwards: that stands
        return json.loads(earlier)
    job.meta["attempts"] = int(job.meta.get("attempts", 0)) + 1
    for stale in ("lost", "ended_at"):  # left by an earlier, lost run of a retried job
        job.meta.pop(stale, None)
    job.meta["progress"] = None
    job.save_meta()

    def save_progress(progress: dict[str, Any]) -> None:
        if fence.owned():  # a revoked run never writes over its successor's record
            job.meta["progress"] = progress
            job.save_meta()

    claimed = []

    def claim() -> None:
        fence.claim_publication()
        claimed.append(True)

    beat = float(payload["heartbeat_seconds"])
    with Heartbeat(fence, beat, LOST_AFTER_BEATS):
        spec = connection.get(keys["spec"])
        upload = connection.get(keys["upload"]) if payload.get("has_upload") else None
        outcome = execute_finetune(
            {**payload, "spec": json.loads(spec) if spec is not None else None},
            upload,
            _repository_root,
            progress=save_progress,
            should_cancel=redis_cancel_check(connection, keys["cancel"], fence),
            passthrough=(BaseTimeoutException,),  # RQ's job timeout: RQ fails or retries it
            before_publish=claim,
        )
    if claimed and outcome["status"] == "succeeded":
        # This run published: its outcome is the job's, even for a retry that follows.
        connection.set(keys["outcome"], json.dumps(outcome), ex=fence.ttl_seconds)
    elif not fence.owned():
        # Revoked (declared lost, taken over): exit without a word, so RQ leaves the job's
        # record to the sweep and the run that owns it now (exit code 0 makes RQ's worker
        # touch nothing).
        logger.warning("fine-tuning job %s: this run lost its job; stopping quietly", job.id)
        os._exit(0)
    job.meta["progress"] = outcome["progress"]
    job.save_meta()
    connection.delete(keys["spec"], keys["upload"])  # ended for good: no retry needs them
    return outcome


class FinetuneWorker(Worker):
    """An RQ worker (one forked work-horse per job, JSON serializer) that also records job
    counts and run times in its own process, where `/metrics` on the worker port sees them
    (a work-horse's own counters would die with it unless multiprocess metrics are on)."""

    def __init__(self, queues: Any, *, repository_root: Path, **kwargs: Any) -> None:
        global _repository_root
        super().__init__(queues, serializer=JSONSerializer, **kwargs)
        _repository_root = Path(repository_root)

    def execute_job(self, job: Job, queue: Queue) -> None:
        started = time.monotonic()
        try:
            super().execute_job(job, queue)
        finally:
            self._record(job, time.monotonic() - started)

    def _record(self, job: Job, seconds: float) -> None:
        try:
            status = job.get_status(refresh=True)
            if status == RQStatus.FINISHED:
                outcome = job.return_value(refresh=True) or {}
                metrics.record_job(outcome.get("status", "failed"), seconds)
            elif status in (RQStatus.FAILED, RQStatus.STOPPED):
                metrics.record_job("failed", seconds)
            # anything else: queued again for a retry, not an end yet
        except Exception as error:  # metrics must never break the worker loop
            logger.warning("could not record job %s in metrics: %s", job.id, error)


def sweep_forever(queues: list[Any], every: float, stop: threading.Event) -> None:
    """Hand jobs whose worker died to RQ's abandoned-job handling, every `every` seconds
    (`RedisJobQueue.sweep_abandoned`): some live worker has to notice a dead one."""
    while not stop.wait(every):
        for queue in queues:
            try:
                queue.sweep_abandoned()
            except Exception as error:  # Redis away for a moment: try again next time
                logger.warning("sweeping abandoned jobs failed: %s", error)


def run_worker(
    settings: Any,
    *,
    queue_names: list[str],
    burst: bool = False,
    metrics_port: int = metrics.WORKER_METRICS_PORT,
    name: str | None = None,
) -> int:
    """`neuroserve worker`: take fine-tuning jobs from `queue_names` until stopped (or, with
    `burst`, until the queues are empty). Exit code 0."""
    url = settings.job_queue_redis_url()
    # No socket timeout: RQ blocks on the queues for minutes between jobs.
    connection = connect_job_redis(url, socket_timeout=None)
    connection.ping()
    if metrics_port:
        metrics.clear_multiprocess_dir()  # this process is the parent of its work-horses
        metrics.start_metrics_server(metrics_port)
    sweepers = [
        RedisJobQueue(
            connection,
            queue_name=queue_name,
            prefix=settings.state_store_prefix,
            max_active=settings.max_active_jobs,
            heartbeat_seconds=settings.job_heartbeat_seconds,
        )
        for queue_name in queue_names
    ]
    stop = threading.Event()
    sweeper = threading.Thread(
        target=sweep_forever,
        args=(sweepers, settings.job_heartbeat_seconds, stop),
        name="job-sweeper",
        daemon=True,
    )
    sweeper.start()
    worker = FinetuneWorker(
        queue_names,
        connection=connection,
        repository_root=settings.model_repository,
        name=name,
    )
    logger.info(
        "worker %s: queues %s on %s, repository %s, metrics %s",
        worker.name,
        ", ".join(queue_names),
        redact_url(url),
        Path(settings.model_repository).resolve(),
        f"on port {metrics_port}" if metrics_port else "off",
    )
    try:
        worker.work(burst=burst, logging_level=settings.log_level.upper())
    finally:
        stop.set()
        connection.close()
    return 0


# ---- the embedded local worker process ------------------------------------------------------


def local_worker_main(connection: Any, cancels: Any, repository_root: str) -> None:
    """Child process of `LocalJobQueue`: run jobs from the pipe until it closes.

    Receives a JSON payload and then the upload's bytes (empty: none) per job; sends JSON
    `{"type": "progress", "progress": {...}}` messages and one `{"type": "outcome", ...}`.
    `cancels` delivers ids of jobs to stop; only the running job's id stops anything.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's: it stops us
    cancelled: set[bytes] = set()

    def send(message: dict[str, Any]) -> None:
        connection.send_bytes(json.dumps(message).encode())

    def should_cancel(job_id: bytes) -> bool:
        while cancels.poll():
            cancelled.add(cancels.recv_bytes())
        return job_id in cancelled

    while True:
        try:
            payload = json.loads(connection.recv_bytes())
            upload = connection.recv_bytes() or None
        except EOFError:
            return
        job_id = payload["job_id"].encode()
        outcome = execute_finetune(
            payload,
            upload,
            Path(repository_root),
            progress=lambda progress: send({"type": "progress", "progress": progress}),
            should_cancel=lambda job_id=job_id: should_cancel(job_id),
        )
        cancelled.discard(job_id)
        send({"type": "outcome", "outcome": outcome})
