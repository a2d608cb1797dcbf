"""Top-level fixtures: real Redis servers for the tests that need them.

`redis_url` (session-scoped) is, in order of preference:
1. `NEUROSERVE_TEST_REDIS_URL`, when it is set and answers PING;
2. a private `redis-server` from PATH, started on a free loopback port in a temporary directory
   without persistence, and stopped when the test session ends.
The machine's own 127.0.0.1:6379 is never used implicitly: CI machines may not have one.

`redis_cluster_url` (three masters) and `redis_sentinel_url` (a master and one sentinel) are
always private, built from the same `redis-server` binary, and started only when a test asks.

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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Every server a test starts in this process serves gRPC on a free port (the default, 8001,
# would clash between servers running side by side); a test that needs the port reads it.
os.environ.setdefault("NEUROSERVE_GRPC_PORT", "0")

REDIS_URL_ENV = "NEUROSERVE_TEST_REDIS_URL"
REDIS_START_TIMEOUT_S = 10.0
CLUSTER_SLOTS = 16384
SENTINEL_MASTER_NAME = "neuroserve-test"
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


def free_tcp_port(highest: int = 65535) -> int:
    """A loopback port nothing listens on right now (the OS picks it), at most `highest`."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port <= highest:
            return port


# A cluster node also listens on its port + 10000 (the cluster bus): Redis refuses ports above.
CLUSTER_PORT_MAX = 55535


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {REDIS_START_TIMEOUT_S}s waiting for {what}")


class RedisProcesses:
    """Private redis-server processes in one directory; `stop_all` ends every one of them."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(INSTALL_HINT, pytrace=False)
        self.binary = binary
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, config_text: str | None = None) -> int:
        """Start one server (or sentinel, via `config_text`) on a free port; its port.

        Retries on another port if the chosen one was taken in the meantime.
        """
        highest = CLUSTER_PORT_MAX if "--cluster-enabled" in args else 65535
        for _ in range(3):
            port = free_tcp_port(highest)
            log = self.workdir / f"redis-{port}.log"
            command = [self.binary]
            if config_text is not None:  # sentinels need a writable config file
                config = self.workdir / f"redis-{port}.conf"
                config.write_text(config_text)
                command.append(str(config))
            command += ["--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(log),
                        *args]  # fmt: skip
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            self.processes.append(process)
            url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + REDIS_START_TIMEOUT_S
            while time.monotonic() < deadline and process.poll() is None:
                if redis_answers(url, timeout=0.2):
                    return port
                time.sleep(0.02)
            _stop(process)
        log_text = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
        raise RuntimeError(f"could not start a private redis-server; last log:\n{log_text}")

    def stop_all(self) -> None:
        for process in self.processes:
            _stop(process)


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
    servers = RedisProcesses(tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{servers.start()}/0"
    finally:
        servers.stop_all()


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private three-master Redis Cluster, as a `redis+cluster://` URL."""
    import redis

    servers = RedisProcesses(tmp_path_factory.mktemp("redis-cluster"))
    try:
        ports = [
            servers.start("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{i}.conf")
            for i in range(3)
        ]
        clients = [redis.Redis(port=port, socket_timeout=5) for port in ports]
        bounds = [CLUSTER_SLOTS * i // len(ports) for i in range(len(ports) + 1)]
        for client, low, high in zip(clients, bounds[:-1], bounds[1:], strict=True):
            client.execute_command("CLUSTER ADDSLOTS", *range(low, high))
        for port in ports[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)

        def settled() -> bool:
            infos = [client.cluster("INFO") for client in clients]
            return all(
                info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == len(ports)
                for info in infos
            )

        wait_until(settled, "the test cluster to agree on its slots")
        for client in clients:
            client.close()
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports)
    finally:
        servers.stop_all()


@pytest.fixture(scope="session")
def redis_sentinel_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private master watched by one sentinel, as a `redis+sentinel://` URL."""
    import redis

    servers = RedisProcesses(tmp_path_factory.mktemp("redis-sentinel"))
    try:
        master_port = servers.start()
        config = f"sentinel monitor {SENTINEL_MASTER_NAME} 127.0.0.1 {master_port} 1\n"
        sentinel_port = servers.start("--sentinel", config_text=config)
        sentinel = redis.Redis(port=sentinel_port, socket_timeout=5)
        wait_until(
            lambda: sentinel.sentinel_get_master_addr_by_name(SENTINEL_MASTER_NAME) is not None,
            "the sentinel to know its master",
        )
        sentinel.close()
        yield f"redis+sentinel://127.0.0.1:{sentinel_port}/{SENTINEL_MASTER_NAME}/0"
    finally:
        servers.stop_all()


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
def unused_tcp_port() -> int:
    """A loopback port where nothing listens (for unavailability tests)."""
    return free_tcp_port()


@pytest.fixture
def unused_redis_url(unused_tcp_port: int) -> str:
    """A Redis URL on a loopback port where nothing listens."""
    return f"redis://127.0.0.1:{unused_tcp_port}/0"
