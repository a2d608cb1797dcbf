"""One contract, run against every state store: in-process and a real Redis server.

The Redis variant uses the `redis_url` fixture (tests/conftest.py), which starts a private
redis-server when no test server is configured; each test gets its own key prefix.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis
import torch
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from service.state import store as store_module
from service.state.codec import (
    CorruptStateError,
    IncompatibleStateError,
    StateRecord,
    StateSignature,
    encode_state,
)
from service.state.factory import open_state_store
from service.state.memory_store import InMemoryStateStore
from service.state.redis_connection import ConnectionOptions, connect, parse_redis_url, redact_url
from service.state.redis_store import RedisStateStore
from service.state.store import (
    FIRST_VERSION_SPAN,
    CasWrite,
    StaleVersionError,
    StateExistsError,
    StateNotFoundError,
    StateStore,
    StateStoreUnavailableError,
)

pytestmark = pytest.mark.anyio

SIGNATURE = StateSignature.of(
    {"count": torch.zeros(1, 1, dtype=torch.int64), "h": torch.zeros(1, 4)},
    model="counter",
    version="1",
    backend="torch",
)
LONG_TTL = 60.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
        pytest.param("redis-sentinel", marks=pytest.mark.redis),
    ]
)
def store_factory(request: pytest.FixtureRequest) -> Callable[[], StateStore]:
    """Makes stores that share one backing store (the same dict, or the same Redis prefix)."""
    if request.param == "memory":
        shared = InMemoryStateStore(prefix="nstest")
        return lambda: shared
    if request.param == "redis":
        url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
    else:  # private servers, gone after the session: a fresh prefix suffices
        url = request.getfixturevalue(request.param.replace("-", "_") + "_url")
        prefix = f"nstest-{uuid.uuid4().hex[:12]}"
    return lambda: RedisStateStore.from_url(url, prefix=prefix)


@pytest.fixture
async def store(store_factory: Callable[[], StateStore]) -> AsyncIterator[StateStore]:
    async with store_factory() as opened:
        yield opened


def counter_record(count: int = 0, seed: int = 0) -> StateRecord:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "count": torch.tensor([[count]], dtype=torch.int64),  # [B=1, 1]
        "h": torch.randn(1, 4, generator=generator),  # [B=1, 4]
    }
    return StateRecord.new(
        tensors, model="counter", version="1", backend="torch", metadata={"alpha": 0.1}
    )


def increment(record: StateRecord) -> StateRecord:
    count = record.tensors["count"]
    return record.advance({**record.tensors, "count": count + 1}, 1)


def count_of(record: StateRecord) -> int:
    return int(record.tensors["count"].item())


# --- create / get / delete / touch --------------------------------------------------------


async def test_create_then_get_returns_the_exact_record_at_its_first_version(
    store: StateStore,
) -> None:
    record = counter_record(count=7, seed=3)
    created = await store.create("s1", record, LONG_TTL)

    loaded, version = await store.get("s1", expected=SIGNATURE)

    assert 1 <= created <= FIRST_VERSION_SPAN and version == created
    for name, tensor in record.tensors.items():
        assert loaded.tensors[name].view(torch.uint8).equal(tensor.view(torch.uint8)), name
    assert loaded.signature == record.signature
    assert (loaded.step, loaded.metadata, loaded.created_at) == (
        0,
        {"alpha": 0.1},
        record.created_at,
    )
    assert await store.get("never-created") is None


async def test_create_refuses_an_existing_session(store: StateStore) -> None:
    created = await store.create("s1", counter_record(1), LONG_TTL)
    with pytest.raises(StateExistsError, match="'s1' already exists"):
        await store.create("s1", counter_record(2), LONG_TTL)
    loaded, version = await store.get("s1")
    assert (count_of(loaded), version) == (1, created)


async def test_delete_removes_a_session_once(store: StateStore) -> None:
    await store.create("s1", counter_record(), LONG_TTL)
    assert await store.delete("s1") is True
    assert await store.delete("s1") is False
    assert await store.get("s1") is None
    await store.create("s1", counter_record(), LONG_TTL)  # the id is free again
    assert await store.get("s1") is not None


async def test_a_re_created_session_does_not_repeat_the_versions_before(store: StateStore) -> None:
    """A replica that continues a session from its own last write relies on this: after a
    delete and a create under the same id, the old version no longer matches."""
    first = await store.create("s1", counter_record(0), LONG_TTL)
    assert await store.compare_and_set("s1", counter_record(1), first, LONG_TTL) == first + 1
    await store.delete("s1")
    second = await store.create("s1", counter_record(0), LONG_TTL)
    assert second not in (first, first + 1)  # fails by chance about once in 2**47 runs
    with pytest.raises(StaleVersionError):
        await store.compare_and_set("s1", counter_record(2), first + 1, LONG_TTL)
    firsts = {await store.create(f"n{index}", counter_record(0), LONG_TTL) for index in range(64)}
    assert len(firsts) == 64 and all(1 <= version <= FIRST_VERSION_SPAN for version in firsts)


async def test_get_refuses_state_of_another_model_version(store: StateStore) -> None:
    await store.create("s1", counter_record(), LONG_TTL)
    newer = StateSignature("counter", "2", "torch", SIGNATURE.schema_hash)
    with pytest.raises(IncompatibleStateError, match="version '1' \\(expected '2'\\)"):
        await store.get("s1", expected=newer)


async def test_corrupted_blob_is_refused(store: StateStore) -> None:
    blob = bytearray(encode_state(counter_record()))
    blob[len(blob) // 2] ^= 0x10
    assert await store._create_raw(store.session_key("bad"), bytes(blob), 60_000, 1)
    with pytest.raises(CorruptStateError, match="checksum"):
        await store.get("bad")
    with pytest.raises(CorruptStateError):
        await store.update("bad", increment, LONG_TTL)


# --- compare-and-set ----------------------------------------------------------------------


async def test_compare_and_set_advances_the_version(store: StateStore) -> None:
    v = await store.create("s1", counter_record(0), LONG_TTL)
    assert await store.compare_and_set("s1", counter_record(1), v, LONG_TTL) == v + 1
    assert await store.compare_and_set("s1", counter_record(2), v + 1, LONG_TTL) == v + 2
    loaded, version = await store.get("s1")
    assert (count_of(loaded), version) == (2, v + 2)


async def test_versions_stay_exact_at_the_top_of_the_first_version_span(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis compares versions as Lua numbers (doubles): still exact this high up.
    monkeypatch.setattr(store_module, "first_version", lambda: FIRST_VERSION_SPAN)
    v = await store.create("s1", counter_record(0), LONG_TTL)
    assert v == FIRST_VERSION_SPAN
    for step in range(1, 4):
        assert await store.compare_and_set("s1", counter_record(step), v, LONG_TTL) == v + 1
        v += 1
    with pytest.raises(StaleVersionError):
        await store.compare_and_set("s1", counter_record(9), v - 1, LONG_TTL)
    assert (await store.get("s1")).version == FIRST_VERSION_SPAN + 3


async def test_compare_and_set_detects_a_concurrent_write(store: StateStore) -> None:
    await store.create("s1", counter_record(0), LONG_TTL)
    first, version = await store.get("s1")
    second, _ = await store.get("s1")
    await store.compare_and_set("s1", increment(first), version, LONG_TTL)
    with pytest.raises(StaleVersionError, match=f"at version {version + 1}, not {version}"):
        await store.compare_and_set("s1", increment(second), version, LONG_TTL)
    loaded, now = await store.get("s1")
    assert (count_of(loaded), now) == (1, version + 1)  # the losing write left no trace


async def test_compare_and_set_never_resurrects_a_deleted_session(store: StateStore) -> None:
    version = await store.create("s1", counter_record(), LONG_TTL)
    await store.delete("s1")
    with pytest.raises(StateNotFoundError, match="'s1' not found"):
        await store.compare_and_set("s1", counter_record(), version, LONG_TTL)
    assert await store.get("s1") is None


# --- TTL ----------------------------------------------------------------------------------


async def test_session_expires_after_its_ttl(store: StateStore) -> None:
    version = await store.create("s1", counter_record(), 0.3)
    assert await store.get("s1") is not None
    await asyncio.sleep(0.45)
    assert await store.get("s1") is None
    assert await store.touch("s1", LONG_TTL) is False
    with pytest.raises(StateNotFoundError):
        await store.compare_and_set("s1", counter_record(), version, LONG_TTL)


async def test_every_write_and_touch_restarts_the_ttl(store: StateStore) -> None:
    written = await store.create("written", counter_record(), 0.4)
    await store.create("touched", counter_record(), 0.4)
    await store.create("read", counter_record(), 0.4)
    await store.create("idle", counter_record(), 0.4)
    await asyncio.sleep(0.25)
    await store.compare_and_set("written", counter_record(1), written, 0.4)
    assert await store.touch("touched", 0.4) is True
    await store.get("read", touch_ttl=0.4)
    await asyncio.sleep(0.25)  # 0.5 s after creation, 0.25 s after the refresh
    assert await store.get("idle") is None
    for session_id in ("written", "touched", "read"):
        assert await store.get(session_id) is not None, session_id


# --- update under contention --------------------------------------------------------------


async def test_update_applies_the_function_and_bumps_the_version(store: StateStore) -> None:
    first = await store.create("s1", counter_record(0), LONG_TTL)
    record, version = await store.update("s1", increment, LONG_TTL, expected=SIGNATURE)
    assert (count_of(record), record.step, version) == (1, 1, first + 1)
    with pytest.raises(StateNotFoundError):
        await store.update("missing", increment, LONG_TTL)


async def test_update_loses_nothing_under_50_concurrent_tasks(store: StateStore) -> None:
    first = await store.create("s1", counter_record(0), LONG_TTL)
    calls = 0

    async def slow_increment(record: StateRecord) -> StateRecord:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)  # let the other tasks read the same version meanwhile
        return increment(record)

    await asyncio.gather(
        *(store.update("s1", slow_increment, LONG_TTL, retries=200) for _ in range(50))
    )

    record, version = await store.get("s1")
    assert (count_of(record), record.step, version) == (50, 50, first + 50)
    assert calls > 50  # conflicts really happened and were retried


async def test_update_gives_up_after_the_retry_budget(store: StateStore) -> None:
    await store.create("s1", counter_record(0), LONG_TTL)

    async def meddling_increment(record: StateRecord) -> StateRecord:
        # Someone else writes between our read and our write, every time.
        await store.update("s1", increment, LONG_TTL)
        return increment(record)

    with pytest.raises(StaleVersionError, match="gave up after 3 attempts"):
        await store.update("s1", meddling_increment, LONG_TTL, retries=2)
    record, _ = await store.get("s1")
    assert count_of(record) == 3  # only the three meddling writes landed


def _increment_in_thread(make_store: Callable[[], StateStore], times: int) -> None:
    async def run() -> None:
        # Each thread has its own loop, so its own Redis connections; the in-process store
        # is one shared object (closing it is a no-op).
        async with make_store() as own:
            for _ in range(times):
                await own.update("shared", increment, LONG_TTL, retries=500)

    asyncio.run(run())


async def test_update_loses_nothing_across_threads_with_their_own_loops(
    store: StateStore, store_factory: Callable[[], StateStore]
) -> None:
    first = await store.create("shared", counter_record(0), LONG_TTL)
    threads = [
        threading.Thread(target=_increment_in_thread, args=(store_factory, 10)) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for _ in range(10):  # this loop contends too
        await store.update("shared", increment, LONG_TTL, retries=500)
    await asyncio.to_thread(lambda: [thread.join(timeout=60) for thread in threads])

    record, version = await store.get("shared")
    assert (count_of(record), version) == (50, first + 50)


def _increment_in_process(url: str, prefix: str, times: int) -> None:
    async def run() -> None:
        async with RedisStateStore.from_url(url, prefix=prefix, seed=times) as replica:
            for _ in range(times):
                await replica.update("shared", increment, LONG_TTL, retries=500)

    asyncio.run(run())


@pytest.mark.redis
async def test_update_loses_nothing_across_processes(redis_url: str, redis_prefix: str) -> None:
    """Separate processes play separate service replicas sharing one Redis."""
    async with RedisStateStore.from_url(redis_url, prefix=redis_prefix) as store:
        first = await store.create("shared", counter_record(0), LONG_TTL)
        spawn = multiprocessing.get_context("spawn")
        replicas = [
            spawn.Process(target=_increment_in_process, args=(redis_url, redis_prefix, 20))
            for _ in range(2)
        ]
        for replica in replicas:
            replica.start()
        for _ in range(20):
            await store.update("shared", increment, LONG_TTL, retries=500)
        await asyncio.to_thread(lambda: [replica.join(timeout=120) for replica in replicas])

        assert [replica.exitcode for replica in replicas] == [0, 0]
        record, version = await store.get("shared")
        assert (count_of(record), version) == (60, first + 60)


# --- batches ------------------------------------------------------------------------------


async def test_get_many_returns_each_session_in_order(store: StateStore) -> None:
    v = [await store.create(f"s{index}", counter_record(index), LONG_TTL) for index in range(4)]
    await store.compare_and_set("s2", counter_record(20), v[2], LONG_TTL)
    blob = bytearray(encode_state(counter_record()))
    blob[-1] ^= 1
    await store._create_raw(store.session_key("bad"), bytes(blob), 60_000, 1)

    outcomes = await store.get_many(["s3", "missing", "s2", "bad", "s0"], expected=SIGNATURE)

    assert [count_of(o.record) for o in (outcomes[0], outcomes[2], outcomes[4])] == [3, 20, 0]
    assert [outcomes[0].version, outcomes[2].version, outcomes[4].version] == [
        v[3],
        v[2] + 1,
        v[0],
    ]
    assert outcomes[1] is None
    assert isinstance(outcomes[3], CorruptStateError)
    assert await store.get_many([]) == []


async def test_cas_many_applies_each_write_on_its_own(store: StateStore) -> None:
    v = [await store.create(f"s{index}", counter_record(0), LONG_TTL) for index in range(3)]
    await store.compare_and_set("s1", counter_record(5), v[1], LONG_TTL)  # s1 moved on

    outcomes = await store.cas_many(
        [
            CasWrite("s0", counter_record(1), v[0], LONG_TTL),
            CasWrite("s1", counter_record(1), v[1], LONG_TTL),  # stale
            CasWrite("missing", counter_record(1), 1, LONG_TTL),
            CasWrite("s2", counter_record(1), v[2], LONG_TTL),
        ]
    )

    assert outcomes[0] == v[0] + 1 and outcomes[3] == v[2] + 1
    assert isinstance(outcomes[1], StaleVersionError)
    assert isinstance(outcomes[2], StateNotFoundError)
    loads = await store.get_many(["s0", "s1", "s2", "missing"])
    assert [count_of(load.record) for load in loads[:3]] == [1, 5, 1]
    assert loads[3] is None  # a failed write creates nothing
    assert await store.cas_many([]) == []


@pytest.mark.redis
async def test_a_key_of_another_redis_type_fails_alone_in_a_batch(
    redis_url: str, redis_prefix: str
) -> None:
    async with RedisStateStore.from_url(redis_url, prefix=redis_prefix) as store:
        v = [await store.create(f"s{i}", counter_record(i), LONG_TTL) for i in range(2)]
        client = redis.Redis.from_url(redis_url)
        client.set(store.session_key("plain"), b"not a session hash")
        loads = await store.get_many(["s0", "plain", "s1"])
        assert [count_of(loads[0].record), count_of(loads[2].record)] == [0, 1]
        assert isinstance(loads[1], CorruptStateError) and "another Redis type" in str(loads[1])
        outcomes = await store.cas_many(
            [
                CasWrite("s0", counter_record(7), v[0], LONG_TTL),
                CasWrite("plain", counter_record(7), 1, LONG_TTL),
            ]
        )
        assert outcomes[0] == v[0] + 1 and isinstance(outcomes[1], CorruptStateError)
        assert client.get(store.session_key("plain")) == b"not a session hash"
        # A hash whose version is no number is no readable session either, and is left alone.
        client.hset(store.session_key("s1"), "version", "0x2")
        outcomes = await store.cas_many(
            [
                CasWrite("s1", counter_record(8), 2, LONG_TTL),
                CasWrite("s0", counter_record(8), v[0] + 1, LONG_TTL),
            ]
        )
        assert isinstance(outcomes[0], CorruptStateError) and outcomes[1] == v[0] + 2
        assert client.hget(store.session_key("s1"), "version") == b"0x2"
        with pytest.raises(CorruptStateError):
            await store.compare_and_set("plain", counter_record(9), 1, LONG_TTL)
        assert count_of((await store.get("s0")).record) == 8
        client.close()


async def test_a_batch_step_round_trip(store: StateStore) -> None:
    """The micro-batcher's pattern: load a batch, step it, store it; repeat."""
    session_ids = [f"s{index}" for index in range(8)]
    firsts = [
        await store.create(session_id, counter_record(0), LONG_TTL) for session_id in session_ids
    ]
    for _ in range(3):
        loads = await store.get_many(session_ids, expected=SIGNATURE)
        writes = [
            CasWrite(session_id, increment(load.record), load.version, LONG_TTL)
            for session_id, load in zip(session_ids, loads, strict=True)
        ]
        assert await store.cas_many(writes) == [load.version + 1 for load in loads]
    loads = await store.get_many(session_ids)
    assert [(count_of(load.record), load.record.step, load.version) for load in loads] == [
        (3, 3, first + 3) for first in firsts
    ]


