"""Which state store a server uses: Redis when a URL is configured, else the in-process one.

The two implementations share one contract (`service.state.store.StateStore`): the embedded
`InMemoryStateStore` (`service.state.memory_store`) and `RedisStateStore`
(`service.state.redis_store`; the URL forms are listed in `service.state.redis_connection`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.state.memory_store import InMemoryStateStore
from service.state.redis_store import RedisStateStore
from service.state.store import DEFAULT_PREFIX, StateStore


def open_state_store(
    redis_url: str | None,
    *,
    prefix: str = DEFAULT_PREFIX,
    in_process_caps: Mapping[str, int] | None = None,
    **options: Any,
) -> StateStore:
    """The Redis store for `redis_url`, or the in-process store when no URL is configured.
    `in_process_caps` (record namespace -> most records kept) bounds the in-process store's
    memory (Redis bounds its own: `maxmemory`); `options` go to the Redis store."""
    if redis_url is None or redis_url == "":
        if options:
            raise ValueError(f"options {sorted(options)} only apply to a Redis state store")
        return InMemoryStateStore(prefix=prefix, capped=in_process_caps)
    return RedisStateStore.from_url(redis_url, prefix=prefix, **options)
