"""The Redis job queue: fine-tuning jobs on RQ, run by `neuroserve worker` processes.

Why RQ: it needs nothing but Redis (already there for session state), runs every job in a
forked work-horse process so a crashing or killed job cannot take its worker down, and keeps
job status, meta and results in Redis where every server replica reads them. arq is
asyncio-only (tuning is CPU-bound, so a job would block its event loop, and there is no
per-job process isolation); Celery brings a broker abstraction, its own result backends and
far more configuration than one queue of long CPU jobs needs.

What lives where (JSON only: RQ runs with its JSON serializer, never pickle):
- the RQ job (`rq:job:<id>`): a small payload (id, key names, heartbeat interval) as its
  argument, `meta` with the model, the attempts and the latest progress, and the worker's
  outcome dict as its result;
- `<prefix>:finetune:spec:<id>` and `...:upload:<id>`: the spec as JSON and an uploaded .npz,
  kept out of the job hash (which every status read loads: inline data can be megabytes)
  and deleted once the job has ended for good;
- `<prefix>:finetune:cancel:<id>`: set by DELETE; the running job polls it (`should_cancel`);
- `<prefix>:finetune:alive:<id>`: refreshed by the running job every heartbeat interval;
- `...:fence:<id>`, `...:published:<id>`, `...:outcome:<id>`: the fencing token that makes one
  run the job's only owner, the claim of its one publication, and the outcome of the run
  that published (`service.jobs.fencing`).

A dead work-horse is noticed at once by its RQ worker, which fails the job (or retries it).
When the whole worker dies (machine lost, container killed) nobody is left to notice, and
RQ's own abandoned-job sweep only fires after a fixed minute or more. So `sweep_abandoned`
looks for started jobs whose alive key has lapsed for `LOST_AFTER_BEATS` beats, records why,
and hands each one to RQ's abandoned-job handling (retry while retries are left, else
failed) by expiring its entry in the started-job registry now. Workers sweep periodically;
the server sweeps before it reads a running job or counts active jobs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timezone
from typing import Any

import redis
from redis.sentinel import Sentinel
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker_registration import get_keys as worker_keys

from service import metrics
from service.jobs.fencing import revoke
from service.jobs.types import (
    JobNotFoundError,
    JobQueue,
    JobQueueUnavailableError,
    JobRecord,
    JobSubmission,
    TooManyJobsError,
    check_job_id,
    iso,
    new_job_id,
    utc_now,
    worker_payload,
)
from service.state.redis_connection import parse_redis_url

logger = logging.getLogger("neuroserve.jobs")

JOB_FUNCTION = "service.jobs.worker.run_queued_job"  # by name: RQ imports it in the work-horse
LOST_AFTER_BEATS = 3  # missed heartbeats before a started job counts as lost
# A run that has not beaten yet (its work-horse still starting: fork, imports, reading its
# spec) gets this long instead: on a loaded machine that start alone can outlast 3 beats.
START_GRACE_SECONDS = 30.0

_QUEUED = {RQStatus.QUEUED, RQStatus.DEFERRED, RQStatus.SCHEDULED, RQStatus.CREATED}


def job_keys(prefix: str, job_id: str) -> dict[str, str]:
    """Redis keys of one job besides RQ's own (see the module docstring)."""
    names = ("spec", "upload", "cancel", "alive", "beating", "fence", "published", "outcome")
    return {name: f"{prefix}:finetune:{name}:{job_id}" for name in names}


def completed_keys(keys: dict[str, str], job_id: str) -> dict[str, str]:
    """A job's keys as recorded at submission, with any that a server of an older release
    did not record (same prefix)."""
    prefix = keys["spec"].rsplit(":finetune:", 1)[0]
    return {**job_keys(prefix, job_id), **keys}


