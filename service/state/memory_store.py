"""The in-process state store: sessions and records in a dict of one process.

The embedded default when no Redis is configured (`factory.open_state_store`); it keeps the
whole `StateStore` contract (versions, compare-and-set, TTLs, counters) in memory.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

from service.state.store import DEFAULT_PREFIX, INT64_RANGE, RawLoad, StateStore

_FIELDS_TAG = b"\x00fields:"  # marks an in-process record written by `incr_fields`
_REDIS_INTEGER = re.compile(rb"-?(0|[1-9][0-9]*)")


# An entry: (value, version, deadline). Version 0 for generic records, >= 1 for session
# states; deadline: time.monotonic() after which the entry is gone, or None. A plain tuple of
# plain values, which the garbage collector stops tracking: a store holding many records then
# adds nothing to the collector's full passes (with an object per record, those grew to
# ~90 ms at 100k records and showed as p99 spikes under load).
_Entry = tuple[bytes, int, float | None]


class InMemoryStateStore(StateStore):
    """The embedded store: a dict guarded by a lock; one process only.

    Safe to share between threads, each running its own event loop: every operation takes
    a `threading.Lock` for a few dict operations and never awaits while holding it, so the
    event loop is never blocked for long. Expired entries vanish on access and are swept
    out at most once per `sweep_interval` seconds. `close` is a no-op: the data lives as long
    as the object, so a store shared between threads may be closed by any of them.

    `capped` bounds the memory of busy record namespaces: namespace -> the most records of it
    kept; beyond that the oldest written go first (Redis would keep them until their TTL, in
    its own memory). A prediction record is kept for the whole feedback window (a day by
    default), so uncapped, a process under steady load would grow without bound. Sessions
    and other namespaces are never dropped.
    """

    def __init__(
        self,
        *,
        prefix: str = DEFAULT_PREFIX,
        seed: int = 0,
        sweep_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        capped: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(prefix=prefix, seed=seed)
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._next_sweep = clock() + sweep_interval
        # Per capped namespace: its key prefix, its limit and its keys in write order.
        self._caps: list[tuple[str, int, OrderedDict[str, None]]] = []
        for namespace, limit in (capped or {}).items():
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"the cap of {namespace!r} must be a positive integer")
            key_prefix = self.record_key(namespace, "k")[:-1]
            self._caps.append((key_prefix, limit, OrderedDict()))

    def __len__(self) -> int:
        """Live entries (sessions and records)."""
        with self._lock:
            self._sweep(self._clock(), force=True)
            return len(self._entries)

    async def ping(self) -> None:
        return None

    async def _create_raw(self, key: str, blob: bytes, ttl_ms: int, version: int) -> bool:
        with self._lock:
            now = self._clock()
            if self._live(key, now) is not None:
                return False
            self._entries[key] = (blob, version, now + ttl_ms / 1000)
            self._sweep(now)
            return True

    async def _get_raw_many(self, keys: Sequence[str], touch_ttl_ms: int | None) -> list[RawLoad]:
        with self._lock:
            now = self._clock()
            found: list[RawLoad] = []
            for key in keys:
                entry = self._live(key, now)
                if entry is None or entry[1] == 0:
                    found.append(None)
                    continue
                value, version, _ = entry
                if touch_ttl_ms is not None:
                    self._entries[key] = (value, version, now + touch_ttl_ms / 1000)
                found.append((value, version))
            return found

    async def _cas_raw_many(
        self, writes: Sequence[tuple[str, bytes, int, int]]
    ) -> list[int | None]:
        with self._lock:
            now = self._clock()
            results = []
            for key, blob, expected_version, ttl_ms in writes:
                entry = self._live(key, now)
                version = 0 if entry is None else entry[1]
                if version == 0:
                    results.append(0)
                elif version != expected_version:
                    results.append(-version)
                else:
                    self._entries[key] = (blob, version + 1, now + ttl_ms / 1000)
                    results.append(version + 1)
            self._sweep(now)
            return results

    async def _delete_raw(self, key: str) -> bool:
        with self._lock:
            existed = self._live(key, self._clock()) is not None
            self._entries.pop(key, None)
            self._forget(key)
            return existed

    async def _touch_raw(self, key: str, ttl_ms: int) -> bool:
        with self._lock:
            now = self._clock()
            entry = self._live(key, now)
            if entry is None:
                return False
            self._entries[key] = (entry[0], entry[1], now + ttl_ms / 1000)
            return True

    async def _put_raw(self, key: str, value: bytes, ttl_ms: int | None) -> None:
        await self._put_raw_many([(key, value)], ttl_ms)

    async def _put_raw_many(self, items: Sequence[tuple[str, bytes]], ttl_ms: int | None) -> None:
        # Kept as exact-size copies: a serialiser's output may carry slack (orjson's does), and
        # thousands of such buffers held for the feedback window fragment the heap so badly that
        # writing one prediction record cost ~17 µs instead of ~1.4 (measured).
        owned = [(key, memoryview(value).tobytes()) for key, value in items]
        with self._lock:
            now = self._clock()
            deadline = None if ttl_ms is None else now + ttl_ms / 1000
            for key, value in owned:
                self._entries[key] = (value, 0, deadline)
                self._count_write(key)
            self._sweep(now)

    def _count_write(self, key: str) -> None:
        """Note a record written; drop its namespace's oldest beyond the cap. Hold the lock."""
        for key_prefix, limit, written in self._caps:
            if key.startswith(key_prefix):
                written[key] = None
                written.move_to_end(key)
                while len(written) > limit:
                    oldest, _ = written.popitem(last=False)
                    self._entries.pop(oldest, None)
                return

    def _forget(self, key: str) -> None:
        """Stop counting a record that is gone. Hold the lock."""
        for key_prefix, _, written in self._caps:
            if key.startswith(key_prefix):
                written.pop(key, None)
                return

    async def _get_raw(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._live(key, self._clock())
            return None if entry is None else entry[0]

    async def _incr_raw(self, key: str, amount: int, ttl_ms: int | None) -> int:
        with self._lock:
            now = self._clock()
            entry = self._live(key, now)
            current = 0 if entry is None else _parse_counter(entry[0])
            total = current + amount
            if not INT64_RANGE[0] <= total <= INT64_RANGE[1]:
                raise ValueError(f"incrementing {key} by {amount} would overflow 64 bits")
            deadline = None if entry is None else entry[2]
            if ttl_ms is not None:
                deadline = now + ttl_ms / 1000
            self._entries[key] = (str(total).encode(), 0, deadline)
            return total

    async def _incr_fields_raw(
        self, key: str, increments: Sequence[tuple[str, int]], ttl_ms: int | None
    ) -> dict[str, int]:
        with self._lock:
            now = self._clock()
            entry = self._live(key, now)
            fields = {} if entry is None else _parse_fields(entry[0])
            for field_name, amount in increments:
                total = fields.get(field_name, 0) + amount
                if not INT64_RANGE[0] <= total <= INT64_RANGE[1]:
                    raise ValueError(f"incrementing {key} {field_name} would overflow 64 bits")
                fields[field_name] = total
            deadline = None if entry is None else entry[2]
            if ttl_ms is not None:
                deadline = now + ttl_ms / 1000
            self._entries[key] = (_FIELDS_TAG + json.dumps(fields).encode(), 0, deadline)
            return dict(fields)

    async def _get_fields_raw(self, key: str) -> dict[str, int]:
        with self._lock:
            entry = self._live(key, self._clock())
            return {} if entry is None else _parse_fields(entry[0])

    def _live(self, key: str, now: float) -> _Entry | None:
        """The entry at `key` unless expired (expired ones are dropped). Hold the lock."""
        entry = self._entries.get(key)
        if entry is not None and entry[2] is not None and entry[2] <= now:
            del self._entries[key]
            self._forget(key)
            return None
        return entry

    def _sweep(self, now: float, *, force: bool = False) -> None:
        """Drop all expired entries, at most once per sweep interval. Hold the lock."""
        if not force and now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_interval
        expired = [k for k, e in self._entries.items() if e[2] is not None and e[2] <= now]
        for key in expired:
            del self._entries[key]
            self._forget(key)


# --- helpers -------------------------------------------------------------------------------


def _parse_counter(value: bytes) -> int:
    """Read a counter the way Redis INCRBY does: a plain decimal 64-bit integer."""
    if _REDIS_INTEGER.fullmatch(value):
        number = int(value)
        if INT64_RANGE[0] <= number <= INT64_RANGE[1]:
            return number
    raise ValueError("record does not hold a 64-bit integer, so it cannot be incremented")


def _parse_fields(value: bytes) -> dict[str, int]:
    """The in-process store keeps a hash of counters as a tagged JSON object of integers (the
    tag tells it from a JSON record that happens to hold integers, as Redis tells a hash from
    a string)."""
    fields = None
    if value.startswith(_FIELDS_TAG):
        try:
            fields = json.loads(value[len(_FIELDS_TAG) :])
        except ValueError:
            fields = None
    if not isinstance(fields, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in fields.values()
    ):
        raise ValueError("record does not hold integer fields, so they cannot be incremented")
    return fields
