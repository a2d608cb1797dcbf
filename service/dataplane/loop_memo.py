"""Values looked up once per pass of the event loop, shared by the requests of that pass.

A request resolves its model's card from the repository on disk (a few `stat` calls, so
that changes made by other processes are seen at once). Under load, the requests of one pass
of the loop each did the same lookups: at 64 concurrent one-digit V2 requests, a tenth of
the server's CPU.

The memo keeps a value from its first lookup in a pass until the loop's next pass, and no
longer: the first lookup schedules the clearing with `call_soon`, which runs after
everything already queued. Whatever runs before that was queued before the lookup, for
input that had arrived before it (a request's task is queued when its bytes are read), so a
request still sees every change finished before it arrived, as with a lookup of its own.
Lookups outside the event loop (worker threads) are not memoised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LoopPassMemo(Generic[V]):
    """`get(key, compute)`: `compute()` once per key per pass of the running loop."""

    def __init__(self) -> None:
        self._values: dict[Hashable, V] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self, key: Hashable, compute: Callable[[], V]) -> V:
        loop = asyncio._get_running_loop()  # the C fast path of get_running_loop, no raise
        if loop is None:
            return compute()
        values = self._values
        if loop is not self._loop:  # another loop (an app started anew): nothing carries over
            values.clear()
            self._loop = loop
        if key in values:
            return values[key]
        value = compute()  # raises for an unknown model: nothing is kept then
        if not values:
            loop.call_soon(values.clear)
        values[key] = value
        return value