def connect_job_redis(url: str, socket_timeout: float | None = 5.0) -> redis.Redis:
    """A synchronous client for RQ. RQ needs one Redis server: a plain URL or a Sentinel
    URL (the master); a Cluster spreads RQ's keys over nodes and is refused."""
    target = parse_redis_url(url)
    options = {"socket_timeout": socket_timeout, "socket_connect_timeout": 5.0}
    if target.kind == "standalone":
        return redis.Redis.from_url(url, **options)
    if target.kind == "sentinel":
        auth = {"username": target.sentinel_username, "password": target.sentinel_password}
        sentinel = Sentinel(
            list(target.nodes), sentinel_kwargs={k: v for k, v in auth.items() if v is not None}
        )
        return sentinel.master_for(
            target.service_name,
            db=target.db,
            username=target.username,
            password=target.password,
            ssl=target.tls,
            **options,
        )
    raise ValueError(
        f"the fine-tuning job queue cannot use a Redis Cluster ({target.redacted_url}): RQ "
        "needs one server; set NEUROSERVE_JOB_QUEUE_URL to a redis:// or redis+sentinel:// URL"
    )


def describe_failure(exc_string: str | None, timeout_seconds: float | None) -> str:
    """A client-facing reason from RQ's failure text (a traceback or a note), no internals."""
    text = (exc_string or "").strip()
    if "Work-horse terminated unexpectedly" in text:
        signal_note = text.split("waitpid returned", 1)[-1].split(";")[0].strip()
        return (
            f"the worker process running the job died (waitpid {signal_note}: killed, or out "
            "of memory); no model version was published"
        )
    if "JobTimeoutException" in text:
        return f"the job ran longer than its timeout of {timeout_seconds} s and was stopped"
    if "AbandonedJobError" in text:
        return "the worker running the job was lost; no model version was published"
    last_line = text.splitlines()[-1] if text else "unknown error"
    return f"the job failed: {last_line}"


