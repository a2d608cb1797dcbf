"""Fine-tuning jobs as the HTTP routes and both queues see them: statuses, records, errors and
the `JobQueue` interface.

A job moves through `queued -> running -> succeeded | failed | cancelled` (a queued job can
also be cancelled directly). The two queues implementing `JobQueue` are `LocalJobQueue`
(`service.jobs.local_queue`, the embedded default) and `RedisJobQueue`
(`service.jobs.redis_queue`); `service.jobs.factory.open_job_queue` picks one. Job ids are 32
hex digits.
"""

from __future__ import annotations

import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


class JobError(Exception):
    """Root of the job queue's errors."""


class JobNotFoundError(JobError):
    """No job with this id (never submitted, or its record expired)."""


class TooManyJobsError(JobError):
    """The limit of queued plus running jobs is reached."""


class JobQueueUnavailableError(JobError):
    """The queue's Redis cannot be reached."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # RQ stores naive UTC datetimes
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.isoformat()


def new_job_id() -> str:
    return uuid.uuid4().hex


def check_job_id(job_id: str) -> str:
    """The id itself, or JobNotFoundError: a malformed id cannot name a job (and never
    reaches a Redis key)."""
    if not JOB_ID_PATTERN.match(job_id):
        raise JobNotFoundError(f"no fine-tuning job {job_id!r} (job ids are 32 hex digits)")
    return job_id


@dataclass(frozen=True)
class JobRecord:
    """What a client sees of a job (the `GET /v1/finetune/jobs/{id}` body)."""

    job_id: str
    status: JobStatus
    model: str
    created_at: str | None
    started_at: str | None = None
    ended_at: str | None = None
    progress: dict[str, Any] | None = None  # step, total_steps, loss, validation_accuracy, eta
    result: dict[str, Any] | None = None  # when succeeded: metrics before/after, new version
    error: str | None = None  # when failed: what went wrong, for the client
    cancel_requested: bool = False
    attempts: int = 0  # runs started (more than one after a retry)
    workers_alive: int | None = None  # queued on Redis: live workers on its queue
    waiting_reason: str | None = None  # queued with no live worker: what to do about it


@dataclass(frozen=True)
class JobSubmission:
    """A validated job: the spec as JSON, the model it tunes, an uploaded .npz if any."""

    spec: dict[str, Any]
    model: str
    upload: bytes | None = None


def worker_payload(job_id: str, submission: JobSubmission) -> dict[str, Any]:
    """The JSON a worker receives (the upload travels beside it)."""
    return {"job_id": job_id, "spec": submission.spec, "has_upload": submission.upload is not None}


class JobQueue(ABC):
    """Submit, inspect and cancel fine-tuning jobs. Methods block briefly (Redis round trips):
    async callers run them in a thread."""

    kind: str  # "redis" or "local", for logs

    @abstractmethod
    def submit(self, submission: JobSubmission) -> JobRecord:
        """Queue a job; TooManyJobsError when `max_active` jobs are queued or running."""

    @abstractmethod
    def get(self, job_id: str) -> JobRecord:
        """The job's record; JobNotFoundError for an unknown id."""

    @abstractmethod
    def cancel(self, job_id: str) -> JobRecord:
        """A queued job is removed (status `cancelled`); a running one is asked to stop (its
        `should_cancel` turns true, it ends `cancelled` without publishing); a finished job
        is left as it is. Returns the record after the request."""

    @abstractmethod
    def active_count(self) -> int:
        """Jobs queued or running now."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and processes."""