# --- generic TTL records ------------------------------------------------------------------


async def test_records_store_bytes_and_json(store: StateStore) -> None:
    await store.put_record("predictions", "p1", b"\x00\xffraw", LONG_TTL)
    await store.put_json("aci", "digits-lru", {"alpha_t": 0.093, "seen": 12}, None)
    assert await store.get_record("predictions", "p1") == b"\x00\xffraw"
    assert await store.get_json("aci", "digits-lru") == {"alpha_t": 0.093, "seen": 12}
    assert await store.get_record("predictions", "missing") is None
    assert await store.get_json("aci", "missing") is None
    assert await store.delete_record("predictions", "p1") is True
    assert await store.get_record("predictions", "p1") is None


async def test_records_expire_and_ttl_none_keeps_them(store: StateStore) -> None:
    await store.put_record("predictions", "short", b"x", 0.3)
    await store.put_record("predictions", "kept", b"y", None)
    await asyncio.sleep(0.45)
    assert await store.get_record("predictions", "short") is None
    assert await store.get_record("predictions", "kept") == b"y"


async def test_counters_increment_atomically(store: StateStore) -> None:
    results = await asyncio.gather(*(store.incr("feedback", "digits", 2) for _ in range(20)))
    assert sorted(results) == list(range(2, 41, 2))
    assert await store.get_record("feedback", "digits") == b"40"
    assert await store.incr("feedback", "digits", -40) == 0
    await store.incr("feedback", "short", ttl=0.3)
    await asyncio.sleep(0.45)
    assert await store.incr("feedback", "short") == 1  # expired, so it counted from zero


