"""Per-key limits: request rate, live sessions and active jobs.

Each limit is counted per API key (its principal's name; the one anonymous principal in open
mode). Where they are counted follows the state store:
- with Redis (NEUROSERVE_REDIS_URL), in Redis, so the limits hold across every replica: the
  rate is a token bucket and the sessions and jobs a sorted set of what each key holds (with
  expiry times), each read-and-updated by one atomic Lua script (`redis_rate_limiter`,
  `RedisQuota`);
- without, in the process (`TokenBucket`, `OwnedCount`, wrapped by `LocalQuota`).
A refusal is a 429 whose message names the limit and the setting that sets it.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.auth import is_open_path
from service.api.error_handlers import error_response
from service.errors import RateLimitedError
from service.state.redis_store import RedisStateStore
from service.state.store import StateStore


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; one token per request."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self.updated = clock()

    def take(self) -> float:
        """0.0 when a token was taken, else the seconds until one will be there."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class KeyRates:
    """At most `rate` requests a second per key (bursts of `burst`), one bucket per key. One
    object serves every protocol of a replica (HTTP and gRPC share each key's budget); `rate`
    0 turns it off. The buckets are this process's until `share_through` a Redis state
    store: then one bucket per key in Redis serves every replica."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1))
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._shared: Callable[[str], Awaitable[float]] | None = None

    def share_through(self, store: StateStore) -> None:
        """Count in Redis when `store` is the Redis store (no-op otherwise)."""
        if isinstance(store, RedisStateStore) and self.rate > 0:
            self._shared = redis_rate_limiter(store, self.rate, self.burst)

    async def check(self, key_name: str) -> None:
        """RateLimitedError (429, `retry_after_seconds` set) when the key has no token left."""
        if self.rate <= 0:
            return
        if self._shared is not None:
            wait = await self._shared(key_name)
        else:
            bucket = self._buckets.get(key_name)
            if bucket is None:
                bucket = self._buckets[key_name] = TokenBucket(self.rate, self.burst, self.clock)
            wait = bucket.take()
        if wait == 0.0:
            return
        error = RateLimitedError(
            f"request rate limit of {self.rate:g} per second per API key "
            f"(NEUROSERVE_RATE_LIMIT_PER_SECOND, bursts of NEUROSERVE_RATE_LIMIT_BURST="
            f"{self.burst:g}) reached; retry after {wait:.2f} s"
        )
        error.retry_after_seconds = wait
        raise error


class RequestRateLimit:
    """Middleware: `KeyRates` over HTTP, 429 with `Retry-After` beyond. Runs inside
    `ApiKeyAuth`, which names the key; open paths (health, metrics) are never limited."""

    def __init__(self, app: ASGIApp, rates: KeyRates) -> None:
        self.app = app
        self.rates = rates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = scope.get("state", {}).get("principal")
        if scope["type"] != "http" or principal is None or is_open_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            await self.rates.check(principal.name)
        except RateLimitedError as error:
            connection = HTTPConnection(scope)
            response = error_response(connection, error.status_code, error.code, error.message)  # type: ignore[arg-type]
            response.headers["Retry-After"] = str(
                max(1, math.ceil(error.retry_after_seconds or 1.0))
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class OwnedCount:
    """Things (sessions, jobs) each owner holds on this replica, with when each lapses."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._held: dict[str, dict[str, float]] = {}

    def count(self, owner: str) -> int:
        held = self._held.get(owner, {})
        now = self.clock()
        for key in [k for k, until in held.items() if until <= now]:
            del held[key]
        return len(held)

    def seen(self, owner: str, key: str, until: float = math.inf) -> None:
        self._held.setdefault(owner, {})[key] = until

    def gone(self, owner: str, key: str) -> None:
        self._held.get(owner, {}).pop(key, None)

    def keys(self, owner: str) -> list[str]:
        return list(self._held.get(owner, {}))

    def check(self, owner: str, limit: int, what: str, setting: str) -> None:
        """RateLimitedError (429) when `owner` already holds `limit`."""
        if self.count(owner) >= limit:
            raise RateLimitedError(
                f"this API key holds its limit of {limit} {what} on this server "
                f"({setting}); end some first"
            )


# ---- limits shared by every replica (Redis) --------------------------------------------------

RATE_NAMESPACE = "rate-limit"  # state-store record namespaces of the shared counts

# KEYS[1]: the bucket (hash tokens, updated); ARGV: rate per second, burst. Redis's own clock,
# so replicas with skewed clocks share one bucket fairly. Returns the wait in seconds (0: taken).
_TAKE_TOKEN = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1]) or burst
local updated = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""

# KEYS[1]: what an owner holds (sorted set: member -> expiry, epoch seconds); ARGV: member,
# expiry, limit, now. Drops what lapsed, then adds the member unless the owner holds `limit`
# others. 1: added (or refreshed); 0: at the limit.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], 7 * 24 * 3600)
  return 1
