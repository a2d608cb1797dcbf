"""The Redis state store: redis-py's asyncio client (hiredis parser) behind `StateStore`.

A session is a Redis hash `{version, blob}`. Creating and compare-and-set are Lua scripts, so
checking the version and writing blob, version and TTL happen atomically on the server. The
scripts run by EVALSHA; when the server has lost its script cache (restart, failover, SCRIPT
FLUSH) the NOSCRIPT reply makes us load the script and run just the affected commands again.
(In a Cluster they run by EVAL: redis-py refuses EVALSHA in Cluster pipelines.) Batch loads
and stores go out as one non-transactional pipeline: one network round trip (per node, in
parallel, on a Cluster).

URL forms, connection pools and timeouts: `redis_connection`.

Every connection, timeout or failover error becomes one `StateStoreUnavailableError`, so the
service can answer 503 and report itself not ready. Timeouts and the retry count are small by
default so that an unreachable Redis is noticed within about a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis.exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from service.state.codec import CorruptStateError
from service.state.redis_connection import ConnectionOptions, connect, parse_redis_url
from service.state.store import (
    DEFAULT_PREFIX,
    RawLoad,
    StateStore,
    StateStoreError,
    StateStoreUnavailableError,
)

# KEYS[1] = session key; ARGV = blob, ttl in ms, first version. Returns 1 if created, 0 if the
# key exists.
CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[3], 'blob', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] = session key; ARGV = expected version, blob, ttl in ms.
# Returns the new version; 0 when the key is gone; minus the current version when it moved on.
# Versions are compared as Lua numbers (exact up to 2**53) and counted by HINCRBY, so Redis
# keeps them as integers, never as a formatted float.
# A key that holds no readable session (another Redis type, a version that is not a number)
# answers false (nil): damaged state, which the writer reads back to report.
CAS_SCRIPT = """
local current = redis.pcall('HGET', KEYS[1], 'version')
if type(current) == 'table' then return false end
if not current then return 0 end
if not string.match(current, '^%d+$') then return false end
current = tonumber(current)
if current ~= tonumber(ARGV[1]) then return -current end
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'blob', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return version
"""

# The batch forms of the scripts above, for one round trip and one command per micro-batch
# (outside Redis Cluster, where a batch's keys may live on different nodes). A key holding
# another Redis type is reported per key (pcall), never failing the batch half-written.

# KEYS = session keys; ARGV = ttl in ms to touch (0: no touch). Per key: {version, blob},
# {} when absent, or {'WRONGTYPE'}.
LOAD_MANY_SCRIPT = """
local loads = {}
for i = 1, #KEYS do
  local reply = redis.pcall('HMGET', KEYS[i], 'version', 'blob')
  if type(reply) == 'table' and reply.err then
    loads[i] = {'WRONGTYPE'}
  elseif reply[1] and reply[2] then
    if tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
    loads[i] = reply
  else
    loads[i] = {}
  end
end
return loads
"""

# KEYS = session keys; ARGV = (expected version, blob, ttl in ms) per key. Per key: as
# CAS_SCRIPT.
CAS_MANY_SCRIPT = """
local results = {}
for i = 1, #KEYS do
  local base = 3 * (i - 1)
  local current = redis.pcall('HGET', KEYS[i], 'version')
  if type(current) == 'table' or (current and not string.match(current, '^%d+$')) then
    results[i] = false
  elseif not current then
    results[i] = 0
  else
    current = tonumber(current)
    if current ~= tonumber(ARGV[base + 1]) then
      results[i] = -current
    else
      results[i] = redis.call('HINCRBY', KEYS[i], 'version', 1)
      redis.call('HSET', KEYS[i], 'blob', ARGV[base + 2])
      redis.call('PEXPIRE', KEYS[i], ARGV[base + 3])
    end
  end
end
return results
"""

# KEYS = record keys; ARGV[1] = ttl in ms (0: none), then one value per key.
PUT_MANY_SCRIPT = """
for i = 1, #KEYS do
  if tonumber(ARGV[1]) > 0 then
    redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', ARGV[1])
  else
    redis.call('SET', KEYS[i], ARGV[i + 1])
  end