async def test_incr_refuses_a_record_that_is_not_an_integer(store: StateStore) -> None:
    await store.put_record("feedback", "text", b"twelve", None)
    with pytest.raises(ValueError, match="64-bit integer"):
        await store.incr("feedback", "text")
    assert await store.get_record("feedback", "text") == b"twelve"


async def test_sessions_and_records_do_not_collide(store: StateStore) -> None:
    await store.create("x", counter_record(), LONG_TTL)
    await store.put_record("other", "x", b"record", LONG_TTL)
    assert count_of((await store.get("x")).record) == 0
    with pytest.raises(ValueError, match="reserved for sessions"):
        await store.put_record("session", "x", b"clobber", LONG_TTL)


# --- integer fields: counters that move together (online levels, live coverage) -----------


async def test_incr_fields_adds_to_several_fields_and_returns_them_all(store: StateStore) -> None:
    assert await store.get_fields("levels", "k") == {}
    assert await store.incr_fields("levels", "k", {"steps": 1, "missed": 0}) == {
        "steps": 1,
        "missed": 0,
    }
    after = await store.incr_fields("levels", "k", {"missed": 1, "a|0.1|8:steps": -3})
    assert after == {"steps": 1, "missed": 1, "a|0.1|8:steps": -3}  # missing fields start at 0
    assert await store.get_fields("levels", "k") == after
    assert await store.get_fields("levels", "other") == {}