end
return 0
"""
# KEYS[1]: as above; ARGV: member, expiry ('' removes it), now. Returns the members held.
_UPDATE = """
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
elseif ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], 7 * 24 * 3600)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
RESERVATION_SECONDS = 60.0  # a place taken for something being created, until it is


def redis_rate_limiter(
    store: RedisStateStore, rate: float, burst: float
) -> Callable[[str], Awaitable[float]]:
    """`take(name)` on a token bucket in Redis shared by every replica: 0.0 when a token
    was taken, else the seconds until one will be there."""

    async def take(name: str) -> float:
        key = store.record_key(RATE_NAMESPACE, _member(name))
        return float(await store.eval_one_key(_TAKE_TOKEN, key, repr(rate), repr(burst)))

    return take


def _member(name: str) -> str:
    """A principal's name as a record key (any text: hex-encoded when it is not plain)."""
    plain = name.replace("-", "").replace("_", "").replace(".", "").isalnum()
    return name if plain and name.isascii() and len(name) <= 128 else "x" + name.encode().hex()


def _limit_error(limit: int, what: str, setting: str, where: str) -> RateLimitedError:
    return RateLimitedError(
        f"this API key holds its limit of {limit} {what} {where} ({setting}); end some first"
    )


class LocalQuota:
    """What each key holds (sessions, jobs), counted in this process (`OwnedCount`)."""

    where = "on this server"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.count = OwnedCount(clock)

    async def reserve(self, owner: str, limit: int, what: str, setting: str) -> str:
        """A place for one more, or RateLimitedError (429) at the limit: its token, to hand
        to `seen` (with the real key) or `gone`."""
        if self.count.count(owner) >= limit:
            raise _limit_error(limit, what, setting, self.where)
        token = f"reserved-{uuid.uuid4().hex}"
        self.count.seen(owner, token, self.count.clock() + RESERVATION_SECONDS)
        return token

    async def seen(self, owner: str, key: str, until: float = math.inf) -> None:
        self.count.seen(owner, key, until)

    async def gone(self, owner: str, key: str) -> None:
        self.count.gone(owner, key)

    async def keys(self, owner: str) -> list[str]:
        self.count.count(owner)  # drops what lapsed
        return [k for k in self.count.keys(owner) if not k.startswith("reserved-")]


class RedisQuota:
    """What each key holds, counted in Redis so that every replica sees one count: a sorted
    set per key and namespace, member -> expiry, changed only by atomic scripts."""

    where = "across all replicas"

    def __init__(self, store: RedisStateStore, namespace: str) -> None:
        self.store, self.namespace = store, namespace
        self._sent: dict[tuple[str, str], float] = {}  # (owner, key) -> expiry last written

    def _key(self, owner: str) -> str:
        return self.store.record_key(self.namespace, _member(owner))

    async def reserve(self, owner: str, limit: int, what: str, setting: str) -> str:
        token = f"reserved-{uuid.uuid4().hex}"
        until = time.time() + RESERVATION_SECONDS
        args = (token, repr(until), limit, repr(time.time()))
        if not int(await self.store.eval_one_key(_ACQUIRE, self._key(owner), *args)):
            raise _limit_error(limit, what, setting, self.where)
        return token

    async def seen(self, owner: str, key: str, until: float = math.inf) -> None:
        # A session is seen on every use; its expiry is written again only once a quarter
        # of its time to live has passed (one Redis call per session per quarter TTL).
        now = time.time()
        sent = self._sent.get((owner, key))
        if sent is not None and until - sent <= max(1.0, (until - now) / 4):
            return
        expiry = "+inf" if math.isinf(until) else repr(until)
        await self.store.eval_one_key(_UPDATE, self._key(owner), key, expiry, repr(now))
        self._sent[(owner, key)] = until
        if len(self._sent) > 100_000:  # bounded: forgetting only costs an early rewrite
            self._sent.clear()

    async def gone(self, owner: str, key: str) -> None:
        self._sent.pop((owner, key), None)
        await self.store.eval_one_key(_UPDATE, self._key(owner), key, "", repr(time.time()))

    async def keys(self, owner: str) -> list[str]:
        held = await self.store.eval_one_key(_UPDATE, self._key(owner), "", "", repr(time.time()))
        names = [k.decode() if isinstance(k, bytes) else str(k) for k in held]
        return [k for k in names if not k.startswith("reserved-")]


def key_quota(store: StateStore, namespace: str) -> LocalQuota | RedisQuota:
    """Per-key counts shared by every replica when the state store is Redis, else local."""
    if isinstance(store, RedisStateStore):
        return RedisQuota(store, namespace)
    return LocalQuota()
