"""Session state store: the async interface every store implements.

Every session state is kept under `<prefix>:session:<id>` as an encoded blob (see
`codec`) together with an integer version that grows by one on every write. A write is a
compare-and-set on that version, so two replicas that load the
same state and both try to store their next step cannot both succeed: the loser gets
`StaleVersionError` and `update` reloads and re-applies its change. Every write refreshes the
key's time to live; once it lapses the session is gone (`get` returns None).

A session's first version is drawn at random from [1, 2**48] on `create`, so a version names
one incarnation of a key: a session deleted (or expired) and created again under the same id
does not repeat the versions of the one before, except by a chance of about (its writes) in
2**48. That is what lets a replica continue a session from the state it last wrote itself,
without reading it back: if anyone else wrote since, or the session was re-created, the
compare-and-set fails instead of overwriting the newer state.

Beside sessions the store keeps small generic records with their own TTL under
`<prefix>:<namespace>:<key>` (predictions awaiting label feedback, online conformal levels,
counters).

`StateStore` implements all of this on top of a handful of raw blob primitives; a backend
(in-process in `memory_store`, Redis in `redis_store`) supplies those primitives, and
`factory.open_state_store` picks one. Batch methods
(`get_many`, `cas_many`) exist so the micro-batcher can load and store a whole batch in one
round trip; they report per-session failures in place instead of failing the whole batch.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import random
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import orjson

from service.state.codec import (
    CorruptStateError,
    StateCodecError,
    StateRecord,
    StateSignature,
    decode_state,
    encode_state,
)

DEFAULT_PREFIX = "neuroserve"
SESSION_NAMESPACE = "session"
DEFAULT_UPDATE_RETRIES = 16

_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # no braces: they are cluster hash tags
_NAMESPACE_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_KEY_PATTERN = re.compile(r"[!-~]{1,256}")  # printable ASCII without spaces
_FIELD_PATTERN = re.compile(r"[!-~]{1,128}")
INT64_RANGE = (-(1 << 63), (1 << 63) - 1)  # what a counter may hold, as in Redis
# First versions are drawn from [1, FIRST_VERSION_SPAN]; a version stays exact in a Lua number
# (a double: integers up to 2**53) for 2**53 - 2**48 writes.
FIRST_VERSION_SPAN = 1 << 48


class StateStoreError(Exception):
    """Root of the state store's errors."""


class StateStoreUnavailableError(StateStoreError):
    """The backing store cannot be reached or cannot serve right now (answer 503)."""


class StateExistsError(StateStoreError):
    """`create` found the session already there."""


class StateNotFoundError(StateStoreError):
    """The session does not exist (never created, deleted, or expired)."""


class StaleVersionError(StateStoreError):
    """A compare-and-set lost: someone else wrote the session since it was read."""


class VersionedState(NamedTuple):
    """A decoded session state and the version it was stored under."""

    record: StateRecord
    version: int


class CasWrite(NamedTuple):
    """One write of a `cas_many` batch."""

    session_id: str
    record: StateRecord
    expected_version: int
    ttl: float


# What a batch method returns per session when that one session failed.
LoadOutcome = VersionedState | None | StateCodecError
CasOutcome = int | StaleVersionError | StateNotFoundError | CorruptStateError
# (blob, version), None when missing, or the error of an entry that is not a session at all.
RawLoad = tuple[bytes, int] | None | StateCodecError
UpdateFn = Callable[[StateRecord], StateRecord | Awaitable[StateRecord]]