async def test_incr_fields_is_one_atomic_step_under_concurrency(
    store: StateStore, store_factory: Callable[[], StateStore]
) -> None:
    """Every increment moves `seen` up and `pending` down together: no reader, and no
    returned snapshot, may ever see one without the other, and no increment is lost."""
    tasks = 60
    snapshots: list[dict[str, int]] = []

    async def label(own: StateStore, index: int) -> None:
        increments = {"seen": 1, "pending": -1, "missed": index % 2}
        snapshots.append(await own.incr_fields("levels", "k", increments, ttl=LONG_TTL))

    async def read_while_writing(own: StateStore, writers: asyncio.Future) -> None:
        while not writers.done():
            fields = await own.get_fields("levels", "k")
            assert fields.get("seen", 0) + fields.get("pending", 0) == 0, fields
            await asyncio.sleep(0)

    async with store_factory() as other:  # a second client: another connection or replica
        writers = asyncio.gather(*(label((store, other)[i % 2], i) for i in range(tasks)))
        await asyncio.gather(writers, read_while_writing(other, writers))

    assert sorted(s["seen"] for s in snapshots) == list(range(1, tasks + 1))
    assert all(s["seen"] + s["pending"] == 0 and 0 <= s["missed"] <= s["seen"] for s in snapshots)
    assert await store.get_fields("levels", "k") == {
        "seen": tasks,
        "pending": -tasks,
        "missed": tasks // 2,
    }


