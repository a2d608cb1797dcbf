"""Per-replica session bookkeeping: arrival-order locks and the live-session count.

`FifoLocks` keeps steps on one session in arrival order within a replica (across replicas
the store's compare-and-set keeps them consistent). `LiveSessions` counts the sessions this
replica created or used and has not seen expire, per model, for the active-sessions gauge
and the `max_sessions` limit; the state store itself cannot be enumerated cheaply, so with
several replicas each one reports (and limits) its own share.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from service import metrics


class FifoLocks:
    """One FIFO lock per key, existing only while someone holds or awaits it.

    The lock is handed to waiters in the order they arrived, which is what keeps steps on one
    session in arrival order within a replica. An uncontended hold (the usual step) costs a
    dict entry: no lock object, no task switch.
    """

    def __init__(self) -> None:
        # key -> futures of the waiters, oldest first; present while the key is held.
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        return len(self._waiters)

    def hold(self, key: str) -> _Hold:
        """`async with locks.hold(key):` runs its body while holding `key`'s lock."""
        return _Hold(self, key)

    async def _acquire(self, key: str) -> None:
        waiters = self._waiters.get(key)
        if waiters is None:
            self._waiters[key] = deque()
            return
        handed = asyncio.get_running_loop().create_future()
        waiters.append(handed)
        try:
            await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                self._release(key)  # handed the lock, then cancelled: pass it on
            elif handed in waiters:
                waiters.remove(handed)
            raise

    def _release(self, key: str) -> None:
        waiters = self._waiters[key]
        while waiters:
            handed = waiters.popleft()
            if not handed.done():
                handed.set_result(None)  # the lock now belongs to that waiter
                return
        del self._waiters[key]


class _Hold:
    __slots__ = ("_locks", "_key")

    def __init__(self, locks: FifoLocks, key: str) -> None:
        self._locks, self._key = locks, key

    async def __aenter__(self) -> None:
        await self._locks._acquire(self._key)

    async def __aexit__(self, *exc_info: object) -> None:
        self._locks._release(self._key)


class LiveSessions:
    """Sessions this replica created or used, with their expiry, counted per model (and per
    version, so that a version serving sessions is not deleted from under them)."""

    def __init__(self) -> None:
        self._expiry: dict[str, tuple[str, str, float]] = {}  # key -> (model, version, expiry)
        self._counts: dict[str, int] = {}
        self._next_sweep = 0.0

    def count(self, now: float) -> int:
        """Live sessions; ones that expired in the last second may still be counted."""
        self._sweep(now)
        return len(self._expiry)

    def on_version(self, model: str, version: str, now: float) -> int:
        """Live sessions of one model version (expired ones are not counted)."""
        return sum(
            m == model and v == version and expires_at > now
            for m, v, expires_at in list(self._expiry.values())
        )

    def seen(self, key: str, model: str, expires_at: float, version: str = "") -> None:
        if key not in self._expiry:
            self._counts[model] = self._counts.get(model, 0) + 1
            metrics.set_active_sessions(model, self._counts[model])
        self._expiry[key] = (model, version, expires_at)
        self._sweep(time.time())

    def gone(self, key: str) -> None:
        entry = self._expiry.pop(key, None)
        if entry is not None:
            self._counts[entry[0]] -= 1
            metrics.set_active_sessions(entry[0], self._counts[entry[0]])

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for key in [k for k, (_, _, expires_at) in self._expiry.items() if expires_at <= now]:
            self.gone(key)