class StateStore(ABC):
    """The async state store contract; subclasses implement the raw primitives below."""

    def __init__(self, *, prefix: str = DEFAULT_PREFIX, seed: int = 0) -> None:
        if not isinstance(prefix, str) or not _PREFIX_PATTERN.fullmatch(prefix):
            raise ValueError(
                f"state store prefix must be 1-64 characters of letters, digits and _.:- ; "
                f"got {prefix!r}"
            )
        self.prefix = prefix
        self._backoff_rng = random.Random(seed)  # jitter for `update` retries

    # --- raw primitives: full keys, blobs and TTLs in milliseconds ------------------------

    @abstractmethod
    async def _create_raw(self, key: str, blob: bytes, ttl_ms: int, version: int) -> bool:
        """Store `blob` at `version` unless `key` exists; True if stored."""

    @abstractmethod
    async def _get_raw_many(self, keys: Sequence[str], touch_ttl_ms: int | None) -> list[RawLoad]:
        """(blob, version) or None per key, refreshing each found key's TTL if asked."""

    @abstractmethod
    async def _cas_raw_many(
        self, writes: Sequence[tuple[str, bytes, int, int]]
    ) -> list[int | None]:
        """Per (key, blob, expected version, ttl_ms): the new version when the stored version
        equals the expected one, 0 when the key is missing, minus the current version else,
        None when the key holds something that is no readable session (written by hand)."""

    @abstractmethod
    async def _delete_raw(self, key: str) -> bool: ...

    @abstractmethod
    async def _touch_raw(self, key: str, ttl_ms: int) -> bool: ...

    @abstractmethod
    async def _put_raw(self, key: str, value: bytes, ttl_ms: int | None) -> None: ...

    @abstractmethod
    async def _put_raw_many(self, items: Sequence[tuple[str, bytes]], ttl_ms: int | None) -> None:
        """Store every (key, value), in one round trip where the store has round trips."""

    @abstractmethod
    async def _get_raw(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def _incr_raw(self, key: str, amount: int, ttl_ms: int | None) -> int: ...

    @abstractmethod
    async def _incr_fields_raw(
        self, key: str, increments: Sequence[tuple[str, int]], ttl_ms: int | None
    ) -> dict[str, int]:
        """Add to integer fields of the hash at `key` in one atomic step; all its fields."""

    @abstractmethod
    async def _get_fields_raw(self, key: str) -> dict[str, int]: ...

    @abstractmethod
    async def ping(self) -> None:
        """Return when the store can serve; raise `StateStoreUnavailableError` otherwise."""

    async def close(self) -> None:  # noqa: B027 - nothing to release unless overridden
        """Release connections; the store must not be used afterwards."""

    async def __aenter__(self) -> StateStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- key names ------------------------------------------------------------------------

    def session_key(self, session_id: str) -> str:
        return f"{self.prefix}:{SESSION_NAMESPACE}:{_check_key(session_id, 'session id')}"

    def record_key(self, namespace: str, key: str) -> str:
        if not isinstance(namespace, str) or not _NAMESPACE_PATTERN.fullmatch(namespace):
            raise ValueError(
                f"record namespace must be 1-64 characters of a-z, 0-9 and _.- starting with a "
                f"letter or digit; got {namespace!r}"
            )
        if namespace == SESSION_NAMESPACE:
            raise ValueError(f"record namespace {SESSION_NAMESPACE!r} is reserved for sessions")
        return f"{self.prefix}:{namespace}:{_check_key(key, 'record key')}"

    # --- sessions -------------------------------------------------------------------------

    async def create(self, session_id: str, record: StateRecord, ttl: float) -> int:
        """Store a new session at a random first version (see the module docstring) and
        return it; `StateExistsError` if the id is taken."""
        key = self.session_key(session_id)
        version = first_version()
        if not await self._create_raw(key, encode_state(record), _ttl_ms(ttl), version):
            raise StateExistsError(f"session {session_id!r} already exists")
        return version

    async def get(
        self,
        session_id: str,
        *,
        expected: StateSignature | None = None,
        touch_ttl: float | None = None,
    ) -> VersionedState | None:
        """The session's state and version, or None if there is none.

        Raises `CorruptStateError` / `IncompatibleStateError` (from `codec`) when the
        stored state is damaged or does not match `expected`. With `touch_ttl` the read also
        counts as use and restarts the session's TTL.
        """
        (outcome,) = await self.get_many([session_id], expected=expected, touch_ttl=touch_ttl)
        if isinstance(outcome, StateCodecError):
            raise outcome
        return outcome

    async def get_many(
        self,
        session_ids: Sequence[str],
        *,
        expected: StateSignature | None = None,
        touch_ttl: float | None = None,
    ) -> list[LoadOutcome]:
        """Load many sessions in one round trip; per id: the state, None, or the decode error."""
        keys = [self.session_key(session_id) for session_id in session_ids]
        touch_ms = None if touch_ttl is None else _ttl_ms(touch_ttl)
        raw = await self._get_raw_many(keys, touch_ms) if keys else []
        outcomes: list[LoadOutcome] = []
        for found in raw:
            if found is None or isinstance(found, StateCodecError):
                outcomes.append(found)
                continue
            blob, version = found
            try:
                outcomes.append(VersionedState(decode_state(blob, expected), version))
            except StateCodecError as exc:
                outcomes.append(exc)
        return outcomes

    async def compare_and_set(
        self, session_id: str, record: StateRecord, expected_version: int, ttl: float
    ) -> int:
        """Write `record` if the stored version is still `expected_version`; the new version.

        Raises `StaleVersionError` if another write came first, `StateNotFoundError` if the
        session has gone (a write never brings a deleted or expired session back),
        `CorruptStateError` if the key holds no readable session.
        """
        write = CasWrite(session_id, record, expected_version, ttl)
        (outcome,) = await self.cas_many([write])
        if isinstance(outcome, (StateStoreError, CorruptStateError)):
            raise outcome
        return outcome

    async def cas_many(self, writes: Sequence[CasWrite]) -> list[CasOutcome]:
        """Compare-and-set many sessions in one round trip; each succeeds or fails alone.

        Per write: the new version, or the `StaleVersionError` / `StateNotFoundError` it met,
        or `CorruptStateError` when the key holds no readable session (nothing is written;
        reading it says what is wrong).
        """
        raw_writes = []
        for write in writes:
            if not _is_version(write.expected_version):
                raise ValueError(
                    f"expected_version must be a positive integer, got {write.expected_version!r}"
                )
            raw_writes.append(
                (
                    self.session_key(write.session_id),
                    encode_state(write.record),
                    write.expected_version,
                    _ttl_ms(write.ttl),
                )
            )
        results = await self._cas_raw_many(raw_writes) if raw_writes else []
        outcomes: list[CasOutcome] = []
        for write, result in zip(writes, results, strict=True):
            if result is None:
                outcomes.append(
                    CorruptStateError(f"session {write.session_id!r} holds no readable state")
                )
            elif result > 0:
                outcomes.append(result)
            elif result == 0:
                outcomes.append(StateNotFoundError(f"session {write.session_id!r} not found"))
            else:
                outcomes.append(
                    StaleVersionError(
                        f"session {write.session_id!r} is at version {-result}, not "
                        f"{write.expected_version}: it was written concurrently"
                    )
                )
        return outcomes

    async def update(
        self,
        session_id: str,
        fn: UpdateFn,
        ttl: float,
        *,
        retries: int = DEFAULT_UPDATE_RETRIES,
        expected: StateSignature | None = None,
    ) -> VersionedState:
        """Read, apply `fn` (sync or async) and compare-and-set, retrying on conflict.

        `fn` may run several times, each time on the freshest state, so it must not have side
        effects beyond computing the new record. Retries wait a jittered, growing pause so
        that contending writers spread out. Raises `StaleVersionError` after `retries`
        conflicts in a row and `StateNotFoundError` if the session does not exist.
        """
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
        for attempt in range(retries + 1):
            current = await self.get(session_id, expected=expected)
            if current is None:
                raise StateNotFoundError(f"session {session_id!r} not found")
            new_record = fn(current.record)
            if inspect.isawaitable(new_record):
                new_record = await new_record
            try:
                version = await self.compare_and_set(session_id, new_record, current.version, ttl)
            except StaleVersionError:
                if attempt == retries:
                    raise StaleVersionError(
                        f"session {session_id!r} kept changing: gave up after "
                        f"{retries + 1} attempts"
                    ) from None
                await asyncio.sleep(self._backoff_seconds(attempt))
            else:
                return VersionedState(new_record, version)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def delete(self, session_id: str) -> bool:
        """Remove the session; True if it existed."""
        return await self._delete_raw(self.session_key(session_id))

    async def touch(self, session_id: str, ttl: float) -> bool:
        """Restart the session's TTL; True if it existed."""
        return await self._touch_raw(self.session_key(session_id), _ttl_ms(ttl))

    def _backoff_seconds(self, attempt: int) -> float:
        # "Full jitter": uniform in [0, min(cap, base * 2**attempt)], base 1 ms, cap 50 ms.
        return self._backoff_rng.uniform(0.0, min(0.05, 0.001 * 2**attempt))

    # --- generic TTL records --------------------------------------------------------------

    async def put_record(self, namespace: str, key: str, value: bytes, ttl: float | None) -> None:
        """Store bytes under `<prefix>:<namespace>:<key>`; `ttl=None` keeps it until deleted."""
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"record value must be bytes, got {type(value).__name__}")
        ttl_ms = None if ttl is None else _ttl_ms(ttl)
        await self._put_raw(self.record_key(namespace, key), bytes(value), ttl_ms)

    async def put_json_many(
        self, namespace: str, items: Sequence[tuple[str, Any]], ttl: float | None
    ) -> None:
        """`put_json` for many (key, value) at once: one round trip for a whole batch."""
        if not items:
            return
        ttl_ms = None if ttl is None else _ttl_ms(ttl)
        await self._put_raw_many(
            [(self.record_key(namespace, key), _json_bytes(value)) for key, value in items], ttl_ms
        )

    async def get_record(self, namespace: str, key: str) -> bytes | None:
        return await self._get_raw(self.record_key(namespace, key))

    async def put_json(self, namespace: str, key: str, value: Any, ttl: float | None) -> None:
        """Store a JSON value (finite numbers only) as a record."""
        await self.put_record(namespace, key, _json_bytes(value), ttl)

    async def get_json(self, namespace: str, key: str) -> Any | None:
        """The JSON value of a record, or None when absent."""
        raw = await self.get_record(namespace, key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"record {namespace}:{key} does not hold JSON: {exc}") from exc

    async def delete_record(self, namespace: str, key: str) -> bool:
        return await self._delete_raw(self.record_key(namespace, key))

    async def incr(
        self, namespace: str, key: str, amount: int = 1, ttl: float | None = None
    ) -> int:
        """Atomically add `amount` to an integer record (missing counts as 0); the new value.

        With `ttl` the record's TTL restarts; without, any TTL it had is kept. Raises
        `ValueError` when the record holds something other than a 64-bit integer.
        """
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError(f"amount must be an integer, got {type(amount).__name__}")
        if not INT64_RANGE[0] <= amount <= INT64_RANGE[1]:
            raise ValueError(f"amount {amount} is outside the 64-bit integer range")
        ttl_ms = None if ttl is None else _ttl_ms(ttl)
        return await self._incr_raw(self.record_key(namespace, key), amount, ttl_ms)

    async def incr_fields(
        self,
        namespace: str,
        key: str,
        increments: dict[str, int],
        ttl: float | None = None,
    ) -> dict[str, int]:
        """Atomically add to several integer fields of one record (missing fields count as 0)
        and return every field of it afterwards: counters that must move together (labels
        seen and labels missed) never show one update without the other, to any reader.

        With `ttl` the record's TTL restarts; without, any TTL it had is kept. Field names
        are 1-128 printable ASCII characters without spaces.
        """
        if not increments:
            raise ValueError("incr_fields needs at least one field to increment")
        pairs = []
        for field_name, amount in increments.items():
            if not isinstance(field_name, str) or not _FIELD_PATTERN.fullmatch(field_name):
                raise ValueError(
                    f"field names must be 1-128 printable ASCII characters without spaces, "
                    f"got {field_name!r}"
                )
            if isinstance(amount, bool) or not isinstance(amount, int):
                raise TypeError(f"amount must be an integer, got {type(amount).__name__}")
            if not INT64_RANGE[0] <= amount <= INT64_RANGE[1]:
                raise ValueError(f"amount {amount} is outside the 64-bit integer range")
            pairs.append((field_name, amount))
        ttl_ms = None if ttl is None else _ttl_ms(ttl)
        return await self._incr_fields_raw(self.record_key(namespace, key), pairs, ttl_ms)

    async def get_fields(self, namespace: str, key: str) -> dict[str, int]:
        """Every field of a record written by `incr_fields` ({} when absent)."""
        return await self._get_fields_raw(self.record_key(namespace, key))