async def test_incr_fields_ttl_restarts_with_a_ttl_and_is_kept_without(store: StateStore) -> None:
    await store.incr_fields("levels", "short", {"n": 1}, ttl=0.3)
    await store.incr_fields("levels", "kept", {"n": 1}, ttl=0.4)
    await store.incr_fields("levels", "renewed", {"n": 1}, ttl=0.4)
    await store.incr_fields("levels", "forever", {"n": 1})
    await asyncio.sleep(0.25)
    await store.incr_fields("levels", "kept", {"n": 1})  # no ttl: its 0.4 s still run
    await store.incr_fields("levels", "renewed", {"n": 1}, ttl=0.4)
    await asyncio.sleep(0.25)  # 0.5 s after the first writes, 0.25 s after the second
    assert await store.get_fields("levels", "short") == {}
    assert await store.get_fields("levels", "kept") == {}
    assert await store.get_fields("levels", "renewed") == {"n": 2}
    assert await store.get_fields("levels", "forever") == {"n": 1}
    assert await store.incr_fields("levels", "short", {"n": 1}) == {"n": 1}  # from zero again


async def test_incr_fields_refuses_records_that_are_not_integer_fields(store: StateStore) -> None:
    await store.put_record("levels", "text", b"twelve", None)
    await store.put_json("levels", "json", {"alpha_t": "0.1"}, None)
    await store.put_json("levels", "integers", {"n": 1}, None)  # JSON, not a hash of fields
    await store.incr("levels", "counter", 5)
    for key in ("text", "json", "integers", "counter"):
        with pytest.raises(ValueError, match="integer fields|not a hash"):
            await store.incr_fields("levels", key, {"n": 1})
        with pytest.raises(ValueError, match="integer fields|not a hash"):
            await store.get_fields("levels", key)
    assert await store.get_record("levels", "text") == b"twelve"
    assert await store.get_json("levels", "json") == {"alpha_t": "0.1"}
    assert await store.get_json("levels", "integers") == {"n": 1}
    assert await store.incr("levels", "counter", 0) == 5
    await store.incr_fields("levels", "fields", {"n": 1})
    with pytest.raises(ValueError, match="integer"):  # a hash is no counter, on either store
        await store.incr("levels", "fields", 1)


