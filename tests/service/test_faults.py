"""Faults with real processes: Redis stopped and restarted under load, damaged state in Redis,
damaged artifacts, and a burst larger than the Redis connection pool.

Each Redis fault test runs its own `redis-server` (append-only file, fsync on every write) on
a fixed port, so it can be stopped and started again on the same port with its data intact.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from models.repository import WEIGHTS_FILE, ModelRepository
from service.app import create_app
from service.state.redis_store import RedisStateStore
from tests.conftest import free_tcp_port, redis_answers
from tests.service.conftest import publish_lru
from tests.service.test_sessions_http import redis_settings, v1_error

pytestmark = pytest.mark.redis

LOAD_THREADS = 6
START_TIMEOUT_S = 10.0


class RestartableRedis:
    """One persistent `redis-server` on a fixed loopback port that can be stopped and restarted."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not on PATH")
        self.binary, self.workdir, self.port = binary, workdir, free_tcp_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir),
             "--logfile", str(self.workdir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not redis_answers(self.url, timeout=0.2):
            assert self.process.poll() is None, (self.workdir / "redis.log").read_text()
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def create_session(client: httpx.Client) -> str:
    response = client.post("/v1/sessions", json={"model": "tiny-digits"})
    assert response.status_code == 201, response.text
    return response.json()["session_id"]


def session_step(client: httpx.Client, session_id: str) -> int:
    response = client.get(f"/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()["step"]


class SteppingLoad:
    """Threads stepping their own session by one time step at a time, until stopped.

    Every answer must be 200 or a clean 503; `acknowledged` counts the 200s per session.
    A step whose answer was 503 may still have been written if Redis went away between
    applying it and replying, so `uncertain` counts those (at most one per outage).
    """

    def __init__(self, base_url: str, session_ids: list[str]) -> None:
        self.base_url = base_url
        self.acknowledged = dict.fromkeys(session_ids, 0)
        self.uncertain = dict.fromkeys(session_ids, 0)
        self.statuses: dict[int, int] = {}
        self.bad_answers: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(session_id,), daemon=True)
            for session_id in session_ids
        ]

    def __enter__(self) -> SteppingLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, session_id: str) -> None:
        in_outage = False
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            while not self._stop.is_set():
                response = client.post(
                    f"/v1/sessions/{session_id}/step", json={"inputs": [[1.0] * 8]}
                )
                with self._lock:
                    self.statuses[response.status_code] = (
                        self.statuses.get(response.status_code, 0) + 1
                    )
                if response.status_code == 200:
                    self.acknowledged[session_id] += 1
                    in_outage = False
                elif response.status_code == 503 and "state store unavailable" in response.text:
                    if not in_outage:
                        self.uncertain[session_id] += 1
                    in_outage = True
                    time.sleep(0.02)
                else:
                    self.bad_answers.append(f"{response.status_code}: {response.text}")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def count(self, status: int) -> int:
        with self._lock:
            return self.statuses.get(status, 0)


def test_redis_stopped_under_load_is_503_and_not_ready_then_service_resumes(
    test_repository: ModelRepository,
    restartable_redis: RestartableRedis,
    server_factory: Callable[..., Any],
) -> None:
    settings = redis_settings(
        test_repository.root, restartable_redis.url, "nsfault", store_check_seconds=0.1
    )
    with (
        server_factory(create_app(settings)) as base_url,
        httpx.Client(base_url=base_url, timeout=30) as client,
    ):
        session_ids = [create_session(client) for _ in range(LOAD_THREADS)]
        with SteppingLoad(base_url, session_ids) as load:
            load.wait_for(lambda: load.count(200) >= 30, "steps before the outage")
            restartable_redis.stop()
            load.wait_for(lambda: load.count(503) >= 2 * LOAD_THREADS, "503s during the outage")
            load.wait_for(
                lambda: client.get("/v2/health/ready").status_code == 503, "readiness to turn false"
            )
            assert client.get("/v2/health/ready").json() == {"ready": False}
            assert client.get("/v2/health/live").status_code == 200  # up, just not ready
            message = v1_error(client.get(f"/v1/sessions/{session_ids[0]}"), 503)
            assert message.startswith("state store unavailable") and "retry later" in message

            restartable_redis.start()  # same port, same append-only file
            load.wait_for(
                lambda: client.get("/v2/health/ready").status_code == 200, "readiness to return"
            )
            resumed_from = load.count(200)
            load.wait_for(lambda: load.count(200) >= resumed_from + 30, "steps after the outage")
        assert load.bad_answers == []
        assert set(load.statuses) == {200, 503}

        # Every acknowledged step survived the outage; an unacknowledged one at most landed.
        for session_id in session_ids:
            acknowledged = load.acknowledged[session_id]
            now = session_step(client, session_id)
            assert acknowledged <= now <= acknowledged + load.uncertain[session_id], session_id
            response = client.post(
                f"/v1/sessions/{session_id}/step", json={"inputs": [[1.0] * 8] * 3}
            )
            assert response.status_code == 200 and response.json()["step"] == now + 3


