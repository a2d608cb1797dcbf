"""`LoopPassMemo`: one lookup per key per pass of the event loop, none kept past it; no
memo outside the loop; a failed lookup is not kept."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.dataplane.loop_memo import LoopPassMemo


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.calls


def test_lookups_of_one_pass_share_the_first_and_the_next_pass_looks_again() -> None:
    memo: LoopPassMemo[int] = LoopPassMemo()
    lookup = Counting()

    async def main() -> list[int]:
        seen = [memo.get("card", lookup), memo.get("card", lookup)]  # one pass: one lookup

        async def queued_now() -> None:  # runs in the next pass
            seen.append(memo.get("card", lookup))

        task = asyncio.ensure_future(queued_now())
        seen.append(memo.get("other", lookup))  # another key: its own lookup
        seen.append(memo.get("card", lookup))  # still this pass
        await task
        await asyncio.sleep(0)
        seen.append(memo.get("card", lookup))
        seen.append(memo.get("card", lookup))
        return seen

    assert asyncio.run(main()) == [1, 1, 2, 1, 3, 4, 4]
    assert lookup.calls == 4


def test_outside_the_loop_every_lookup_is_made() -> None:
    memo: LoopPassMemo[int] = LoopPassMemo()
    lookup = Counting()
    assert [memo.get("card", lookup) for _ in range(3)] == [1, 2, 3]

    async def from_a_thread() -> list[int]:
        memo.get("card", lookup)  # on the loop: kept for this pass
        values: list[int] = []
        worker = threading.Thread(
            target=lambda: values.extend(memo.get("card", lookup) for _ in "ab")
        )
        worker.start()
        worker.join()
        return values

    assert asyncio.run(from_a_thread()) == [5, 6]


def test_a_failed_lookup_is_not_kept() -> None:
    memo: LoopPassMemo[int] = LoopPassMemo()
    attempts = Counting()

    def failing() -> int:
        attempts()
        raise LookupError("no model named 'x'")

    async def main() -> None:
        for _ in range(2):
            with pytest.raises(LookupError):
                memo.get("x", failing)

    asyncio.run(main())
    assert attempts.calls == 2


def test_a_new_loop_starts_empty() -> None:
    memo: LoopPassMemo[int] = LoopPassMemo()
    lookup = Counting()

    async def one_lookup() -> int:
        return memo.get("card", lookup)

    assert asyncio.run(one_lookup()) == 1
    assert asyncio.run(one_lookup()) == 2  # the first loop's value does not carry over
