"""Per-key limits with two replicas sharing one Redis (two real uvicorn servers, real Redis):
a key's request rate, live sessions and active jobs are counted once for both, so the limit
holds across them instead of doubling."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from models.repository import ModelRepository
from service.api.auth import hash_key
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import TEST_SETTINGS, running_server
from tests.service.test_finetune_http import shifted_subset_spec

pytestmark = pytest.mark.redis

ALICE, BOB = "alice-key", "bob-key"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def message(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


def replica_pair(
    test_repository: ModelRepository, redis_url: str, prefix: str, **limits: Any
) -> Iterator[tuple[str, str]]:
    settings = Settings(
        model_repository=test_repository.root,
        redis_url=redis_url,
        state_store_prefix=prefix,
        job_queue_name=f"{prefix}-jobs",  # no worker: jobs stay queued
        admin_api_keys=[f"alice:{hash_key(ALICE)}", f"bob:{hash_key(BOB)}"],
        **{**TEST_SETTINGS, **limits},
    )
    with ExitStack() as stack:
        yield tuple(stack.enter_context(running_server(create_app(settings))) for _ in range(2))


@pytest.fixture
def replicas(test_repository, redis_url, redis_prefix) -> Iterator[tuple[str, str]]:
    yield from replica_pair(
        test_repository,
        redis_url,
        redis_prefix,
        max_sessions_per_key=2,
        max_jobs_per_key=1,
        max_request_bytes=4 * 1024 * 1024,
    )


def test_a_key_s_session_limit_holds_across_replicas(replicas) -> None:
    a, b = replicas
    create = {"model": "tiny-digits"}
    first = httpx.post(f"{a}/v1/sessions", json=create, headers=bearer(ALICE), timeout=30)
    second = httpx.post(f"{b}/v1/sessions", json=create, headers=bearer(ALICE), timeout=30)
    assert first.status_code == second.status_code == 201
    for url in (a, b):
        refused = httpx.post(f"{url}/v1/sessions", json=create, headers=bearer(ALICE), timeout=30)
        assert refused.status_code == 429, refused.text
        assert "limit of 2 live sessions across all replicas" in message(refused)
    # another key has its own allowance; ending a session (on the other replica) frees one
    bob = httpx.post(f"{a}/v1/sessions", json=create, headers=bearer(BOB), timeout=30)
    assert bob.status_code == 201
    ended = httpx.delete(
        f"{b}/v1/sessions/{first.json()['session_id']}", headers=bearer(ALICE), timeout=30
    )
    assert ended.status_code == 204
    again = httpx.post(f"{a}/v1/sessions", json=create, headers=bearer(ALICE), timeout=30)
    assert again.status_code == 201, again.text


def test_a_key_s_job_limit_holds_across_replicas(replicas) -> None:
    a, b = replicas
    spec = shifted_subset_spec("tiny-digits", n=60)
    queued = httpx.post(f"{a}/v1/finetune/jobs", json=spec, headers=bearer(ALICE), timeout=60)
    assert queued.status_code == 202, queued.text
    refused = httpx.post(f"{b}/v1/finetune/jobs", json=spec, headers=bearer(ALICE), timeout=60)
    assert refused.status_code == 429
    assert "limit of 1 queued or running jobs across all replicas" in message(refused)
    job_id = queued.json()["job_id"]
    cancelled = httpx.delete(f"{a}/v1/finetune/jobs/{job_id}", headers=bearer(ALICE), timeout=60)
    assert cancelled.json()["status"] == "cancelled"
    accepted = httpx.post(f"{b}/v1/finetune/jobs", json=spec, headers=bearer(ALICE), timeout=60)
    assert accepted.status_code == 202, accepted.text
    httpx.delete(
        f"{b}/v1/finetune/jobs/{accepted.json()['job_id']}", headers=bearer(ALICE), timeout=60
    )


def test_a_key_s_request_rate_holds_across_replicas(
    test_repository, redis_url, redis_prefix
) -> None:
    for a, b in replica_pair(
        test_repository, redis_url, redis_prefix, rate_limit_per_second=0.2, rate_limit_burst=4
    ):
        codes = [
            httpx.get(f"{url}/v1/models", headers=bearer(ALICE), timeout=30).status_code
            for url in (a, b, a, b, a, b)
        ]
        # one bucket of 4 for both replicas (each alone would have allowed all six)
        assert codes == [200, 200, 200, 200, 429, 429]
        assert httpx.get(f"{b}/v1/models", headers=bearer(BOB), timeout=30).status_code == 200