@pytest.mark.parametrize(
    "damage",
    [
        "truncated blob",
        "garbage blob",
        "empty blob",
        "non-numeric version",
        "a string instead of a hash",
    ],
)
@pytest.mark.parametrize("cache_mb", [0, 64], ids=["reading replica", "writing replica"])
def test_a_damaged_state_in_redis_is_a_clear_409_and_other_sessions_are_untouched(
    damage: str,
    cache_mb: int,
    test_repository: ModelRepository,
    restartable_redis: RestartableRedis,
    server_factory: Callable[..., Any],
) -> None:
    """A replica that reads the damaged entry answers 409 and deletes it. The replica that
    wrote the session last steps from its own copy (`session_cache_mb`): damaged bytes under
    an intact version are then replaced by the next step, and a damaged version or key type
    is found by its compare-and-set, which writes nothing, and answered alike."""
    settings = redis_settings(
        test_repository.root, restartable_redis.url, "nsfault", session_cache_mb=cache_mb
    )
    raw = redis.Redis.from_url(restartable_redis.url)
    with (
        server_factory(create_app(settings)) as base_url,
        httpx.Client(base_url=base_url, timeout=30) as client,
    ):
        damaged, healthy = create_session(client), create_session(client)
        for session_id in (damaged, healthy):
            response = client.post(f"/v1/sessions/{session_id}/step", json={"inputs": [[1.0] * 8]})
            assert response.status_code == 200, response.text
        key = f"nsfault:session:{damaged}"
        blob = raw.hget(key, "blob")
        if damage == "truncated blob":
            raw.hset(key, "blob", blob[: len(blob) // 2])
        elif damage == "garbage blob":
            raw.hset(key, "blob", b"\x00\xff not a state at all" * 8)
        elif damage == "empty blob":
            raw.hset(key, "blob", b"")
        elif damage == "non-numeric version":
            raw.hset(key, "version", "seven")
        else:
            raw.delete(key)
            raw.set(key, blob)

        response = client.post(f"/v1/sessions/{damaged}/step", json={"inputs": [[1.0] * 8]})
        if cache_mb and damage.endswith("blob"):
            assert response.status_code == 200 and response.json()["step"] == 2
            assert client.get(f"/v1/sessions/{damaged}").json()["step"] == 2
        else:
            assert damaged in v1_error(response, 409)
            assert raw.exists(key) == 0  # deleted: the id can be used again
        assert client.get("/v2/health/live").status_code == 200
        response = client.post(f"/v1/sessions/{healthy}/step", json={"inputs": [[1.0] * 8]})
        assert response.status_code == 200 and response.json()["step"] == 2
    raw.close()


def test_a_corrupted_artifact_is_a_clear_503_and_the_server_stays_up(
    tmp_path: Path, server_factory: Callable[..., Any]
) -> None:
    repository = ModelRepository(tmp_path / "repository")
    publish_lru(repository, "tiny-digits", seed=1)
    publish_lru(repository, "tiny-digits", seed=2)
    settings = redis_settings(repository.root, "", "nsfault", preload_models=False)
    # Damage version 2 on disk before anything loaded it: header intact, tensors cut short.
    weights = repository.version_path("tiny-digits", "2") / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with (
        server_factory(create_app(settings)) as base_url,
        httpx.Client(base_url=base_url, timeout=30) as client,
    ):
        body = {"version": "2", "inputs": [[[1.0] * 8]]}
        for _ in range(2):  # refused the same way every time, not once then a 500
            response = client.post("/v1/models/tiny-digits/predict", json=body)
            assert response.status_code == 503, response.text
            assert "tiny-digits" in response.text
        body["version"] = "1"
        assert client.post("/v1/models/tiny-digits/predict", json=body).status_code == 200
        assert client.get("/v2/health/live").status_code == 200


def test_a_burst_larger_than_the_connection_pool_waits_for_connections(
    restartable_redis: RestartableRedis,
) -> None:
    async def burst() -> None:
        store = RedisStateStore.from_url(restartable_redis.url, prefix="nsburst", max_connections=4)
        async with store:
            await asyncio.gather(*(store.put_record("n", str(i), b"x", 60) for i in range(200)))
            values = await asyncio.gather(*(store.get_record("n", str(i)) for i in range(200)))
        assert values == [b"x"] * 200

    asyncio.run(burst())
