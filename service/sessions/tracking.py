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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from service import metrics


class FifoLocks:
    """One FIFO lock per key, created on demand and dropped when nobody holds or awaits it.

    `asyncio.Lock` hands the lock to waiters in the order they arrived, which is what keeps
    steps on one session in arrival order within a replica.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


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
