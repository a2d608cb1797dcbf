"""The embedded local job queue: fine-tuning jobs without Redis.

`LocalJobQueue` is the default when no Redis is configured. The server runs one job at a
time in one child process of its own (spawned, not forked: the server has threads), so the
tuning's CPU work and any crash stay out of the process that serves requests; records live
in memory and die with the server. It hands the same JSON payload to `service.jobs.worker`
as the Redis queue and reads back the same progress and outcome dictionaries, so both
produce the same `JobRecord`s.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from service import metrics
from service.jobs.types import (
    FINISHED,
    JobNotFoundError,
    JobQueue,
    JobRecord,
    JobStatus,
    JobSubmission,
    TooManyJobsError,
    check_job_id,
    iso,
    new_job_id,
    utc_now,
    worker_payload,
)
from service.jobs.worker import local_worker_main

logger = logging.getLogger("neuroserve.jobs")

POLL_SECONDS = 0.2  # how often the local dispatcher looks at its child between messages


@dataclass
class _LocalJob:
    submission: JobSubmission | None  # dropped once the job ends (inline data can be large)
    record: JobRecord
    started: float | None = None  # monotonic start of the current run
    finished: float | None = None  # monotonic end, for expiring the record


@dataclass
class _Child:
    """The local worker process, the parent's end of its job pipe, and the sending end of
    its cancel pipe (ids of jobs to stop: the child stops only the job it is running, so a
    cancel that crosses the end of one job can never stop the next)."""

    process: Any
    connection: Any
    cancels: Any


class LocalJobQueue(JobQueue):
    """Jobs in memory, run one at a time by one spawned child process (`service.jobs.worker.
    local_worker_main`). A thread of the server sends each job to the child over a pipe and
    reads its progress and outcome as JSON messages. The child is started on the first job
    and kept for the next ones; if it dies mid-job (killed, out of memory) the job is failed,
    or queued again while it has retries left, and the next job gets a fresh child.
    """

    kind = "local"

    def __init__(
        self,
        repository_root: Path,
        *,
        max_active: int,
        retries: int = 0,
        timeout_seconds: float = 6 * 3600.0,
        record_ttl_seconds: float = 7 * 24 * 3600.0,
    ) -> None:
        self.repository_root = Path(repository_root)
        self.max_active = max_active
        self.retries = retries
        self.timeout_seconds = timeout_seconds
        self.record_ttl_seconds = record_ttl_seconds
        self._context = multiprocessing.get_context("spawn")
        # This server runs its own jobs (one at a time): its queue always has one worker.
        metrics.set_job_workers(self.kind, 1, 0)
        self._jobs: dict[str, _LocalJob] = {}
        self._pending: deque[str] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._child: _Child | None = None
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="neuroserve-local-jobs", daemon=True
        )
        self._dispatcher.start()

    # ---- the interface ----
    def submit(self, submission: JobSubmission) -> JobRecord:
        with self._condition:
            self._forget_expired()
            if self._active() >= self.max_active:
                raise TooManyJobsError(self._limit_message())
            job_id = new_job_id()
            record = JobRecord(job_id, "queued", submission.model, iso(utc_now()))
            self._jobs[job_id] = _LocalJob(submission, record)
            self._pending.append(job_id)
            self._condition.notify_all()
        metrics.record_job("queued")
        return record

    def get(self, job_id: str) -> JobRecord:
        with self._condition:
            return self._job(job_id).record

    def cancel(self, job_id: str) -> JobRecord:
        with self._condition:
            job = self._job(job_id)
            status = job.record.status
            if status == "queued":
                self._pending.remove(job_id)
                self._finish(job, "cancelled")
                metrics.record_job("cancelled")
            elif status == "running":
                job.record = replace(job.record, cancel_requested=True)
                self._send_cancel(job_id)
            return job.record

    def active_count(self) -> int:
        with self._condition:
            return self._active()

    @property
    def worker_pid(self) -> int | None:
        """Process id of the local worker process while it lives (for operators and logs)."""
        child = self._child
        return child.process.pid if child is not None and child.process.is_alive() else None

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        child = self._child
        if child is not None:
            child.process.terminate()  # the dispatcher then fails the running job, if any
        self._dispatcher.join(timeout=30)
        self._stop_child()

    # ---- bookkeeping (call with the condition held) ----
    def _job(self, job_id: str) -> _LocalJob:
        job = self._jobs.get(check_job_id(job_id))
        if job is None:
            raise JobNotFoundError(f"no fine-tuning job {job_id!r}")
        return job

    def _active(self) -> int:
        return sum(job.record.status not in FINISHED for job in self._jobs.values())

    def _limit_message(self) -> str:
        return (
            f"{self.max_active} fine-tuning jobs are already queued or running "
            "(NEUROSERVE_MAX_ACTIVE_JOBS); wait for one to finish or cancel one"
        )

    def _forget_expired(self) -> None:
        horizon = time.monotonic() - self.record_ttl_seconds
        for job_id in [k for k, job in self._jobs.items() if (job.finished or 1e300) < horizon]:
            del self._jobs[job_id]

    def _finish(self, job: _LocalJob, status: JobStatus, **changes: Any) -> None:
        job.record = replace(job.record, status=status, ended_at=iso(utc_now()), **changes)
        job.finished = time.monotonic()
        job.submission = None

    # ---- the dispatcher thread ----
    def _dispatch(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                job_id = self._pending.popleft()
                job = self._jobs[job_id]
                attempts = job.record.attempts + 1
                job.record = replace(
                    job.record, status="running", started_at=iso(utc_now()), attempts=attempts
                )
                job.started = time.monotonic()
            try:
                self._run(job_id, job)
            except Exception:  # keep the dispatcher alive whatever happens to one job
                logger.exception("local fine-tuning job %s failed in the dispatcher", job_id)
                with self._condition:
                    if job.record.status == "running":
                        self._finish(job, "failed", error="internal error running the job")
                        metrics.record_job("failed", time.monotonic() - job.started)

    def _send_cancel(self, job_id: str) -> None:
        """Tell the child to stop `job_id` (call with the condition held: one sender)."""
        child = self._child
        try:
            if child is not None:
                child.cancels.send_bytes(job_id.encode())
        except OSError:  # the child is gone; the dispatcher is finding out right now
            pass

    def _ensure_child(self) -> _Child:
        if self._child is not None and self._child.process.is_alive():
            return self._child
        self._stop_child()
        parent_end, child_end = self._context.Pipe(duplex=True)
        cancels_in, cancels_out = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=local_worker_main,
            args=(child_end, cancels_in, str(self.repository_root)),
            name="neuroserve-local-worker",
            daemon=True,
        )
        process.start()
        child_end.close()  # only the child holds them now: its death reads as EOF here
        cancels_in.close()
        self._child = _Child(process, parent_end, cancels_out)
        logger.info("started local fine-tuning worker process %s", process.pid)
        return self._child

    def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        child.connection.close()
        child.cancels.close()
        if child.process.is_alive():
            child.process.terminate()
        child.process.join(timeout=10)
        if child.process.is_alive():
            child.process.kill()
            child.process.join()

    def _run(self, job_id: str, job: _LocalJob) -> None:
        child = self._ensure_child()
        try:
            child.connection.send_bytes(json.dumps(worker_payload(job_id, job.submission)).encode())
            child.connection.send_bytes(job.submission.upload or b"")
            with self._condition:
                if job.record.cancel_requested:  # asked before this child had the job
                    self._send_cancel(job_id)
            outcome = self._follow(child, job)
        except (EOFError, OSError):  # the pipe broke: the child is gone
            child.process.join(timeout=10)
            self._lost(job, f"the worker process died (exit code {child.process.exitcode})")
            return
        if outcome is None:
            child.process.kill()  # a timed-out job cannot be interrupted politely
            self._lost(job, f"it ran longer than {self.timeout_seconds:g} s")
            return
        self._complete(job_id, job, outcome)

    def _follow(self, child: _Child, job: _LocalJob) -> dict[str, Any] | None:
        """Apply the child's progress messages until its outcome (None: timed out first)."""
        while True:
            if not child.connection.poll(POLL_SECONDS):
                if time.monotonic() - job.started > self.timeout_seconds:
                    return None
                if not child.process.is_alive() and not child.connection.poll(0):
                    raise EOFError
                continue
            message = json.loads(child.connection.recv_bytes())
            if message["type"] == "outcome":
                return message["outcome"]
            with self._condition:
                job.record = replace(job.record, progress=message["progress"])

    def _complete(self, job_id: str, job: _LocalJob, outcome: dict[str, Any]) -> None:
        with self._condition:
            status = outcome["status"]
            self._finish(job, status, result=outcome.get("result"), error=outcome.get("error"))
            if outcome.get("progress") is not None:
                job.record = replace(job.record, progress=outcome["progress"])
        metrics.record_job(status, time.monotonic() - job.started)

    def _lost(self, job: _LocalJob, reason: str) -> None:
        """The child is gone mid-job: queue the job again while it has retries, else fail it."""
        self._stop_child()
        job_id = job.record.job_id
        with self._condition:
            retry = job.record.attempts <= self.retries and not job.record.cancel_requested
            if retry and not self._closed:
                logger.warning("local fine-tuning job %s lost (%s); retrying", job_id, reason)
                job.record = replace(job.record, status="queued", progress=None)
                self._pending.appendleft(job_id)
                self._condition.notify_all()
                return
            error = f"the job stopped unexpectedly: {reason}; no model version was published"
            if self._closed:
                error = "the server shut down while the job ran; no model version was published"
            self._finish(job, "failed", error=error)
        metrics.record_job("failed", time.monotonic() - job.started)
