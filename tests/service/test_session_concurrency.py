"""Concurrency with batching on: many steps on one session lose nothing and apply in arrival
order, many sessions at once each get exactly their own sequential answer, and two managers
writing one session through one Redis never lose an update."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import torch

from models.repository import ModelRepository
from service.app import create_app
from service.sessions.plane import SessionManager
from service.sessions.types import StepOutcome
from service.settings import Settings
from service.state.factory import open_state_store
from tests.service.conftest import TEST_SETTINGS
from tests.service.test_sessions_http import digit_chunks, raw_softmax_dataplane, reference_logits

# Batched runs re-order float32 sums inside matrix products, moving a logit z by at most a
# few ulps of max|z| (tests/service/test_batching.py: ULPS = 16). Softmax moves by
# |dp_i| = p_i |dz_i - sum_j p_j dz_j| <= 2 max|dz|, so probabilities agree to 2 * that.
ULPS = 16


def assert_matches_reference(probabilities: list[float], logits: torch.Tensor) -> None:
    """`probabilities` (from the server) against the softmax of reference logits [C]."""
    scale = max(1.0, float(logits.abs().max()))
    tolerance = 2 * ULPS * torch.finfo(torch.float32).eps * scale
    want = torch.softmax(logits.double(), dim=-1)
    torch.testing.assert_close(
        torch.tensor(probabilities, dtype=torch.float64), want, rtol=0, atol=tolerance
    )


@pytest.fixture(params=["memory", "redis"])
def store_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings of the state store: the embedded one, or the test Redis."""
    if request.param == "memory":
        return {}
    return {
        "redis_url": request.getfixturevalue("redis_url"),
        "state_store_prefix": request.getfixturevalue("redis_prefix"),
    }


@contextmanager
def serve(
    factory: Callable[..., Any], repository: ModelRepository, **settings: Any
) -> Iterator[str]:
    """A real server with batching on (5 ms window) over `repository`."""
    options = {**TEST_SETTINGS, "batching": True, "batch_window_ms": 5.0, **settings}
    app = create_app(Settings(model_repository=repository.root, **options))
    with factory(app) as base_url:
        yield base_url


async def post_json(client: httpx.AsyncClient, path: str, body: dict) -> dict[str, Any]:
    response = await client.post(path, json=body)
    assert response.status_code in (200, 201), response.text
    return response.json()