async def test_incr_fields_applies_nothing_when_one_field_cannot_move(store: StateStore) -> None:
    top = (1 << 63) - 1
    await store.incr_fields("levels", "k", {"steps": 1, "full": top})
    with pytest.raises(ValueError):
        await store.incr_fields("levels", "k", {"steps": 1, "full": 1})
    assert await store.get_fields("levels", "k") == {"steps": 1, "full": top}


async def test_incr_fields_refuses_bad_fields_and_amounts(store: StateStore) -> None:
    with pytest.raises(ValueError, match="at least one field"):
        await store.incr_fields("levels", "k", {})
    for name in ("", "has space", "tab\t", "x" * 129, 7):
        with pytest.raises(ValueError, match="field names must be"):
            await store.incr_fields("levels", "k", {name: 1})  # type: ignore[dict-item]
    for amount in (1.0, True, "1"):
        with pytest.raises(TypeError, match="amount must be an integer"):
            await store.incr_fields("levels", "k", {"n": amount})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="64-bit"):
        await store.incr_fields("levels", "k", {"n": 1 << 63})
    assert await store.get_fields("levels", "k") == {}


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, -1.0, float("nan"), float("inf"), "10"])
async def test_bad_ttl_is_refused(store: StateStore, ttl: object) -> None:
    with pytest.raises(ValueError, match="ttl must be"):
        await store.create("s1", counter_record(), ttl)  # type: ignore[arg-type]
    assert await store.get("s1") is None


@pytest.mark.parametrize("session_id", ["", "has space", "tab\t", "x" * 257, 42])
async def test_bad_session_ids_are_refused(store: StateStore, session_id: object) -> None:
    with pytest.raises(ValueError, match="session id must be"):
        await store.create(session_id, counter_record(), LONG_TTL)  # type: ignore[arg-type]


async def test_bad_versions_namespaces_and_values_are_refused(store: StateStore) -> None:
    with pytest.raises(ValueError, match="expected_version must be a positive integer"):
        await store.compare_and_set("s1", counter_record(), 0, LONG_TTL)
    with pytest.raises(ValueError, match="record namespace must be"):
        await store.put_record("Bad Namespace", "k", b"v", LONG_TTL)
    with pytest.raises(TypeError, match="record value must be bytes"):
        await store.put_record("ns", "k", "text", LONG_TTL)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        await store.put_json("ns", "k", {"x": float("nan")}, LONG_TTL)
    with pytest.raises(ValueError, match="retries must be"):
        await store.update("s1", increment, LONG_TTL, retries=-1)


# --- in-process specifics -----------------------------------------------------------------


async def test_in_memory_store_sweeps_expired_entries() -> None:
    now = [100.0]
    store = InMemoryStateStore(clock=lambda: now[0], sweep_interval=1.0)
    for index in range(5):
        await store.create(f"s{index}", counter_record(), 2.0)
    await store.put_record("ns", "kept", b"v", None)
    assert len(store) == 6
    now[0] += 2.0  # exactly at the deadline: gone
    assert len(store) == 1
    assert await store.get("s0") is None


async def test_a_capped_namespace_keeps_its_newest_records_and_nothing_else_is_dropped() -> None:
    store = InMemoryStateStore(capped={"prediction": 3})
    await store.create("s1", counter_record(), LONG_TTL)
    await store.put_record("owners", "job", b"alice", LONG_TTL)
    for index in range(5):
        await store.put_json("prediction", f"p{index}", {"i": index}, LONG_TTL)
    assert [await store.get_json("prediction", f"p{i}") for i in range(5)] == [
        None,
        None,
        {"i": 2},
        {"i": 3},
        {"i": 4},
    ]
    await store.put_json_many("prediction", [("p2", {"i": 22}), ("p5", {"i": 5})], LONG_TTL)
    # p2 was rewritten, so p3 is now the oldest written and the one to go.
    assert await store.get_json("prediction", "p3") is None
    assert await store.get_json("prediction", "p2") == {"i": 22}
    assert await store.get("s1") is not None  # sessions and other namespaces stay
    assert await store.get_record("owners", "job") == b"alice"
    assert len(store) == 5  # the session, the owner record, three predictions


