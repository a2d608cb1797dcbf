"""The states this replica last wrote: a session's next step here starts from its own write.

A step normally reads its session's state back from the store: one round trip and one
decode of the blob, per step. Yet when a replica serves a session's steps in a row, the
state in the store is the one it wrote itself a moment ago. `WrittenStates` keeps that
state, at the version it was written under, and the next step starts from it.

That is safe because the step's write is still a compare-and-set on that version. If
another replica wrote the session since, the version moved on; if the session was deleted
(or expired) and created again, its versions started afresh at a random point
(`service.state.store`) and do not include this one. Either way the write fails, the entry
is dropped, and the step runs again on the state read from the store: a session that
alternates between replicas pays one wasted run per switch, a session served by one replica
never reads its state.

Entries are private copies: a batch's new states are views into one batched tensor, which a
single cached view would keep alive whole. They are bounded by their bytes, least recently
written out first.
"""

from __future__ import annotations

from collections import OrderedDict

from service.state.codec import StateRecord
from service.state.store import VersionedState


def _nbytes(record: StateRecord) -> int:
    return sum(tensor.nbytes for tensor in record.tensors.values())


class WrittenStates:
    """Store key -> the `VersionedState` this replica last wrote, within `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._states: OrderedDict[str, tuple[VersionedState, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def get(self, key: str) -> VersionedState | None:
        entry = self._states.get(key)
        return None if entry is None else entry[0]

    def put(self, key: str, record: StateRecord, version: int) -> None:
        """Remember that `record` was written under `key` at `version` (a copy of it)."""
        self.drop(key)
        size = _nbytes(record)
        if size > self.max_bytes:
            return
        self._states[key] = (VersionedState(record.copy(), version), size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._states.popitem(last=False)
            self.bytes -= evicted

    def drop(self, key: str) -> None:
        """Forget `key` (its write failed, or the session is gone or changed)."""
        entry = self._states.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]
