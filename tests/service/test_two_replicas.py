"""Two `neuroserve serve` processes sharing one Redis: any replica continues any session.

A session whose chunks alternate between the replicas answers exactly like one uninterrupted
run, and a replica killed with SIGKILL mid-session (even mid-request) loses nothing that was
acknowledged: the other continues with the right step count and outputs.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch

from models.repository import ModelRepository
from tests.service.test_cli import COMMAND, cli_env
from tests.service.test_sessions_http import digit_chunks, reference_logits

START_TIMEOUT_S = 60.0


class Replica:
    """One `neuroserve serve` subprocess on a free loopback port, logging to a file."""

    def __init__(self, name: str, log_dir: Path, repository: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [*COMMAND, "serve", "--port", "0", "--repository", str(repository)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=cli_env(**env),
        )
        self.url = self._wait_until_ready()

    def _wait_until_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        url = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"replica {self.name} exited:\n{self.log_path.read_text()}")
            if url is None:
                match = re.search(
                    r"Uvicorn running on (http://[\d.]+:\d+)", self.log_path.read_text()
                )
                url = match.group(1) if match else None
            elif httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return url
            time.sleep(0.05)
        pytest.fail(f"replica {self.name} was not ready in time:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, no flushing, like a crashed pod."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class Replicas:
    """Two replicas sharing one Redis key prefix; `pair()` restarts any that was killed."""

    def __init__(self, log_dir: Path, repository: Path, env: dict[str, str]) -> None:
        self.log_dir, self.repository, self.env = log_dir, repository, env
        self.replicas: dict[str, Replica] = {}

    def pair(self) -> tuple[Replica, Replica]:
        for name in ("a", "b"):
            replica = self.replicas.get(name)
            if replica is None or replica.process.poll() is not None:
                if replica is not None:
                    replica.stop()
                self.replicas[name] = Replica(name, self.log_dir, self.repository, self.env)
        return self.replicas["a"], self.replicas["b"]

    def stop(self) -> None:
        for replica in self.replicas.values():
            replica.stop()


@pytest.fixture(scope="module")
def replicas(
    test_repository: ModelRepository, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    prefix = f"nstest-{uuid.uuid4().hex[:12]}"
    env = {
        "NEUROSERVE_REDIS_URL": redis_url,
        "NEUROSERVE_STATE_STORE_PREFIX": prefix,
        "NEUROSERVE_ALLOW_UNCALIBRATED": "true",
        "NEUROSERVE_LOG_LEVEL": "info",
    }
    group = Replicas(tmp_path_factory.mktemp("replicas"), test_repository.root, env)
    try:
        yield group
    finally:
        group.stop()
        client = redis.Redis.from_url(redis_url, socket_timeout=5)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def step(url: str, session_id: str, chunk: list, timeout: float = 30) -> dict[str, Any]:
    response = httpx.post(
        f"{url}/v1/sessions/{session_id}/step",
        json={"inputs": chunk, "return_steps": True},
        timeout=timeout,
    )
    assert response.status_code == 200, response.text
    return response.json()


def create(url: str) -> str:
    response = httpx.post(f"{url}/v1/sessions", json={"model": "tiny-digits"}, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()["session_id"]


def step_probabilities(answer: dict[str, Any]) -> list[list[float]]:
    return [prediction["probabilities"] for prediction in answer["step_predictions"]]


def assert_reference(answer: dict[str, Any], logits: torch.Tensor) -> None:
    """The answer's per-step probabilities against the local reference logits [T, C]."""
    want = torch.softmax(logits.double(), dim=-1)
    got = torch.tensor(step_probabilities(answer), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_alternating_replicas_answer_exactly_like_one_uninterrupted_run(
    replicas: Replicas, test_repository: ModelRepository
) -> None:
    a, b = replicas.pair()
    chunks = digit_chunks([2, 1, 3, 1, 2, 4], seed=21)
    straight_id, alternating_id = create(a.url), create(b.url)
    total = 0
    reference = reference_logits(test_repository, "tiny-digits", chunks)
    for i, (chunk, want) in enumerate(zip(chunks, reference, strict=True)):
        straight = step(a.url, straight_id, chunk)
        alternating = step((a, b)[i % 2].url, alternating_id, chunk)
        total += len(chunk)
        assert straight["step"] == alternating["step"] == total
        # The same float32 arithmetic on the same state, wherever it ran: bit for bit.
        assert step_probabilities(alternating) == step_probabilities(straight)
        assert_reference(alternating, want)


def test_a_replica_killed_mid_session_loses_nothing(
    replicas: Replicas, test_repository: ModelRepository
) -> None:
    a, b = replicas.pair()
    chunks = digit_chunks([2, 1, 3, 2, 1, 2, 3], seed=22)
    session_id = create(a.url)
    acknowledged = 0
    for i in range(3):  # a, b, a: every step acknowledged
        acknowledged = step((a, b)[i % 2].url, session_id, chunks[i])["step"]
    assert acknowledged == sum(len(chunk) for chunk in chunks[:3])

    # Send the next chunk to `a` and kill it while the request may still be in flight: the
    # step is atomic, so it either landed completely or not at all.
    in_flight = threading.Thread(
        target=lambda: _ignore_errors(step, a.url, session_id, chunks[3], 5), daemon=True
    )
    in_flight.start()
    time.sleep(0.005)
    a.kill()
    in_flight.join(timeout=10)

    now = httpx.get(f"{b.url}/v1/sessions/{session_id}", timeout=30).json()["step"]
    assert now in (acknowledged, acknowledged + len(chunks[3]))
    committed = chunks[:4] if now > acknowledged else chunks[:3]
    remaining = chunks[len(committed) :]
    reference = reference_logits(test_repository, "tiny-digits", committed + remaining)
    total = now
    for chunk, want in zip(remaining, reference[len(committed) :], strict=True):
        answer = step(b.url, session_id, chunk)
        total += len(chunk)
        assert answer["step"] == total
        assert_reference(answer, want)
    assert total == sum(len(chunk) for chunk in committed + remaining)


def _ignore_errors(function: Any, *args: Any) -> None:
    # The replica may die under the request: whether it committed is checked by the caller.
    with contextlib.suppress(httpx.HTTPError, AssertionError):
        function(*args)
