"""Per-key limits of one replica: request rate, live sessions and active jobs.

Each limit is counted per API key (its principal's name; the one anonymous principal in open
mode) and per replica: replicas do not share these counts, so with N replicas a key may
reach up to N times each limit. A refusal is a 429 whose message names the limit and the
setting that sets it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.auth import is_open_path
from service.api.error_handlers import error_response
from service.errors import RateLimitedError


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
    0 turns it off."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1))
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, key_name: str) -> None:
        """RateLimitedError (429, `retry_after_seconds` set) when the key has no token left."""
        if self.rate <= 0:
            return
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
            self.rates.check(principal.name)
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
