"""The per-session FIFO locks: arrival order, exclusion, and cancellation at every point."""

from __future__ import annotations

import asyncio

from service.sessions.tracking import FifoLocks


def test_holders_run_one_at_a_time_in_arrival_order() -> None:
    async def scenario() -> list[tuple[str, int]]:
        locks, events = FifoLocks(), []

        async def step(i: int) -> None:
            async with locks.hold("s"):
                events.append(("in", i))
                await asyncio.sleep(0)  # let the others try to enter
                events.append(("out", i))

        await asyncio.gather(*(step(i) for i in range(5)))
        assert len(locks) == 0
        return events

    events = asyncio.run(scenario())
    assert events == [(kind, i) for i in range(5) for kind in ("in", "out")]


def test_keys_do_not_wait_for_each_other() -> None:
    async def scenario() -> None:
        locks = FifoLocks()
        async with locks.hold("a"):
            await asyncio.wait_for(locks._acquire("b"), 1)  # another key: at once
            locks._release("b")
            assert len(locks) == 1

    asyncio.run(scenario())


def test_a_cancelled_waiter_neither_holds_nor_blocks_the_lock() -> None:
    async def scenario() -> list[int]:
        locks, entered = FifoLocks(), []
        holder_may_leave = asyncio.Event()

        async def step(i: int, wait: asyncio.Event | None = None) -> None:
            async with locks.hold("s"):
                entered.append(i)
                if wait is not None:
                    await wait.wait()

        first = asyncio.ensure_future(step(0, holder_may_leave))
        await asyncio.sleep(0)
        cancelled = asyncio.ensure_future(step(1))
        last = asyncio.ensure_future(step(2))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        holder_may_leave.set()
        await asyncio.wait_for(asyncio.gather(first, last), 1)
        assert cancelled.cancelled()
        assert len(locks) == 0
        return entered

    assert asyncio.run(scenario()) == [0, 2]


def test_a_waiter_cancelled_after_the_hand_off_passes_the_lock_on() -> None:
    async def scenario() -> list[int]:
        locks, entered = FifoLocks(), []
        await locks._acquire("s")  # held here

        async def step(i: int) -> None:
            async with locks.hold("s"):
                entered.append(i)

        handed = asyncio.ensure_future(step(1))
        after = asyncio.ensure_future(step(2))
        await asyncio.sleep(0)
        locks._release("s")  # hands the lock to step 1 ...
        handed.cancel()  # ... which is cancelled before it runs
        await asyncio.wait_for(asyncio.gather(after, return_exceptions=True), 1)
        assert handed.cancelled()
        assert len(locks) == 0
        return entered

    assert asyncio.run(scenario()) == [2]