async def test_records_that_expire_or_are_deleted_free_their_place_under_the_cap() -> None:
    now = [100.0]
    store = InMemoryStateStore(clock=lambda: now[0], sweep_interval=1.0, capped={"prediction": 3})
    await store.put_record("prediction", "long", b"1", LONG_TTL)
    await store.put_record("prediction", "short", b"2", 1.0)
    await store.put_record("prediction", "gone", b"3", LONG_TTL)
    await store.delete_record("prediction", "gone")
    now[0] += 1.0  # "short" expires; the next write sweeps it out
    await store.put_record("prediction", "new", b"4", LONG_TTL)
    await store.put_record("prediction", "newer", b"5", LONG_TTL)
    # Three live records, the cap: none is dropped for the two that are gone.
    assert await store.get_record("prediction", "long") == b"1"
    assert await store.get_record("prediction", "newer") == b"5"
    with pytest.raises(ValueError, match="must be a positive integer"):
        InMemoryStateStore(capped={"prediction": 0})


def test_open_state_store_picks_the_implementation() -> None:
    assert isinstance(open_state_store(None), InMemoryStateStore)
    assert isinstance(open_state_store(""), InMemoryStateStore)
    assert isinstance(open_state_store("redis://127.0.0.1:1/0"), RedisStateStore)
    with pytest.raises(ValueError, match="only apply to a Redis"):
        open_state_store(None, socket_timeout=1.0)
    with pytest.raises(ValueError, match="prefix must be"):
        InMemoryStateStore(prefix="{tagged}")


# --- Redis specifics ----------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_keys_are_namespaced_under_the_prefix(
    redis_url: str, redis_prefix: str
) -> None:
    async with RedisStateStore.from_url(redis_url, prefix=redis_prefix) as store:
        await store.create("abc", counter_record(), LONG_TTL)
        await store.put_record("aci", "m1", b"1", LONG_TTL)
    client = redis.Redis.from_url(redis_url)
    try:
        keys = sorted(client.scan_iter(match=f"{redis_prefix}:*"))
        ttl_ms = client.pttl(f"{redis_prefix}:session:abc")
    finally:
        client.close()
    assert keys == [f"{redis_prefix}:aci:m1".encode(), f"{redis_prefix}:session:abc".encode()]
    assert 0 < ttl_ms <= LONG_TTL * 1000


@pytest.mark.redis
async def test_redis_prefixes_isolate_stores(redis_url: str, redis_prefix: str) -> None:
    async with (
        RedisStateStore.from_url(redis_url, prefix=f"{redis_prefix}:a") as first,
        RedisStateStore.from_url(redis_url, prefix=f"{redis_prefix}:b") as second,
    ):
        await first.create("s1", counter_record(1), LONG_TTL)
        assert await second.get("s1") is None
        await second.create("s1", counter_record(2), LONG_TTL)
        assert count_of((await first.get("s1")).record) == 1


@pytest.mark.redis
async def test_redis_store_recovers_when_the_script_cache_is_flushed(
    redis_url: str, redis_prefix: str
) -> None:
    async with RedisStateStore.from_url(redis_url, prefix=redis_prefix) as store:
        v = await store.create("s1", counter_record(0), LONG_TTL)
        await store._client.script_flush()  # as after a restart or failover
        assert await store.compare_and_set("s1", counter_record(1), v, LONG_TTL) == v + 1
        await store._client.script_flush()
        writes = [CasWrite("s1", counter_record(2), v + 1, LONG_TTL)] * 2
        outcomes = await store.cas_many(writes)
        assert outcomes[0] == v + 2 and isinstance(outcomes[1], StaleVersionError)


@pytest.mark.parametrize(
    "url_form",
    [
        "redis://127.0.0.1:{port}/0",
        "redis+sentinel://127.0.0.1:{port}/main",
        "redis+cluster://127.0.0.1:{port}",
    ],
    ids=["standalone", "sentinel", "cluster"],
)
async def test_unreachable_redis_raises_unavailable_quickly(
    url_form: str, unused_tcp_port: int
) -> None:
    url = url_form.format(port=unused_tcp_port)
    store = RedisStateStore.from_url(url, connect_timeout=0.2, retries=0)
    operations = [
        store.ping(),
        store.create("s1", counter_record(), LONG_TTL),
        store.get("s1"),
        store.get_many(["s1", "s2"]),
        store.compare_and_set("s1", counter_record(), 1, LONG_TTL),
        store.cas_many([CasWrite("s1", counter_record(), 1, LONG_TTL)]),
        store.update("s1", increment, LONG_TTL),
        store.delete("s1"),
        store.touch("s1", LONG_TTL),
        store.put_record("ns", "k", b"v", LONG_TTL),
        store.get_record("ns", "k"),
        store.incr("ns", "k"),
    ]
    started = time.monotonic()
    for operation in operations:
        with pytest.raises(StateStoreUnavailableError, match="state store unavailable"):
            await operation
    assert time.monotonic() - started < 5.0  # connection refused is immediate; no long retry
    await store.close()


