"""Connecting to Redis: the URL forms, and the redis-py client with its pool and timeouts.

The state store (`redis_store`) connects through here; the job queue parses the same URLs.

URL forms, recognised by scheme:

    redis://[[user]:password@]host[:6379][/db]        plain TCP (redis-py's own URL parsing,
    rediss://...                                       so its query options work too)
    unix://[[user]:password@]/path/to.sock[?db=0]      TLS; Unix socket
    redis+sentinel://[[user]:password@]host[:26379][,host[:26379]...]/master-name[/db]
    rediss+sentinel://...                              Sentinel (TLS to the master)
    redis+cluster://[[user]:password@]host[:6379][,host[:6379]...]
    rediss+cluster://...                               Cluster (database 0 only)

For Sentinel, the credentials in the URL are for the master; a query parameter
`sentinel_password=` (and `sentinel_username=`) authenticates to the sentinels themselves.

Connections come from a blocking pool: when all `max_connections` are busy, a request waits up
to `pool_timeout` seconds for one instead of failing at once, so a burst queues rather than
answering 503.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as redis_asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff

_SENTINEL_DEFAULT_PORT = 26379
_REDIS_DEFAULT_PORT = 6379


@dataclass(frozen=True)
class RedisTarget:
    """Where and how to connect, as recognised from a URL by `parse_redis_url`."""

    kind: Literal["standalone", "sentinel", "cluster"]
    url: str
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels or cluster seed nodes
    service_name: str | None = None  # the Sentinel master's name
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    @property
    def redacted_url(self) -> str:
        """The URL with any password replaced by `***`, for logs and error messages."""
        return redact_url(self.url)


def parse_redis_url(url: str) -> RedisTarget:
    """Recognise the URL form (see the module docstring); `ValueError` for anything else."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"not a Redis URL: {redact_url(str(url))!r}")
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget("standalone", url, tls=scheme == "rediss")
    base, _, mode = scheme.partition("+")
    if base not in ("redis", "rediss") or mode not in ("sentinel", "cluster"):
        raise ValueError(
            f"unsupported Redis URL scheme {scheme!r}: use redis://, rediss://, unix://, "
            f"redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://"
        )
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, password = _split_userinfo(userinfo)
    default_port = _SENTINEL_DEFAULT_PORT if mode == "sentinel" else _REDIS_DEFAULT_PORT
    nodes = tuple(_parse_node(node, default_port, url) for node in hostlist.split(","))
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    path = [unquote(p) for p in parts.path.split("/") if p]
    if mode == "cluster":
        if path not in ([], ["0"]):
            raise ValueError(f"a Redis Cluster has only database 0: {redact_url(url)!r}")
        return RedisTarget(
            "cluster",
            url,
            tls=base == "rediss",
            nodes=nodes,
            username=username,
            password=password,
        )
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(
            f"a Sentinel URL needs the master name as its path, then optionally the database: "
            f"redis+sentinel://host:26379/mymaster/0, got {redact_url(url)!r}"
        )
    return RedisTarget(
        "sentinel",
        url,
        tls=base == "rediss",
        nodes=nodes,
        service_name=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        username=username,
        password=password,
        sentinel_username=query.get("sentinel_username"),
        sentinel_password=query.get("sentinel_password"),
    )


def redact_url(url: str) -> str:
    """Replace the password in a URL's userinfo (and `password=` options) with `***`."""
    url = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
    return re.sub(r"((?:sentinel_)?password=)[^&]*", r"\1***", url)


@dataclass(frozen=True)
class ConnectionOptions:
    """How patient the client is. Small defaults: a dead Redis should cost ~1 s, not 10."""

    socket_timeout: float = 1.0
    connect_timeout: float = 1.0
    retries: int = 1  # extra attempts after a connection error, with jittered backoff
    max_connections: int = 64
    pool_timeout: float = 5.0  # how long a request waits for a free connection
    extra: dict[str, Any] = field(default_factory=dict)  # passed on to redis-py


def connect(target: RedisTarget, options: ConnectionOptions) -> tuple[Any, list[Any]]:
    """Build (lazily connecting) the redis-py client for `target`.

    Returns the client and any helper clients to close with it (the sentinels).
    """
    retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), options.retries)
    common = {
        "socket_timeout": options.socket_timeout,
        "socket_connect_timeout": options.connect_timeout,
        "retry": retry,
        **options.extra,
    }
    if target.kind == "standalone":
        pool = redis_asyncio.BlockingConnectionPool.from_url(
            target.url,
            max_connections=options.max_connections,
            timeout=options.pool_timeout,
            **common,
        )
        return redis_asyncio.Redis.from_pool(pool), []
    if target.kind == "cluster":
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            username=target.username,
            password=target.password,
            ssl=target.tls,
            max_connections=options.max_connections,
            **common,
        )
        return client, []
    sentinel_auth = {
        "username": target.sentinel_username,
        "password": target.sentinel_password,
    }
    sentinel = Sentinel(
        list(target.nodes),
        sentinel_kwargs={
            "socket_timeout": options.socket_timeout,
            "socket_connect_timeout": options.connect_timeout,
            "retry": retry,
            **{k: v for k, v in sentinel_auth.items() if v is not None},
        },
    )
    client = sentinel.master_for(
        target.service_name,
        connection_pool_class=BlockingSentinelConnectionPool,
        db=target.db,
        username=target.username,
        password=target.password,
        ssl=target.tls,
        max_connections=options.max_connections,
        timeout=options.pool_timeout,
        **common,
    )
    return client, list(sentinel.sentinels)


class BlockingSentinelConnectionPool(SentinelConnectionPool, redis_asyncio.BlockingConnectionPool):
    """Sentinel's master discovery with the blocking pool's wait for a free connection.

    (redis-py's asyncio Cluster client keeps its own per-node connection lists and has no
    blocking variant: there `max_connections` still bounds each node without waiting.)
    """


def _split_userinfo(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, has_password, password = userinfo.partition(":")
    return unquote(user) or None, unquote(password) if has_password else None


def _parse_node(node: str, default_port: int, url: str) -> tuple[str, int]:
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:]+)(?::(\d{1,5}))?", node)
    if match is None or (match.group(2) is not None and not 0 < int(match.group(2)) < 65536):
        raise ValueError(f"bad host:port {node!r} in Redis URL {redact_url(url)!r}")
    host = match.group(1).strip("[]")
    return host, int(match.group(2)) if match.group(2) else default_port
