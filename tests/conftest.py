"""Top-level fixtures: a real Redis server for the tests that need one.

`redis_url` (session-scoped) is, in order of preference:
1. `NEUROSERVE_TEST_REDIS_URL`, when it is set and answers PING;
2. a private `redis-server` from PATH, started on a free loopback port in a temporary directory
   without persistence, and stopped when the test session ends.
The machine's own 127.0.0.1:6379 is never used implicitly: CI machines may not have one.

`redis_prefix` gives each test its own key prefix and deletes that test's keys afterwards, so
tests sharing one server (even a shared external one) cannot see each other's data.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_URL_ENV = "NEUROSERVE_TEST_REDIS_URL"
REDIS_START_TIMEOUT_S = 10.0
INSTALL_HINT = (
    "redis-server was not found on PATH. Install it (Debian/Ubuntu: `apt-get install -y "
    "redis-server`; the Makefile's test target does this) or point "
    f"{REDIS_URL_ENV} at a reachable server, e.g. redis://127.0.0.1:6379/15"
)


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis server at `url` answers PING within `timeout` seconds."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def free_tcp_port() -> int:
    """A loopback port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_redis_server(binary: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a private redis-server; retry on another port if the chosen one was taken."""
    for _ in range(3):
        port = free_tcp_port()
        url = f"redis://127.0.0.1:{port}/0"
        log = workdir / f"redis-{port}.log"
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--logfile", str(log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            if redis_answers(url, timeout=0.2):
                return process, url
            time.sleep(0.02)
        _stop(process)
    log_text = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise RuntimeError(f"could not start a private redis-server; last log:\n{log_text}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real Redis server for this test session (see the module docstring)."""
    configured = os.environ.get(REDIS_URL_ENV)
    if configured:
        if redis_answers(configured):
            yield configured
            return
        warnings.warn(
            f"{REDIS_URL_ENV} is set but does not answer PING; starting a private redis-server",
            stacklevel=1,
        )
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    process, url = _start_redis_server(binary, tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        _stop(process)


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix owned by one test; its keys are deleted when the test ends."""
    import redis

    prefix = f"nstest-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def unused_redis_url() -> str:
    """A Redis URL on a loopback port where nothing listens (for unavailability tests)."""
    return f"redis://127.0.0.1:{free_tcp_port()}/0"