# --- helpers -------------------------------------------------------------------------------


def _json_bytes(value: Any) -> bytes:
    """Compact JSON of `value`, refusing NaN and infinities (orjson would write them as null,
    so the floats are checked first; check and orjson together cost 60% of json's time)."""
    if not _finite(value):
        raise ValueError("record value is not JSON-serialisable: out of range float values")
    try:
        return orjson.dumps(value)
    except TypeError as exc:
        raise ValueError(f"record value is not JSON-serialisable: {exc}") from exc


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in `value` (JSON-like nesting)."""
    kind = type(value)
    if kind is dict:
        items: Any = value.values()
    elif kind is list or kind is tuple:
        items = value
    else:
        return not isinstance(value, float) or math.isfinite(value)  # float subclasses too
    for item in items:  # scalars inline: a record is mostly scalars
        kind = type(item)
        if kind is float:
            if not math.isfinite(item):
                return False
        elif (
            kind is not str and kind is not int and kind is not bool and item is not None
        ) and not _finite(item):
            return False
    return True


def _ttl_ms(ttl: float) -> int:
    """A TTL in whole milliseconds, rounded up so a TTL never shortens."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
        raise ValueError(f"ttl must be a finite number of seconds, got {ttl!r}")
    if ttl <= 0:
        raise ValueError(f"ttl must be positive, got {ttl!r} seconds")
    return max(1, math.ceil(ttl * 1000))


def _check_key(key: Any, what: str) -> str:
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"{what} must be 1-256 printable ASCII characters without spaces, got {key!r}"
        )
    return key


def first_version() -> int:
    """A new session's first version: random, from the OS, so that no two replicas (or
    incarnations of one id) draw the same sequence."""
    return 1 + secrets.randbelow(FIRST_VERSION_SPAN)


def _is_version(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
