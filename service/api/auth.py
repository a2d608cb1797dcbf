"""API keys: who is calling, and whether they may.

Keys are configured as sha256 hex digests (`NEUROSERVE_API_KEYS`, `NEUROSERVE_ADMIN_API_KEYS`),
each bare or as `name:digest`; the server never holds a key in clear. A presented key is
hashed and compared against every stored digest with `hmac.compare_digest`, so the time an
answer takes says nothing about how close a guess was.

A caller presents a key as `Authorization: Bearer <key>` or `X-API-Key: <key>`. The
`ApiKeyAuth` middleware answers a missing or unknown key with 401 and puts the caller's
`Principal` on `scope["state"]["principal"]`, where routes read it (`get_principal`). The
principal's name is the owner of everything the caller creates (sessions, jobs).

With no keys configured the server is open: every caller is the one `ANONYMOUS` principal,
an admin, and owns nothing exclusively. Health, metrics and the API docs stay open always.
A websocket without a key header may present it as `api_key` in its first message
(`authenticate_key`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.error_handlers import error_response
from service.errors import NeuroserveError

logger = logging.getLogger("neuroserve.auth")

OPEN_PATH_PREFIXES = ("/v2/health/", "/metrics", "/docs", "/redoc", "/openapi.json")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
WWW_AUTHENTICATE = 'Bearer realm="neuroserve"'


class UnauthorizedError(NeuroserveError):
    status_code = 401
    code = "unauthorized"


class ForbiddenError(NeuroserveError):
    status_code = 403
    code = "forbidden"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: `name` owns what it creates; `admin` may administer."""

    name: str
    admin: bool

    @property
    def owner(self) -> str | None:
        """The namespace of the caller's sessions and jobs (None in open mode: shared)."""
        return None if self is ANONYMOUS else self.name


ANONYMOUS = Principal(name="anonymous", admin=True)


@dataclass(frozen=True)
class StoredKey:
    name: str
    digest: str
    admin: bool


def hash_key(key: str) -> str:
    """The sha256 hex digest under which a key is configured (`neuroserve hash-key`)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_key_entry(entry: str, *, admin: bool) -> StoredKey:
    """`digest` or `name:digest` -> StoredKey; ValueError naming what is wrong."""
    name, _, digest = entry.strip().rpartition(":")
    digest = digest.lower()
    if not _DIGEST.fullmatch(digest):
        raise ValueError(
            "an API key entry must be a sha256 hex digest (64 hex digits) or name:digest; "
            "`neuroserve hash-key` prints the digest of a key"
        )
    if not name:
        name = "key-" + digest[:16]  # stable, and reveals nothing usable about the key
    elif not _NAME.fullmatch(name):
        raise ValueError(f"API key name {name!r}: use 1-64 of A-Z a-z 0-9 _ . : -")
    return StoredKey(name=name, digest=digest, admin=admin)


class KeyRing:
    """The configured keys; `verify` maps a presented key to its principal."""

    def __init__(self, keys: Iterable[str], admin_keys: Iterable[str] = ()) -> None:
        stored = [parse_key_entry(k, admin=False) for k in keys]
        stored += [parse_key_entry(k, admin=True) for k in admin_keys]
        self._keys = stored

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def verify(self, presented: str | None) -> Principal | None:
        """The principal of `presented`, or None. Every stored digest is compared, in
        constant time, whether or not an earlier one matched."""
        if presented is None:
            return None
        digest = hash_key(presented).encode("ascii")
        found: StoredKey | None = None
        for stored in self._keys:
            if hmac.compare_digest(digest, stored.digest.encode("ascii")) and found is None:
                found = stored
        return None if found is None else Principal(name=found.name, admin=found.admin)


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The key in `Authorization: Bearer ...` or `X-API-Key`, if any."""
    authorization = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return key or None


def is_open_path(path: str) -> bool:
    return any(path == p.rstrip("/") or path.startswith(p) for p in OPEN_PATH_PREFIXES)


class ApiKeyAuth:
    """Authenticate every request and websocket (but the open paths) against `keys`."""

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if not self.keys.enabled:
            state["principal"] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        key = presented_key(dict(scope["headers"]))
        principal = self.keys.verify(key)
        if principal is not None:
            state["principal"] = principal
        elif is_open_path(scope["path"]):
            pass
        elif scope["type"] == "websocket" and key is None:
            state["key_ring"] = self.keys  # the route reads the key from the first message
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "unknown API key"})
            return
        else:
            error = UnauthorizedError(unauthorized_message(key))
            connection = HTTPConnection(scope)
            response = error_response(connection, error.status_code, error.code, error.message)  # type: ignore[arg-type]
            response.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def unauthorized_message(key: str | None) -> str:
    if key is None:
        return "an API key is required: send it as `Authorization: Bearer <key>` or `X-API-Key`"
    return "unknown API key"


def get_principal(connection: HTTPConnection) -> Principal:
    """The caller `ApiKeyAuth` authenticated (FastAPI dependency on Request or WebSocket)."""
    principal = connection.scope.get("state", {}).get("principal")
    if principal is None:
        raise UnauthorizedError(unauthorized_message(None))
    return principal


async def principal_dependency(connection: HTTPConnection) -> Principal:
    """`get_principal` as a FastAPI dependency. Async on purpose: FastAPI runs a plain
    function dependency in a worker thread, a thread hop on every request."""
    return get_principal(connection)


PrincipalDependency = Annotated[Principal, Depends(principal_dependency)]


def authenticate_key(connection: HTTPConnection, key: str | None) -> Principal:
    """A websocket's principal: from its headers, else from the `api_key` it sent."""
    state = connection.scope.get("state", {})
    if state.get("principal") is not None:
        return state["principal"]
    principal = state["key_ring"].verify(key) if "key_ring" in state else None
    if principal is None:
        raise UnauthorizedError(unauthorized_message(key))
    state["principal"] = principal
    return principal


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise ForbiddenError("this route needs an admin API key (NEUROSERVE_ADMIN_API_KEYS)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_open(keys: KeyRing, host: str) -> None:
    """Say at start that a server without keys is open; louder when it is reachable."""
    if keys.enabled:
        logger.info("API keys required (%d configured)", len(keys))
        return
    if is_loopback(host):
        logger.warning(
            "no API keys configured (NEUROSERVE_API_KEYS): the server is open to anyone who "
            "can reach %s",
            host,
        )
    else:
        logger.warning(
            "SECURITY: no API keys configured (NEUROSERVE_API_KEYS) and listening on %s, "
            "which is not loopback: ANYONE ON THE NETWORK can use every route, including "
            "fine-tuning; configure keys or bind to 127.0.0.1",
            host,
        )
