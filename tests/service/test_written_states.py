"""The states a replica last wrote (`service.sessions.written`): private copies, bounded by
bytes, and a step that starts from one is still checked by the store's compare-and-set.

The plane-level tests run two session managers (two replicas) over one Redis: a session
written by the other replica, or deleted and created again under the same id there, is
never overwritten from the stale copy; its step runs again on the stored state.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from models.repository import ModelRepository
from service.sessions.plane import SessionManager, SessionSettings
from service.sessions.written import WrittenStates
from service.state.codec import StateRecord
from service.state.factory import open_state_store
from tests.service.test_session_concurrency import assert_matches_reference
from tests.service.test_sessions_http import digit_chunks, raw_softmax_dataplane, reference_logits


def record_of(batch: torch.Tensor) -> StateRecord:
    return StateRecord.new({"h": batch}, model="m", version="1", backend="torch", now=1.0)


def test_an_entry_is_a_private_copy_at_its_version() -> None:
    batched = torch.arange(8, dtype=torch.float32).reshape(4, 2)  # a batch's new states
    record = record_of(batched[1:2])  # one session's rows: a view into the batch
    written = WrittenStates(max_bytes=1 << 20)
    written.put("k", record, 41)
    batched.zero_()
    cached = written.get("k")
    assert cached.version == 41
    assert cached.record.tensors["h"].tolist() == [[2.0, 3.0]]
    assert cached.record.tensors["h"].untyped_storage().nbytes() == 8  # not the whole batch
    assert (cached.record.step, cached.record.signature) == (record.step, record.signature)
    assert written.get("other") is None


def test_entries_are_bounded_by_bytes_oldest_written_out_first() -> None:
    row = torch.zeros(1, 16)  # 64 bytes
    written = WrittenStates(max_bytes=3 * 64)
    for index in range(3):
        written.put(f"k{index}", record_of(row), index + 1)
    written.put("k0", record_of(row), 9)  # re-written: now the newest
    written.put("k3", record_of(row), 4)
    assert [written.get(f"k{i}") is not None for i in range(4)] == [True, False, True, True]
    assert (len(written), written.bytes) == (3, 3 * 64)
    written.drop("k0")
    written.drop("never")
    assert (len(written), written.bytes) == (2, 2 * 64)
    written.put("huge", record_of(torch.zeros(1, 64)), 1)  # larger than the whole budget
    assert written.get("huge") is None and len(written) == 2
    nothing = WrittenStates(max_bytes=0)
    nothing.put("k", record_of(row), 1)
    assert len(nothing) == 0
    with pytest.raises(ValueError, match="max_bytes must be a non-negative integer"):
        WrittenStates(max_bytes=-1)


def managers(
    repository: ModelRepository, redis_url: str, prefix: str, cache_bytes: int = 64 << 20
) -> list[SessionManager]:
    settings = SessionSettings(written_cache_bytes=cache_bytes)
    return [
        SessionManager(
            open_state_store(redis_url, prefix=prefix), raw_softmax_dataplane(repository), settings
        )
        for _ in range(2)
    ]


async def close(*sessions: SessionManager) -> None:
    for manager in sessions:
        await manager.close()
        await manager.store.close()


def test_a_step_after_another_replica_wrote_runs_on_the_stored_state(
    test_repository: ModelRepository, redis_url: str, redis_prefix: str
) -> None:
    chunks = digit_chunks([1, 1, 1, 1], seed=5)
    reference = reference_logits(test_repository, "tiny-digits", chunks)

    async def scenario() -> None:
        a, b = managers(test_repository, redis_url, redis_prefix)
        session_id = (await a.create(model="tiny-digits")).session_id
        for i, (chunk, want) in enumerate(zip(chunks, reference, strict=True)):
            # a steps from its own writes; b's writes make a's copy stale every other step.
            outcome = await (a if i % 3 != 1 else b).step(session_id, torch.tensor(chunk))
            assert outcome.info.step == i + 1
            assert_matches_reference(torch.softmax(outcome.logits.double(), -1).tolist(), want[-1])
        assert a.conflicts == 1  # step 3 on a lost its compare-and-set once, then ran again
        assert (await b.get(session_id)).step == len(chunks)
        await close(a, b)

    asyncio.run(scenario())


def test_a_session_created_again_under_its_id_is_never_overwritten_from_the_old_copy(
    test_repository: ModelRepository, redis_url: str, redis_prefix: str
) -> None:
    old, new, then = (torch.tensor(row) for row in digit_chunks([1, 1, 1], seed=6))
    want = reference_logits(test_repository, "tiny-digits", [new.tolist(), then.tolist()])[1][-1]

    async def scenario() -> None:
        a, b = managers(test_repository, redis_url, redis_prefix)
        for _ in range(3):
            await a.create(model="tiny-digits", session_id="given", owner="o")
            await a.step("given", old, owner="o")  # a holds its write after one step
            await b.delete("given", owner="o")
            await b.create(model="tiny-digits", session_id="given", owner="o")
            await b.step("given", new, owner="o")  # as many writes as a's copy has seen
            outcome = await a.step("given", then, owner="o")
            # The new session's second step, never the old one's continued from a's copy.
            assert outcome.info.step == 2
            probabilities = torch.softmax(outcome.logits.double(), -1).tolist()
            assert_matches_reference(probabilities, want)
            await a.delete("given", owner="o")
        await close(a, b)

    asyncio.run(scenario())


@pytest.mark.parametrize("cache_bytes", [0, 64 << 20], ids=["reading", "from own writes"])
def test_a_replica_reads_its_session_only_when_it_lacks_its_own_write(
    test_repository: ModelRepository, redis_url: str, redis_prefix: str, cache_bytes: int
) -> None:
    (row,) = digit_chunks([1], seed=7)

    async def scenario() -> None:
        a, b = managers(test_repository, redis_url, redis_prefix, cache_bytes)
        session_id = (await a.create(model="tiny-digits")).session_id
        loads = 0
        original = a.store.get_many

        async def counting_get_many(*args, **kwargs):
            nonlocal loads
            loads += 1
            return await original(*args, **kwargs)

        a.store.get_many = counting_get_many  # type: ignore[method-assign]
        for _ in range(5):
            await a.step(session_id, torch.tensor(row))
        assert loads == (5 if cache_bytes == 0 else 0)
        await close(a, b)

    asyncio.run(scenario())