class RedisJobQueue(JobQueue):
    """Fine-tuning jobs on one RQ queue (see the module docstring)."""

    kind = "redis"

    def __init__(
        self,
        connection: redis.Redis,
        *,
        queue_name: str,
        prefix: str,
        max_active: int,
        retries: int = 0,
        timeout_seconds: float = 6 * 3600.0,
        heartbeat_seconds: float = 5.0,
        record_ttl_seconds: float = 7 * 24 * 3600.0,
    ) -> None:
        self.connection = connection
        self.queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
        self.prefix = prefix
        self.max_active = max_active
        self.retries = retries
        self.timeout_seconds = timeout_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.record_ttl_seconds = record_ttl_seconds

    @classmethod
    def from_settings(cls, settings: Any) -> RedisJobQueue:
        return cls(
            connect_job_redis(settings.job_queue_redis_url()),
            queue_name=settings.job_queue_name,
            prefix=settings.state_store_prefix,
            max_active=settings.max_active_jobs,
            retries=settings.job_retries,
            timeout_seconds=settings.job_timeout_seconds,
            heartbeat_seconds=settings.job_heartbeat_seconds,
            record_ttl_seconds=settings.job_record_ttl_seconds,
        )

    # ---- the interface ----
    def submit(self, submission: JobSubmission) -> JobRecord:
        with _unavailable_as_error():
            if self.active_count() >= self.max_active:
                raise TooManyJobsError(
                    f"{self.max_active} fine-tuning jobs are already queued or running "
                    "(NEUROSERVE_MAX_ACTIVE_JOBS); wait for one to finish or cancel one"
                )
            job_id = new_job_id()
            keys = job_keys(self.prefix, job_id)
            payload = worker_payload(job_id, submission)
            spec = json.dumps(payload.pop("spec")).encode()
            payload |= {"keys": keys, "heartbeat_seconds": self.heartbeat_seconds}
            ttl = int(self.record_ttl_seconds)
            with self.connection.pipeline() as pipeline:
                pipeline.set(keys["spec"], spec, ex=ttl)
                if submission.upload is not None:
                    pipeline.set(keys["upload"], submission.upload, ex=ttl)
                pipeline.execute()
            self.queue.enqueue_call(
                JOB_FUNCTION,
                kwargs={"payload": payload},
                job_id=job_id,
                timeout=int(self.timeout_seconds),
                result_ttl=ttl,
                failure_ttl=ttl,
                retry=Retry(max=self.retries) if self.retries else None,
                meta={
                    "model": submission.model,
                    "heartbeat_seconds": self.heartbeat_seconds,
                    "keys": keys,  # so a worker with another prefix setting finds them
                },
                description=f"fine-tune {submission.model}",
            )
        metrics.record_job("queued")
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with _unavailable_as_error():
            job = self._fetch(job_id)
            if job.get_status() == RQStatus.STARTED and self._is_lost(job):
                self._hand_over_lost(job)
                job = self._fetch(job_id)
            return self._record(job)

    def cancel(self, job_id: str) -> JobRecord:
        with _unavailable_as_error():
            job = self._fetch(job_id)
            if job.get_status() not in _QUEUED | {RQStatus.STARTED}:
                return self._record(job)  # it has ended: nothing to cancel
            keys = self._keys(job)
            # The flag first: a worker that takes the job right now still sees it.
            self.connection.set(keys["cancel"], b"1", ex=int(self.record_ttl_seconds))
            if self.connection.lrem(self.queue.key, 0, job_id):
                try:
                    job.cancel()
                    job.meta["ended_at"] = iso(utc_now())  # RQ keeps no end time for this
                    job.save_meta()
                    metrics.record_job("cancelled")
                except InvalidJobOperation:  # cancelled by someone else meanwhile
                    pass
                self.connection.delete(keys["spec"], keys["upload"])
            return self.get(job_id)

    def active_count(self) -> int:
        with _unavailable_as_error():
            self.sweep_abandoned()
            registry = StartedJobRegistry(queue=self.queue, serializer=JSONSerializer)
            queued = self.queue.count
            self.live_workers(queued)
            return queued + registry.get_job_count(cleanup=False)

    def live_workers(self, queued: int | None = None) -> int:
        """Workers listening on this queue whose registration has not expired (RQ's worker
        registry; a worker refreshes it while it lives, so a killed one drops out after its
        `worker_ttl`). Recorded in the metrics with the queued jobs."""
        keys = worker_keys(queue=self.queue)
        alive = int(self.connection.exists(*keys)) if keys else 0
        metrics.set_job_workers(
            self.queue.name, alive, self.queue.count if queued is None else queued
        )
        return alive

    def _waiting_reason(self, alive: int) -> str | None:
        if alive:
            return None
        return (
            f"no worker is running for the job queue {self.queue.name!r}: the job waits until "
            f"one starts. Start one with `neuroserve worker` (same NEUROSERVE_REDIS_URL or "
            f"NEUROSERVE_JOB_QUEUE_URL, and NEUROSERVE_JOB_QUEUE_NAME={self.queue.name})"
        )

    def close(self) -> None:
        self.connection.close()

    # ---- lost workers ----
    def sweep_abandoned(self) -> list[str]:
        """Hand every started job whose heartbeat lapsed to RQ's abandoned-job handling;
        the ids handed over."""
        registry = StartedJobRegistry(queue=self.queue, serializer=JSONSerializer)
        lost = []
        for job in Job.fetch_many(
            registry.get_job_ids(cleanup=False), self.connection, serializer=JSONSerializer
        ):
            if job is not None and job.get_status() == RQStatus.STARTED and self._is_lost(job):
                self._hand_over_lost(job)
                lost.append(job.id)
        return lost

    def _is_lost(self, job: Job) -> bool:
        """Started, and no heartbeat for LOST_AFTER_BEATS beats (START_GRACE_SECONDS while
        the run has not beaten at all)."""
        beat = float(job.meta.get("heartbeat_seconds", self.heartbeat_seconds))
        keys = self._keys(job)
        alive, beating = self.connection.mget([keys["alive"], keys["beating"]])
        started = job.started_at
        if alive is not None or started is None:
            return False
        started_s = started.replace(tzinfo=timezone.utc).timestamp()
        running_for = time.time() - started_s
        # `beating`: when a run first beat; one from an earlier run of a retried job predates
        # this run's start (a second of slack for clocks of different machines).
        has_beaten = beating is not None and float(beating) >= started_s - 1.0
        limit = LOST_AFTER_BEATS * beat
        return running_for > (limit if has_beaten else max(limit, START_GRACE_SECONDS))

    def _hand_over_lost(self, job: Job) -> None:
        beat = float(job.meta.get("heartbeat_seconds", self.heartbeat_seconds))
        # Revoke the lost run's token first: if it still runs, it can no longer publish.
        revoke(self.connection, self._keys(job)["fence"], int(self.record_ttl_seconds))
        job.meta["ended_at"] = iso(utc_now())  # RQ keeps no end time for an abandoned job
        job.meta["lost"] = (
            f"the worker running the job stopped responding (no heartbeat for "
            f"{LOST_AFTER_BEATS * beat:g} s: its process or machine was killed or lost); "
            "no model version was published"
        )
        job.save_meta()
        registry = StartedJobRegistry(queue=self.queue, serializer=JSONSerializer)
        members = [f"{job.id}:{execution}" for _, execution in _executions(registry, job.id)]
        if members:
            # Expire the entry now: RQ's cleanup then retries or fails it, its own way.
            self.connection.zadd(registry.key, dict.fromkeys(members, 0), xx=True)
        registry.cleanup()
        status = job.get_status()
        logger.warning("fine-tuning job %s lost with its worker; now %s", job.id, status)
        if status == RQStatus.FAILED:
            keys = self._keys(job)
            self.connection.delete(keys["spec"], keys["upload"])  # no run will need them now
            metrics.record_job("failed")

    def _keys(self, job: Job) -> dict[str, str]:
        recorded = job.meta.get("keys")
        return completed_keys(recorded, job.id) if recorded else job_keys(self.prefix, job.id)

    # ---- RQ job -> JobRecord ----
    def _fetch(self, job_id: str) -> Job:
        try:
            return Job.fetch(check_job_id(job_id), self.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            raise JobNotFoundError(f"no fine-tuning job {job_id!r}") from None

    def _record(self, job: Job) -> JobRecord:
        rq_status = job.get_status(refresh=False)
        meta = job.meta
        cancel_requested = bool(self.connection.exists(self._keys(job)["cancel"]))
        ended_at = iso(job.ended_at) or meta.get("ended_at")
        common = {
            "job_id": job.id,
            "model": meta.get("model", ""),
            "created_at": iso(job.created_at),
            "started_at": iso(job.started_at),
            "progress": meta.get("progress"),
            "cancel_requested": cancel_requested,
            "attempts": int(meta.get("attempts", 0)),
        }
        alive = self.live_workers()  # keeps the worker gauges fresh on every read
        if rq_status in _QUEUED:
            return JobRecord(
                status="queued",
                workers_alive=alive,
                waiting_reason=self._waiting_reason(alive),
                **common,
            )
        if rq_status == RQStatus.STARTED:
            return JobRecord(status="running", **common)
        if rq_status == RQStatus.CANCELED:
            return JobRecord(status="cancelled", ended_at=ended_at, **common)
        if rq_status == RQStatus.FINISHED:
            outcome = job.return_value() or {}
            return JobRecord(
                status=outcome.get("status", "failed"),
                ended_at=ended_at,
                result=outcome.get("result"),
                error=outcome.get("error"),
                **common,
            )
        result = job.latest_result()
        error = meta.get("lost") or describe_failure(
            result.exc_string if result is not None else None, job.timeout
        )
        return JobRecord(status="failed", ended_at=ended_at, error=error, **common)


def _executions(registry: StartedJobRegistry, job_id: str) -> list[tuple[str, str]]:
    return [pair for pair in registry.get_job_and_execution_ids(cleanup=False) if pair[0] == job_id]


@contextmanager
def _unavailable_as_error() -> Iterator[None]:
    """Turn a Redis connection failure into JobQueueUnavailableError (answered 503)."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise JobQueueUnavailableError(
            f"the job queue's Redis cannot be reached: {error}"
        ) from None