async def test_a_redis_that_never_answers_times_out_as_unavailable() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nobody ever replies
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        store = RedisStateStore.from_url(url, socket_timeout=0.2, connect_timeout=0.2, retries=0)
        started = time.monotonic()
        with pytest.raises(StateStoreUnavailableError, match="Timeout"):
            await store.get("s1")
        assert time.monotonic() - started < 2.0
        await store.close()


async def test_unavailable_error_never_shows_the_password(unused_redis_url: str) -> None:
    url = unused_redis_url.replace("redis://", "redis://user:s3cret@")
    store = RedisStateStore.from_url(url, connect_timeout=0.2, retries=0)
    with pytest.raises(StateStoreUnavailableError) as caught:
        await store.ping()
    assert "s3cret" not in str(caught.value) and "user:***@" in str(caught.value)
    await store.close()


# --- Redis URL forms ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "tls"),
    [
        ("redis://localhost:6379/0", False),
        ("rediss://:pw@cache.example:6380/2", True),
        ("unix:///run/redis/redis.sock?db=3", False),
    ],
)
def test_standalone_urls_go_to_redis_py_unchanged(url: str, tls: bool) -> None:
    target = parse_redis_url(url)
    assert (target.kind, target.url, target.tls) == ("standalone", url, tls)


def test_sentinel_url_lists_sentinels_master_and_credentials() -> None:
    target = parse_redis_url(
        "redis+sentinel://app:p%40ss@s1.example,s2.example:26380,[::1]:5000/mymaster/4"
        "?sentinel_password=spw"
    )
    assert target.kind == "sentinel" and not target.tls
    assert target.nodes == (("s1.example", 26379), ("s2.example", 26380), ("::1", 5000))
    assert (target.service_name, target.db) == ("mymaster", 4)
    assert (target.username, target.password, target.sentinel_password) == ("app", "p@ss", "spw")
    assert parse_redis_url("rediss+sentinel://s1/main").tls
    assert parse_redis_url("redis+sentinel://s1/main").db == 0


def test_cluster_url_lists_seed_nodes() -> None:
    target = parse_redis_url("rediss+cluster://:pw@n1:7000,n2:7001,n3")
    assert (target.kind, target.tls, target.password) == ("cluster", True, "pw")
    assert target.nodes == (("n1", 7000), ("n2", 7001), ("n3", 6379))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("localhost:6379", "not a Redis URL"),
        ("http://localhost", "unsupported Redis URL scheme"),
        ("redis+replica://h/x", "unsupported Redis URL scheme"),
        ("redis+sentinel://h:26379", "master name"),
        ("redis+sentinel://h/master/notadb", "master name"),
        ("redis+sentinel://h:99999/master", "bad host:port"),
        ("redis+cluster://h1,,h2", "bad host:port"),
        ("redis+cluster://h1:7000/3", "only database 0"),
    ],
)
def test_bad_urls_are_refused_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_redis_url(url)


def test_clients_are_built_for_each_url_form_without_connecting() -> None:
    options = ConnectionOptions()
    cluster, _ = connect(parse_redis_url("redis+cluster://127.0.0.1:1,127.0.0.1:2"), options)
    assert isinstance(cluster, RedisCluster)
    master, sentinels = connect(parse_redis_url("redis+sentinel://127.0.0.1:1/main/2"), options)
    assert isinstance(master.connection_pool, SentinelConnectionPool)
    assert master.connection_pool.service_name == "main"
    assert master.connection_pool.connection_kwargs["db"] == 2
    assert len(sentinels) == 1


def test_redaction_hides_passwords_in_all_places() -> None:
    assert redact_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://:pw@h") == "redis://:***@h"
    assert redact_url("redis+sentinel://h/m?sentinel_password=x&a=1") == (
        "redis+sentinel://h/m?sentinel_password=***&a=1"
    )
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_hiredis_parser_is_available() -> None:
    from redis.utils import HIREDIS_AVAILABLE

    assert HIREDIS_AVAILABLE, "install redis[hiredis]: the pure-Python parser is much slower"
