"""Fine-tuning end to end on the Redis job queue, all real: a private redis-server, a real
`neuroserve worker` subprocess, a real uvicorn server and httpx.

Shown here: a job submitted over HTTP runs on the worker and its new version serves a session
at once (and the worker's /metrics counts it); a running job is cancelled without publishing;
a killed work-horse fails its job while the worker lives on; a whole worker killed mid-job is
noticed through the job's heartbeat and its job fails, or runs again on another worker when
retries are configured; and the model repository never shows a partial version.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from models.digits import load_digits_seq
from models.repository import ModelRepository
from service import cli
from service.app import create_app
from service.settings import Settings
from tests.conftest import free_tcp_port
from tests.service.conftest import running_server
from tests.service.test_cli import COMMAND, cli_env, run_cli
from tests.service.test_finetune_http import shifted_subset_spec, wait_for_job, wait_until_finished
from tests.service.test_jobs import (
    assert_repository_intact,
    is_tuning,
    long_spec,
    publish_test_models,
    wait_for,
)

pytestmark = pytest.mark.redis

# A lost job is noticed after three missed beats (6 s). Shorter beats made a healthy job on a
# busy machine look lost: a work-horse's main thread can keep its heartbeat thread waiting
# (at 1 s beats, a full-suite run on 2 cores failed the end-to-end job after 3 s of silence).
HEARTBEAT_SECONDS = 2.0
DEFAULT_HEARTBEAT = Settings.model_fields["job_heartbeat_seconds"].default  # 5 s
WORKER_START_TIMEOUT_S = 60.0


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (a worker's work-horse), read from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended meanwhile
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


class WorkerProcess:
    """`neuroserve worker` on the test's queue; restarted on demand after a test kills it."""

    def __init__(self, redis_url: str, queue: str, prefix: str, repository: Path) -> None:
        self.redis_url, self.queue, self.prefix, self.repository = (
            redis_url, queue, prefix, repository
        )  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self.metrics_url = ""

    def ensure_running(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        port = free_tcp_port()
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        env = cli_env(
            NEUROSERVE_STATE_STORE_PREFIX=self.prefix,
            NEUROSERVE_JOB_HEARTBEAT_SECONDS=str(HEARTBEAT_SECONDS),
        )
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.process = subprocess.Popen(
            [*COMMAND, "worker", "--redis-url", self.redis_url, "--queues", self.queue,
             "--repository", str(self.repository), "--metrics-port", str(port),
             "--log-level", "warning"],
            env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the worker exited during start-up"
            try:
                if httpx.get(self.metrics_url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("the worker's metrics port did not answer")

    def horse_pids(self) -> list[int]:
        assert self.process is not None
        return child_pids(self.process.pid)

    def kill_everything(self) -> None:
        """SIGKILL the worker and its work-horse: a machine or container lost mid-job."""
        assert self.process is not None
        horses = self.horse_pids()
        self.process.kill()
        self.process.wait()
        for pid in horses:
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.horse_pids() if self.process is not None else []:
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def names(redis_url: str) -> Iterator[tuple[str, str]]:
    """A key prefix and RQ queue of this module's own; their Redis keys go afterwards."""
    prefix = f"nse2e-{uuid.uuid4().hex[:8]}"
    queue = f"{prefix}-finetune"
    yield prefix, queue
    client = redis.Redis.from_url(redis_url)
    job_ids = [key.decode().rsplit(":", 1)[-1] for key in client.scan_iter(f"{prefix}:*")]
    doomed = [
        key
        for key in client.scan_iter("rq:*")
        if queue.encode() in key or any(job_id.encode() in key for job_id in job_ids)
    ]
    for key in [*doomed, *client.scan_iter(f"{prefix}:*")]:
        client.delete(key)
    client.close()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    repository = ModelRepository(tmp_path_factory.mktemp("worker-e2e"))
    publish_test_models(repository)
    return repository


@pytest.fixture(scope="module")
def worker(
    redis_url: str, names: tuple[str, str], repository: ModelRepository
) -> Iterator[WorkerProcess]:
    prefix, queue = names
    process = WorkerProcess(redis_url, queue, prefix, repository.root)
    yield process
    process.stop()


def server_settings(
    redis_url: str, names: tuple[str, str], repository: ModelRepository, **extra: object
) -> Settings:
    prefix, queue = names
    return Settings(
        model_repository=repository.root,
        redis_url=redis_url,  # sessions and jobs both in Redis
        state_store_prefix=prefix,
        job_queue_name=queue,
        allow_uncalibrated=True,
        **{"job_heartbeat_seconds": HEARTBEAT_SECONDS, **extra},
    )


@pytest.fixture(scope="module")
def client(
    redis_url: str, names: tuple[str, str], repository: ModelRepository
) -> Iterator[httpx.Client]:
    app = create_app(server_settings(redis_url, names, repository))
    with running_server(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as http:
        yield http


def submit(client: httpx.Client, spec: dict) -> str:
    response = client.post("/v1/finetune/jobs", json=spec)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def metric_value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


# ---- the tests --------------------------------------------------------------------------------


def test_a_job_runs_on_a_worker_process_end_to_end(
    client: httpx.Client, worker: WorkerProcess
) -> None:
    worker.ensure_running()
    versions_before = client.get("/v1/models/tiny").json()["versions"]
    job = wait_until_finished(client, submit(client, shifted_subset_spec("tiny")))

    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1 and job["progress"]["stage"] == "done"
    new_version = job["result"]["version"]
    assert client.get("/v1/models/tiny").json()["versions"] == [*versions_before, new_version]
    late_cancel = client.delete(f"/v1/finetune/jobs/{job['job_id']}")
    assert late_cancel.status_code == 200
    assert late_cancel.json()["status"] == "succeeded"
    assert not late_cancel.json()["cancel_requested"]
    session = client.post("/v1/sessions", json={"model": "tiny", "version": new_version})
    assert session.status_code == 201, session.text
    sequence = load_digits_seq("test", shift="translated").inputs[0].tolist()  # [8, 8]
    step = client.post(
        f"/v1/sessions/{session.json()['session_id']}/step", json={"inputs": sequence}
    )
    assert step.status_code == 200, step.text
    assert step.json()["version"] == new_version and step.json()["step"] == 8

    # The worker process counts the job once its work-horse has exited, just after the job
    # reads as succeeded.
    exposition = wait_for(
        lambda: httpx.get(worker.metrics_url, timeout=5).text,
        lambda text: 'neuroserve_finetune_jobs_total{status="succeeded"}' in text,
        timeout=10,
    )
    assert metric_value(exposition, 'neuroserve_finetune_jobs_total{status="succeeded"}') == 1.0
    assert metric_value(exposition, "neuroserve_finetune_job_duration_seconds_count") == 1.0


def test_cancelling_a_running_job_on_a_worker_publishes_nothing(
    client: httpx.Client, worker: WorkerProcess, repository: ModelRepository
) -> None:
    worker.ensure_running()
    versions = repository.versions("tiny")
    job_id = submit(client, long_spec())
    wait_for_job(client, job_id, lambda job: is_tuning(job["progress"]))

    response = client.delete(f"/v1/finetune/jobs/{job_id}")
    assert response.status_code == 202 and response.json()["cancel_requested"]
    job = wait_until_finished(client, job_id)
    assert job["status"] == "cancelled" and job["result"]["version"] is None
    assert_repository_intact(repository, "tiny", versions)


def test_a_killed_work_horse_fails_its_job_and_the_worker_lives_on(
    client: httpx.Client, worker: WorkerProcess, repository: ModelRepository
) -> None:
    worker.ensure_running()
    versions = repository.versions("tiny")
    job_id = submit(client, long_spec())
    wait_for_job(client, job_id, lambda job: is_tuning(job["progress"]))
    (horse,) = worker.horse_pids()
    os.kill(horse, signal.SIGKILL)

    job = wait_until_finished(client, job_id)
    assert job["status"] == "failed"
    assert "the worker process running the job died" in job["error"]
    assert "no model version was published" in job["error"]
    assert "Traceback" not in job["error"]
    assert_repository_intact(repository, "tiny", versions)
    assert worker.process.poll() is None  # the crash took only the work-horse


def test_a_worker_lost_mid_job_fails_the_job_through_its_heartbeat(
    client: httpx.Client, worker: WorkerProcess, repository: ModelRepository
) -> None:
    worker.ensure_running()
    versions = repository.versions("tiny")
    job_id = submit(client, long_spec())
    wait_for_job(client, job_id, lambda job: is_tuning(job["progress"]))
    worker.kill_everything()
    lost_at = time.monotonic()

    job = wait_until_finished(client, job_id)
    # Three missed beats, plus the polling: seconds, not RQ's minute-plus.
    assert time.monotonic() - lost_at < 15.0
    assert job["status"] == "failed" and job["ended_at"] is not None
    assert f"stopped responding (no heartbeat for {3 * HEARTBEAT_SECONDS:g} s" in job["error"]
    assert_repository_intact(repository, "tiny", versions)


def test_a_lost_worker_s_job_is_retried_on_another_worker(
    redis_url: str,
    names: tuple[str, str],
    repository: ModelRepository,
    worker: WorkerProcess,
) -> None:
    settings = server_settings(redis_url, names, repository, job_retries=1)
    with running_server(create_app(settings)) as base_url, httpx.Client(base_url=base_url) as http:
        worker.ensure_running()
        versions = repository.versions("tiny")
        job_id = submit(http, shifted_subset_spec("tiny"))
        # Killed as soon as it runs: long before a run of this job could finish.
        wait_for_job(http, job_id, lambda job: job["status"] == "running")
        worker.kill_everything()

        requeued = wait_for_job(http, job_id, lambda job: job["status"] != "running")
        assert requeued["status"] == "queued" and requeued["attempts"] == 1
        worker.ensure_running()  # "another machine" takes it
        job = wait_until_finished(http, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    assert repository.versions("tiny") == [*versions, job["result"]["version"]]
    assert_repository_intact(repository, "tiny", repository.versions("tiny"))


def test_a_job_whose_heartbeat_lapses_while_it_runs_never_publishes_twice(
    redis_url: str,
    names: tuple[str, str],
    repository: ModelRepository,
    worker: WorkerProcess,
) -> None:
    """A work-horse frozen mid-job (SIGSTOP: alive, but silent) is declared lost and its job
    runs again on another worker; woken up afterwards, the first run finds its fencing token
    revoked and stops without publishing or touching the job's record."""
    prefix, queue = names
    settings = server_settings(redis_url, names, repository, job_retries=1)
    second = WorkerProcess(redis_url, queue, prefix, repository.root)
    with running_server(create_app(settings)) as base_url, httpx.Client(base_url=base_url) as http:
        worker.ensure_running()
        versions = repository.versions("tiny")
        job_id = submit(http, shifted_subset_spec("tiny"))
        wait_for_job(http, job_id, lambda job: is_tuning(job["progress"]))
        (horse,) = worker.horse_pids()
        os.kill(horse, signal.SIGSTOP)
        try:
            requeued = wait_for_job(http, job_id, lambda job: job["status"] != "running")
            assert requeued["status"] == "queued", requeued
            second.ensure_running()
            job = wait_until_finished(http, job_id)
        finally:
            os.kill(horse, signal.SIGCONT)  # the first run wakes up and checks its token
        try:
            wait_for(worker.horse_pids, lambda pids: pids == [], timeout=60)
            assert job["status"] == "succeeded" and job["attempts"] == 2, job
            time.sleep(1.0)  # anything the woken run could still write would land by now
            again = http.get(f"/v1/finetune/jobs/{job_id}").json()
            assert (again["status"], again["result"], again["attempts"]) == (
                "succeeded",
                job["result"],
                2,
            )
            # exactly one new version, the retry's
            assert repository.versions("tiny") == [*versions, job["result"]["version"]]
            assert_repository_intact(repository, "tiny", repository.versions("tiny"))
        finally:
            second.stop()


def test_a_queued_job_with_no_worker_says_so(
    redis_url: str, names: tuple[str, str], repository: ModelRepository
) -> None:
    prefix, queue = names
    lonely = f"{queue}-nobody-listens"
    # The production heartbeat (5 s: lost after 15 s of silence), not the tests' 1 s: this
    # test is about the wait, and on a loaded machine a run's heartbeat thread can stall for
    # 3 s, which the server's sweep would take for a lost worker (the tests of lost workers
    # keep 1 s).
    settings = server_settings(
        redis_url, (prefix, lonely), repository, job_heartbeat_seconds=DEFAULT_HEARTBEAT
    )
    with (
        running_server(create_app(settings)) as base_url,
        httpx.Client(base_url=base_url, timeout=60) as http,
    ):
        job_id = submit(http, shifted_subset_spec("tiny"))
        job = http.get(f"/v1/finetune/jobs/{job_id}").json()
        assert job["status"] == "queued" and job["workers_alive"] == 0
        assert "no worker is running" in job["waiting_reason"]
        assert "`neuroserve worker`" in job["waiting_reason"] and lonely in job["waiting_reason"]
        text = http.get("/metrics").text
        assert metric_value(text, f'neuroserve_finetune_workers{{queue="{lonely}"}}') == 0.0
        waiting = f'neuroserve_finetune_jobs_waiting_without_worker{{queue="{lonely}"}}'
        assert metric_value(text, waiting) == 1.0

        helper = WorkerProcess(redis_url, lonely, prefix, repository.root)
        try:
            helper.ensure_running()
            seen = wait_for_job(
                http, job_id, lambda job: job["status"] != "queued" or job["workers_alive"]
            )
            assert seen["waiting_reason"] is None
            assert wait_until_finished(http, job_id)["status"] == "succeeded"
            http.get(f"/v1/finetune/jobs/{job_id}")
        finally:
            helper.stop()


# ---- the command line -------------------------------------------------------------------------


def test_the_worker_without_redis_explains_itself(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NEUROSERVE_REDIS_URL", "NEUROSERVE_JOB_QUEUE_URL"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["worker"]) == 2
    assert "no Redis to take jobs from: pass --redis-url" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://127.0.0.1:7000", "cannot use a Redis Cluster"),
        ("http://127.0.0.1:6379", "unsupported Redis URL scheme"),
        ("unused", "Connection refused"),
    ],
)
def test_the_worker_refuses_a_queue_it_cannot_use(
    capsys: pytest.CaptureFixture[str], unused_redis_url: str, url: str, message: str
) -> None:
    url = unused_redis_url if url == "unused" else url
    assert cli.main(["worker", "--redis-url", url, "--metrics-port", "0"]) == 1
    assert message in capsys.readouterr().err


def test_a_burst_worker_exits_once_its_queue_is_empty(redis_url: str) -> None:
    queue = f"nse2e-burst-{uuid.uuid4().hex[:8]}"
    result = run_cli(
        "worker", "--redis-url", redis_url, "--queues", queue, "--burst", "--metrics-port", "0"
    )
    assert result.returncode == 0, result.stderr