def test_fifty_concurrent_steps_on_one_session_lose_nothing(
    test_repository: ModelRepository,
    redis_url: str,
    redis_prefix: str,
    server_factory: Callable[..., Any],
) -> None:
    """Every step is the same row, so whatever order they apply in, the answer after the k-th
    is the reference after k rows; each of 1..50 must be seen exactly once."""
    (row,) = digit_chunks([1], seed=4)
    reference = reference_logits(test_repository, "tiny-digits", [row] * 50)  # 50 x [1, C]

    async def scenario(base_url: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            created = await post_json(client, "/v1/sessions", {"model": "tiny-digits"})
            path = f"/v1/sessions/{created['session_id']}/step"
            answers = await asyncio.gather(
                *(post_json(client, path, {"inputs": row}) for _ in range(50))
            )
            info = (await client.get(f"/v1/sessions/{created['session_id']}")).json()
            assert info["step"] == 50
            return list(answers)

    store = {"redis_url": redis_url, "state_store_prefix": redis_prefix}
    with serve(server_factory, test_repository, **store) as base_url:
        answers = asyncio.run(scenario(base_url))
    assert sorted(answer["step"] for answer in answers) == list(range(1, 51))
    for answer in answers:
        assert_matches_reference(
            answer["prediction"]["probabilities"], reference[answer["step"] - 1][-1]
        )


def test_two_hundred_sessions_stepping_at_once_each_get_their_own_answers(
    test_repository: ModelRepository,
    store_settings: dict[str, Any],
    server_factory: Callable[..., Any],
) -> None:
    sessions = 200
    plans = [
        digit_chunks([1 + (i + c) % 3 for c in range(2)], seed=100 + i) for i in range(sessions)
    ]
    references = [reference_logits(test_repository, "tiny-digits", plan) for plan in plans]

    async def run_session(client: httpx.AsyncClient, plan: list) -> list[dict[str, Any]]:
        created = await post_json(client, "/v1/sessions", {"model": "tiny-digits"})
        path = f"/v1/sessions/{created['session_id']}/step"
        return [await post_json(client, path, {"inputs": chunk}) for chunk in plan]

    async def scenario(base_url: str) -> list[list[dict[str, Any]]]:
        # Idle connections are dropped after 2 s, before the server's 5 s keep-alive ends them:
        # a request sent on a connection the server is closing would fail with ReadError.
        limits = httpx.Limits(max_connections=sessions, keepalive_expiry=2.0)
        async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
            return list(await asyncio.gather(*(run_session(client, plan) for plan in plans)))

    with serve(server_factory, test_repository, **store_settings) as base_url:
        results = asyncio.run(scenario(base_url))
    batch_sizes = []
    for plan, answers, reference in zip(plans, results, references, strict=True):
        total = 0
        for chunk, answer, want in zip(plan, answers, reference, strict=True):
            total += len(chunk)
            assert answer["step"] == total
            assert_matches_reference(answer["prediction"]["probabilities"], want[-1])
            batch_sizes.append(answer["usage"]["batch_size"])
    assert max(batch_sizes) > 1, "no step was batched with another"


def test_two_managers_on_one_redis_never_lose_an_update(
    test_repository: ModelRepository, redis_url: str, redis_prefix: str
) -> None:
    """Two replicas' managers step one session at once: their writes race on the store's
    version, and the losers reload and re-apply, so all 50 steps land, each exactly once."""
    (row,) = digit_chunks([1], seed=9)
    reference = reference_logits(test_repository, "tiny-digits", [row] * 50)
    x = torch.tensor(row)  # [1, F]

    async def scenario() -> tuple[list[int], list[list[float]], int, int]:
        managers = []
        for _ in range(2):
            store = open_state_store(redis_url, prefix=redis_prefix)
            dataplane = raw_softmax_dataplane(test_repository)
            managers.append(SessionManager(store, dataplane))
        created = await managers[0].create(model="tiny-digits")
        outcomes = await asyncio.gather(
            *(managers[i % 2].step(created.session_id, x) for i in range(50))
        )
        final = (await managers[1].get(created.session_id)).step
        conflicts = sum(manager.conflicts for manager in managers)
        for manager in managers:
            await manager.close()
            await manager.store.close()
        steps = [outcome.info.step for outcome in outcomes]
        probabilities = [torch.softmax(o.logits.double(), -1).tolist() for o in outcomes]
        return steps, probabilities, final, conflicts

    steps, probabilities, final, conflicts = asyncio.run(scenario())
    assert final == 50
    assert sorted(steps) == list(range(1, 51))
    assert conflicts > 0, "the two managers never raced; the test did not exercise retries"
    for step, probs in zip(steps, probabilities, strict=True):
        assert_matches_reference(probs, reference[step - 1][-1])


def test_steps_on_one_session_apply_in_arrival_order(test_repository: ModelRepository) -> None:
    """Twenty different chunks sent at once to one session: each lands in the order it was
    sent, so the i-th answer is the reference after the first i chunks."""
    chunks = digit_chunks([1 + i % 3 for i in range(20)], seed=31)
    reference = reference_logits(test_repository, "tiny-digits", chunks)

    async def scenario() -> list[StepOutcome]:
        store = open_state_store(None)
        manager = SessionManager(store, raw_softmax_dataplane(test_repository))
        session_id = (await manager.create(model="tiny-digits")).session_id
        tasks = [
            asyncio.ensure_future(manager.step(session_id, torch.tensor(chunk))) for chunk in chunks
        ]
        outcomes = await asyncio.gather(*tasks)
        assert len(manager._locks) == 0  # the per-session lock is dropped when idle
        await manager.close()
        return list(outcomes)

    outcomes = asyncio.run(scenario())
    total = 0
    for chunk, outcome, want in zip(chunks, outcomes, reference, strict=True):
        total += len(chunk)
        assert outcome.info.step == total
        probabilities = torch.softmax(outcome.logits.double(), -1).tolist()
        assert_matches_reference(probabilities, want[-1])
