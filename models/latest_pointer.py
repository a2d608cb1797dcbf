"""Which version of a model is `latest`: a pointer file beside its versions, changed only
under the model's lock.

    <root>/<name>/latest.json   {"latest": "3", "history": ["1", "3"], "deleted": ["2"]}
    <root>/<name>/.lock         an empty file that `flock` locks

`latest` is what a request without a version gets. `history` is the order in which versions
became latest (a rollback steps back through it); `deleted` keeps the numbers of deleted
versions, so a number is never given to a second, different version. A model without a
pointer file (published before pointers existed, or never promoted or deleted) behaves as if
every version had been promoted as it was published: latest is the highest.

The pointer is replaced atomically (a temp file renamed over it), so a reader sees the old or
the new pointer, never half of one; writers take an exclusive `flock` on the model's lock file
first, which serialises every read-modify-write across threads and processes (server replicas
and job workers sharing one repository on one file system).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from models.files import fsync_path, write_atomically

POINTER_FILE = "latest.json"
LOCK_FILE = ".lock"


@dataclass
class LatestPointer:
    """The pointer's content; `latest` None when nothing was pinned yet."""

    latest: str | None = None
    history: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        body = {"latest": self.latest, "history": self.history, "deleted": self.deleted}
        return (json.dumps(body, indent=2) + "\n").encode()


_cache: dict[str, tuple[tuple[int, ...], LatestPointer | None]] = {}


def read_pointer(model_dir: Path, fresh: bool = False) -> LatestPointer | None:
    """The pointer of the model in `model_dir`, or None when it has none (or it is unreadable:
    then the highest version serves, as before pointers existed). Every request reads it:
    the parsed pointer is kept while the file keeps its inode, times and size (one `stat`;
    every write is a new file renamed over the old one). Writers read it `fresh`: within
    the file system's timestamp tick a recycled inode could look unchanged."""
    path = model_dir / POINTER_FILE
    if fresh:
        return _parse(path) if path.exists() else None
    pointed_latest(str(model_dir))  # refreshes the cache entry
    cached = _cache.get(str(path))
    return _copy(cached[1]) if cached is not None else None


def pointed_latest(model_dir: str) -> str | None:
    """`read_pointer(model_dir).latest` for the request path: the same stat and cache, on a
    str path and without copying the pointer (pathlib and the copy cost more than the stat)."""
    path = os.path.join(model_dir, POINTER_FILE)
    try:
        status = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    stamp = (status.st_ino, status.st_mtime_ns, status.st_ctime_ns, status.st_size)
    cached = _cache.get(path)
    if cached is None or cached[0] != stamp:
        cached = _cache[path] = (stamp, _parse(Path(path)))
    return cached[1].latest if cached[1] is not None else None


def _copy(pointer: LatestPointer | None) -> LatestPointer | None:
    if pointer is None:
        return None
    return LatestPointer(pointer.latest, list(pointer.history), list(pointer.deleted))


def _parse(path: Path) -> LatestPointer | None:
    try:
        body = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    latest = body.get("latest")
    return LatestPointer(
        latest=str(latest) if latest is not None else None,
        history=[str(v) for v in body.get("history") or []],
        deleted=[str(v) for v in body.get("deleted") or []],
    )


def write_pointer(model_dir: Path, pointer: LatestPointer) -> None:
    """Replace the pointer atomically (call with the model's lock held)."""
    write_atomically(model_dir / POINTER_FILE, pointer.to_bytes())
    fsync_path(model_dir)


@contextmanager
def model_lock(model_dir: Path) -> Iterator[None]:
    """Hold the model's exclusive lock (threads and processes alike: `flock` locks belong to
    each open file description)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(model_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock
