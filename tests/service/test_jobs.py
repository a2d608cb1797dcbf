"""The job queues behind `JobQueue`: the embedded local queue running real fine-tuning jobs in
its child process, and the Redis (RQ) queue's bookkeeping against a real redis-server.

Jobs that need a `neuroserve worker` process (Redis jobs running, cancelled mid-run, killed)
are in test_worker_e2e.py; the HTTP routes in test_finetune_http.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rq.registry import CanceledJobRegistry

from models.latest_pointer import LOCK_FILE, POINTER_FILE
from models.repository import WEIGHTS_FILE, ModelRepository
from service.finetuning.spec import ProgressEvent
from service.jobs.local_queue import LocalJobQueue
from service.jobs.redis_queue import RedisJobQueue, connect_job_redis
from service.jobs.types import (
    FINISHED,
    JobNotFoundError,
    JobQueue,
    JobRecord,
    JobSubmission,
    TooManyJobsError,
)
from service.jobs.worker import ProgressTracker
from tests.service.conftest import publish_lru

JOB_TIMEOUT_S = 120.0  # generous: the 2-core test machine is shared
TEMP_PREFIX = ".publishing-"  # how the repository names a version being written


# ---- helpers shared with the HTTP and end-to-end tests ----------------------------------------


def quick_spec(model: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """A job of a couple of seconds: 200 ZO steps on translated digits, evaluated 4 times."""
    spec = {
        "model": model,
        "data": {"kind": "builtin", "name": "digits-seq", "shift": "translated"},
        "steps": 200,
        "batch_size": 16,
        "eval_every": 50,
        "lr": 1e-3,
    }
    return {**spec, **overrides}


def long_spec(model: str = "tiny") -> dict[str, Any]:
    """A job that runs far longer than any test waits (tests cancel or kill it); it reports
    progress at every evaluation, every 25 steps."""
    return quick_spec(model, steps=100_000, eval_every=25)


def publish_test_models(repository: ModelRepository) -> None:
    """`tiny`: an untrained digits LRU; `corrupt`: its weights damaged after publishing."""
    publish_lru(repository, "tiny", seed=1)
    publish_lru(repository, "corrupt", seed=2)
    weights = repository.version_path("corrupt", "1") / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-8] + b"damaged!")


def wait_for(
    read: Callable[[], Any], done: Callable[[Any], bool], timeout: float = JOB_TIMEOUT_S
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s; last seen: {value}")
        time.sleep(0.05)


def is_tuning(progress: dict[str, Any] | None) -> bool:
    return progress is not None and progress.get("stage") == "tuning" and progress["step"] > 0


def assert_repository_intact(repository: ModelRepository, name: str, versions: list[str]) -> None:
    """Exactly `versions` of `name` exist, each complete and readable, and no half-written
    version (the repository's hidden temp dirs) is left anywhere."""
    assert repository.versions(name) == versions
    entries = {entry.name for entry in (repository.root / name).iterdir()}
    assert entries - {POINTER_FILE, LOCK_FILE} == set(versions)  # beside: `latest`, its lock
    assert not [entry for entry in repository.root.iterdir() if entry.name.startswith(TEMP_PREFIX)]
    for version in versions:
        repository.card(name, version)


def submission(spec: dict[str, Any]) -> JobSubmission:
    return JobSubmission(spec=spec, model=spec["model"])


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    repository = ModelRepository(tmp_path_factory.mktemp("jobs-repository"))
    publish_test_models(repository)
    return repository


@pytest.fixture(scope="module")
def local_queue(repository: ModelRepository) -> Iterator[LocalJobQueue]:
    queue = LocalJobQueue(repository.root, max_active=3)
    yield queue
    queue.close()


@pytest.fixture
def redis_queue(redis_url: str, redis_prefix: str) -> Iterator[RedisJobQueue]:
    """A Redis queue of this test's own; no worker takes its jobs, so they stay queued."""
    queue = RedisJobQueue(
        connect_job_redis(redis_url),
        queue_name=f"{redis_prefix}-finetune",
        prefix=redis_prefix,
        max_active=3,
        heartbeat_seconds=0.5,
    )
    yield queue
    for job_id in CanceledJobRegistry(queue=queue.queue).get_job_ids():
        queue.queue.fetch_job(job_id).delete()
    queue.queue.delete(delete_jobs=True)
    queue.close()


@pytest.fixture(params=["local", "redis"])
def job_queue(request: pytest.FixtureRequest) -> Iterator[JobQueue]:
    """Each implementation; a test leaves none of its jobs active."""
    queue: JobQueue = request.getfixturevalue(f"{request.param}_queue")
    yield queue
    wait_for(queue.active_count, lambda count: count == 0)


def cancel_all(queue: JobQueue, records: list[JobRecord]) -> None:
    for record in records:
        queue.cancel(record.job_id)
    for record in records:
        wait_for(lambda job_id=record.job_id: queue.get(job_id), lambda r: r.status in FINISHED)


# ---- the contract both queues keep ------------------------------------------------------------


def test_a_queued_job_is_cancelled_at_once_and_stays_readable(job_queue: JobQueue) -> None:
    # The local queue starts the first job at once; the Redis one (no worker) keeps both queued.
    first = job_queue.submit(submission(long_spec()))
    waiting = job_queue.submit(submission(quick_spec()))
    assert waiting.status == "queued" and waiting.model == "tiny" and waiting.attempts == 0
    assert job_queue.active_count() == 2

    cancelled = job_queue.cancel(waiting.job_id)
    assert cancelled.status == "cancelled"
    assert cancelled.ended_at is not None and cancelled.attempts == 0
    assert job_queue.get(waiting.job_id) == cancelled
    assert job_queue.cancel(waiting.job_id).status == "cancelled"  # idempotent
    assert job_queue.active_count() == 1
    cancel_all(job_queue, [first])
    assert job_queue.get(first.job_id).status == "cancelled"


def test_the_active_job_limit_refuses_more_jobs(job_queue: JobQueue) -> None:
    records = [job_queue.submit(submission(long_spec())) for _ in range(3)]
    with pytest.raises(TooManyJobsError, match="3 fine-tuning jobs.*NEUROSERVE_MAX_ACTIVE_JOBS"):
        job_queue.submit(submission(quick_spec()))
    job_queue.cancel(records[-1].job_id)  # a queued one: its slot frees at once
    records.append(job_queue.submit(submission(long_spec())))
    cancel_all(job_queue, records)


@pytest.mark.parametrize("job_id", ["0" * 32, "not-a-job", "../../etc/passwd", ""])
def test_unknown_and_malformed_job_ids_are_not_found(job_queue: JobQueue, job_id: str) -> None:
    with pytest.raises(JobNotFoundError, match="no fine-tuning job"):
        job_queue.get(job_id)
    with pytest.raises(JobNotFoundError):
        job_queue.cancel(job_id)


# ---- the local queue running real jobs --------------------------------------------------------


def test_local_job_runs_to_success_and_publishes_a_version(
    local_queue: LocalJobQueue, repository: ModelRepository
) -> None:
    before = repository.versions("tiny")
    record = local_queue.submit(submission(quick_spec()))
    done = wait_for(lambda: local_queue.get(record.job_id), lambda r: r.status in FINISHED)

    assert done.status == "succeeded", done.error
    assert done.attempts == 1 and done.error is None
    assert done.started_at is not None and done.started_at <= done.ended_at
    result = done.result
    assert result["status"] == "completed" and result["base_version"] == before[-1]
    assert repository.versions("tiny") == [*before, result["version"]]
    assert done.progress["stage"] == "done" and done.progress["step"] == 200
    # The checkpoint is the best validation point, so it is never worse than the base.
    history = {point["step"]: point["validation_accuracy"] for point in result["history"]}
    assert history[result["best_step"]] >= history[0]
    assert set(result["before"]) == set(result["after"]) >= {"accuracy", "ece", "coverage"}
    assert local_queue.cancel(record.job_id) == done  # a finished job is left as it was


def test_local_cancel_of_a_running_job_publishes_nothing(
    local_queue: LocalJobQueue, repository: ModelRepository
) -> None:
    versions = repository.versions("tiny")
    record = local_queue.submit(submission(long_spec()))
    wait_for(lambda: local_queue.get(record.job_id).progress, is_tuning)

    asked = local_queue.cancel(record.job_id)
    assert asked.status == "running" and asked.cancel_requested
    done = wait_for(lambda: local_queue.get(record.job_id), lambda r: r.status in FINISHED)
    assert done.status == "cancelled" and done.result["version"] is None
    assert 0 < done.result["steps_run"] < 100_000
    assert_repository_intact(repository, "tiny", versions)


def test_local_worker_killed_mid_job_fails_the_job_and_leaves_the_repository_intact(
    local_queue: LocalJobQueue, repository: ModelRepository
) -> None:
    versions = repository.versions("tiny")
    record = local_queue.submit(submission(long_spec()))
    wait_for(lambda: local_queue.get(record.job_id).progress, is_tuning)
    os.kill(local_queue.worker_pid, signal.SIGKILL)

    done = wait_for(lambda: local_queue.get(record.job_id), lambda r: r.status in FINISHED)
    assert done.status == "failed"
    assert "worker process died (exit code -9)" in done.error
    assert "no model version was published" in done.error
    assert_repository_intact(repository, "tiny", versions)


def test_local_retry_reruns_a_job_whose_worker_died_but_never_a_failing_job(
    repository: ModelRepository,
) -> None:
    queue = LocalJobQueue(repository.root, max_active=3, retries=1)
    try:
        record = queue.submit(submission(quick_spec()))
        wait_for(lambda: queue.worker_pid, lambda pid: pid is not None)
        os.kill(queue.worker_pid, signal.SIGKILL)
        done = wait_for(lambda: queue.get(record.job_id), lambda r: r.status in FINISHED)
        assert done.status == "succeeded", done.error
        assert done.attempts == 2

        broken = queue.submit(submission(quick_spec("corrupt")))
        failed = wait_for(lambda: queue.get(broken.job_id), lambda r: r.status in FINISHED)
    finally:
        queue.close()
    assert failed.status == "failed" and failed.attempts == 1  # an error is not retried
    assert failed.error.startswith("ArtifactError:") and "sha256" in failed.error


# ---- progress ---------------------------------------------------------------------------------


def test_progress_tracker_reports_stages_at_once_and_estimates_the_time_left() -> None:
    sent: list[dict[str, Any]] = []
    tracker = ProgressTracker(sent.append, every=3600.0)  # only stage changes pass the throttle
    tracker(ProgressEvent(stage="loading", total_steps=100))
    tracker(ProgressEvent(stage="tuning", step=0, total_steps=100))
    time.sleep(0.05)
    tracker(ProgressEvent(stage="tuning", step=10, total_steps=100, validation_accuracy=0.5))
    time.sleep(0.05)
    tracker(ProgressEvent(stage="tuning", step=20, total_steps=100, train_loss=1.5))

    assert [event["stage"] for event in sent] == ["loading", "tuning"]
    latest = tracker.latest
    assert latest["step"] == 20 and latest["loss"] == 1.5
    assert latest["validation_accuracy"] == 0.5  # the latest evaluation's, kept between them
    # 20 steps took >= 0.1 s, so the 80 left take >= 0.4 s at that pace.
    assert latest["eta_seconds"] >= 0.4
    tracker(ProgressEvent(stage="calibrating", step=100, total_steps=100))
    assert sent[-1]["stage"] == "calibrating" and sent[-1]["eta_seconds"] is None


def test_the_repository_check_sees_a_half_written_version(tmp_path: Path) -> None:
    """The integrity helper itself must be able to fail."""
    repository = ModelRepository(tmp_path)
    publish_lru(repository, "tiny", seed=1)
    (tmp_path / f"{TEMP_PREFIX}tiny-abc").mkdir()
    with pytest.raises(AssertionError):
        assert_repository_intact(repository, "tiny", ["1"])