end
return #KEYS
"""

# KEYS[1] = hash key; ARGV = ttl in ms (0: keep), then field, amount pairs.
# Adds every amount in one atomic step and returns the whole hash (HGETALL's flat list). Redis
# does not undo a script's earlier writes when a later command fails, so a field that cannot
# move (not an integer, overflow) puts back the fields already moved before the error returns.
INCR_FIELDS_SCRIPT = """
local old = {}
for i = 2, #ARGV, 2 do
  old[i] = redis.call('HGET', KEYS[1], ARGV[i]) or false
  local reply = redis.pcall('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  if type(reply) == 'table' and reply.err then
    for j = i - 2, 2, -2 do
      if old[j] then redis.call('HSET', KEYS[1], ARGV[j], old[j])
      else redis.call('HDEL', KEYS[1], ARGV[j]) end
    end
    return reply
  end
end
if tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return redis.call('HGETALL', KEYS[1])
"""

# Errors that mean "the store cannot serve right now", not "the request was wrong".
_UNAVAILABLE_ERRORS = (
    redis_errors.ConnectionError,  # includes BusyLoading, MaxConnections, auth failures
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # writing to a replica during failover
    redis_errors.OutOfMemoryError,
    redis_errors.ClusterDownError,  # includes MasterDownError
    redis_errors.TryAgainError,
    redis_errors.RedisClusterException,
    asyncio.TimeoutError,
    OSError,
)


class RedisStateStore(StateStore):
    """`StateStore` on Redis (standalone, Sentinel or Cluster); build with `from_url`."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = DEFAULT_PREFIX,
        seed: int = 0,
        description: str = "redis",
        helpers: Sequence[Any] = (),
    ) -> None:
        super().__init__(prefix=prefix, seed=seed)
        self._client = client
        self._helpers = list(helpers)
        self._description = description
        self._script_shas: dict[str, str] = {}
        self._is_cluster = isinstance(client, RedisCluster)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        seed: int = 0,
        socket_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        retries: int = 1,
        max_connections: int = 64,
        pool_timeout: float = 5.0,
        **redis_options: Any,
    ) -> RedisStateStore:
        """A store for any URL form in the module docstring. Connects on first use."""
        target = parse_redis_url(url)
        options = ConnectionOptions(
            socket_timeout, connect_timeout, retries, max_connections, pool_timeout, redis_options
        )
        client, helpers = connect(target, options)
        return cls(
            client,
            prefix=prefix,
            seed=seed,
            description=f"Redis {target.kind} at {target.redacted_url}",
            helpers=helpers,
        )

    def __repr__(self) -> str:
        return f"RedisStateStore({self._description}, prefix={self.prefix!r})"

    async def ping(self) -> None:
        with self._errors("PING"):
            await self._client.ping()

    async def close(self) -> None:
        for client in [self._client, *self._helpers]:
            await client.aclose()

    # --- sessions -------------------------------------------------------------------------

    async def _create_raw(self, key: str, blob: bytes, ttl_ms: int, version: int) -> bool:
        (created,) = await self._run_scripts(CREATE_SCRIPT, [(key, (blob, ttl_ms, version))])
        return created == 1

    async def _get_raw_many(self, keys: Sequence[str], touch_ttl_ms: int | None) -> list[RawLoad]:
        if not self._is_cluster:
            loads = await self._run_batch_script(LOAD_MANY_SCRIPT, keys, [touch_ttl_ms or 0])
            return [
                self._raw_load(key, _batch_load(reply))
                for key, reply in zip(keys, loads, strict=True)
            ]
        with self._errors("load"):
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, "version", "blob")
                    if touch_ttl_ms is not None:
                        pipe.pexpire(key, touch_ttl_ms)
                replies = await pipe.execute(raise_on_error=False)
        step = 1 if touch_ttl_ms is None else 2
        return [
            self._raw_load(key, reply) for key, reply in zip(keys, replies[::step], strict=True)
        ]

    def _raw_load(self, key: str, reply: Any) -> RawLoad:
        """One HMGET reply as a load. Something else written under a session's key (another
        type, a version that is not a number) is damaged state, not a store failure."""
        if isinstance(reply, redis_errors.ResponseError) and "WRONGTYPE" in str(reply):
            return CorruptStateError(f"{key} holds another Redis type, not a session hash")
        if isinstance(reply, Exception):
            self._raise_mapped(reply, "load")
        version, blob = reply
        if version is None or blob is None:
            return None
        if not version.isdigit():
            return CorruptStateError(f"{key} has a version that is not a number: {version[:32]!r}")
        return blob, int(version)

    async def _cas_raw_many(
        self, writes: Sequence[tuple[str, bytes, int, int]]
    ) -> list[int | None]:
        if not self._is_cluster:
            keys = [key for key, _, _, _ in writes]
            args = [arg for _, blob, expected, ttl_ms in writes for arg in (expected, blob, ttl_ms)]
            results = await self._run_batch_script(CAS_MANY_SCRIPT, keys, args)
        else:
            calls = [(key, (expected, blob, ttl_ms)) for key, blob, expected, ttl_ms in writes]
            results = await self._run_scripts(CAS_SCRIPT, calls)
        return [None if result is None else int(result) for result in results]

    async def _delete_raw(self, key: str) -> bool:
        with self._errors("DEL"):
            return await self._client.delete(key) == 1

    async def _touch_raw(self, key: str, ttl_ms: int) -> bool:
        with self._errors("PEXPIRE"):
            return bool(await self._client.pexpire(key, ttl_ms))

    # --- generic records ------------------------------------------------------------------

    async def _put_raw(self, key: str, value: bytes, ttl_ms: int | None) -> None:
        with self._errors("SET"):
            await self._client.set(key, value, px=ttl_ms)

    async def _put_raw_many(self, items: Sequence[tuple[str, bytes]], ttl_ms: int | None) -> None:
        if not self._is_cluster:
            keys = [key for key, _ in items]
            await self._run_batch_script(
                PUT_MANY_SCRIPT, keys, [ttl_ms or 0, *(v for _, v in items)]
            )
            return
        with self._errors("SET"):
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(key, value, px=ttl_ms)
                await pipe.execute()

    async def _get_raw(self, key: str) -> bytes | None:
        with self._errors("GET"):
            return await self._client.get(key)

    async def _incr_raw(self, key: str, amount: int, ttl_ms: int | None) -> int:
        with self._errors("INCRBY"):
            try:
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.incrby(key, amount)
                    if ttl_ms is not None:
                        pipe.pexpire(key, ttl_ms)
                    replies = await pipe.execute()
            except redis_errors.ResponseError as exc:
                if _holds_no_integers(exc):
                    raise ValueError(
                        f"record {key} does not hold a 64-bit integer or would overflow: {exc}"
                    ) from None
                raise
        return int(replies[0])

    async def _incr_fields_raw(
        self, key: str, increments: Sequence[tuple[str, int]], ttl_ms: int | None
    ) -> dict[str, int]:
        args = [ttl_ms or 0, *(item for pair in increments for item in pair)]
        try:
            (reply,) = await self._run_scripts(INCR_FIELDS_SCRIPT, [(key, tuple(args))])
        except StateStoreError as exc:
            if _holds_no_integers(exc):
                raise ValueError(f"record {key} does not hold integer fields: {exc}") from None
            raise
        return _fields_from_flat(reply)

    async def _get_fields_raw(self, key: str) -> dict[str, int]:
        with self._errors("HGETALL"):
            try:
                reply = await self._client.hgetall(key)
            except redis_errors.ResponseError as exc:
                if "WRONGTYPE" in str(exc):
                    raise ValueError(f"record {key} holds another Redis type, not a hash") from None
                raise
        try:
            return {name.decode(): int(value) for name, value in reply.items()}
        except ValueError:
            raise ValueError(f"record {key} does not hold integer fields") from None

    # --- scripts --------------------------------------------------------------------------

    async def eval_one_key(self, source: str, key: str, *args: Any) -> Any:
        """Run the Lua script `source` on one key (atomic in Redis; any deployment, Cluster
        included): what counters shared by every replica are built on (`service.api.limits`)."""
        return (await self._run_scripts(source, [(key, args)]))[0]

    async def _run_scripts(self, source: str, calls: Sequence[tuple[str, tuple]]) -> list[Any]:
        """Run the script `source` once per (key, args), all in one pipeline.

        EVALSHA, reloading on NOSCRIPT: each call touches one key and stands alone, so only
        the calls that got NOSCRIPT are run again. redis-py refuses EVALSHA in a Cluster
        pipeline, so there every call sends the source with EVAL (the server still caches
        the compiled script).
        """
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(2):
            sha = None if self._is_cluster else await self._script_sha(source, attempt > 0)
            with self._errors("EVAL"):
                async with self._client.pipeline(transaction=False) as pipe:
                    for index in pending:
                        key, args = calls[index]
                        if sha is None:
                            pipe.eval(source, 1, key, *args)
                        else:
                            pipe.evalsha(sha, 1, key, *args)
                    replies = await pipe.execute(raise_on_error=False)
            retry = []
            for index, reply in zip(pending, replies, strict=True):
                if isinstance(reply, redis_errors.NoScriptError):
                    retry.append(index)
                elif isinstance(reply, Exception):
                    self._raise_mapped(reply, "EVAL")
                else:
                    results[index] = reply
            if not retry:
                return results
            pending = retry
        raise StateStoreError("Redis kept losing the state store's Lua scripts")

    async def _run_batch_script(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One multi-key call of `source` (EVALSHA, reloaded on NOSCRIPT); not for Cluster."""
        if not keys:
            return []
        for attempt in range(2):
            sha = await self._script_sha(source, attempt > 0)
            try:
                return await self._client.evalsha(sha, len(keys), *keys, *args)
            except redis_errors.NoScriptError:
                continue  # flushed meanwhile: load it again
            except (redis_errors.RedisError, *_UNAVAILABLE_ERRORS) as exc:
                self._raise_mapped(exc, "EVALSHA")
        raise StateStoreError("Redis kept losing the state store's Lua scripts")

    async def _script_sha(self, source: str, reload: bool) -> str:
        if reload or source not in self._script_shas:
            with self._errors("SCRIPT LOAD"):
                self._script_shas[source] = await self._client.script_load(source)
        return self._script_shas[source]

    # --- errors ---------------------------------------------------------------------------

    @contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        """Turn redis-py's errors into the store's: unavailable, or a plain store error."""
        try:
            yield
        except (redis_errors.RedisError, *_UNAVAILABLE_ERRORS) as exc:
            self._raise_mapped(exc, operation)

    def _raise_mapped(self, exc: BaseException, operation: str) -> None:
        if isinstance(exc, _UNAVAILABLE_ERRORS):
            raise StateStoreUnavailableError(
                f"state store unavailable ({self._description}): {operation} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        raise StateStoreError(
            f"state store error ({self._description}): {operation} failed: {exc}"
        ) from exc


def _batch_load(reply: Any) -> Any:
    """One LOAD_MANY_SCRIPT entry in the shape of an HMGET reply (or the error it stands for)."""
    if reply == [b"WRONGTYPE"]:
        return redis_errors.ResponseError("WRONGTYPE the key holds another Redis type")
    return reply if reply else [None, None]


def _holds_no_integers(exc: BaseException) -> bool:
    text = str(exc)
    return "WRONGTYPE" in text or "not an integer" in text or "overflow" in text


def _fields_from_flat(reply: Sequence[Any]) -> dict[str, int]:
    names, values = reply[0::2], reply[1::2]
    return {
        (n.decode() if isinstance(n, bytes) else str(n)): int(v)
        for n, v in zip(names, values, strict=True)
    }
