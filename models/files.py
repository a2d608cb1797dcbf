"""Durable, atomic file writes: the one place that writes files readers must see whole.

Two patterns, both relying on `rename` being atomic within one file system:

- one file: `write_atomically` writes a hidden temp file in the same folder, fsyncs it and
  renames it over the target, so a reader sees the old file or the new one, never a mix;
- a whole directory: write its files with `write_synced` inside a `staging_directory` (a
  hidden temp dir beside the target), fsync them (`fsync_tree`), then rename the staging
  directory to its final name. A directory that was not renamed away is removed on exit.

Everything written here is readable by every user (files 0644, directories 0755): temp files
and dirs are created owner-only, but a server often runs as another user than the writer.
Nothing here imports anything of ours.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FILE_MODE = 0o644
DIRECTORY_MODE = 0o755


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` (creating parent folders) and fsync it; not atomic by itself:
    use it inside a `staging_directory`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` at once: a temp file in the same folder, fsynced, then
    renamed over `path`. On any error the temp file is removed and `path` is untouched."""
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp_name, FILE_MODE)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


@contextmanager
def staging_directory(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh hidden directory in `parent` (so renaming it to a sibling is atomic), readable
    by all; removed with its contents on exit unless it was renamed away."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        os.chmod(staging, DIRECTORY_MODE)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def empty_directory(directory: Path) -> None:
    """Remove everything inside `directory`, keeping the directory itself."""
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def fsync_tree(directory: Path) -> None:
    """Make every file and folder under `directory` readable by all, then fsync the folders
    deepest first (the files were fsynced as they were written)."""
    folders = [directory]
    for path in directory.rglob("*"):
        if path.is_dir():
            os.chmod(path, DIRECTORY_MODE)
            folders.append(path)
        else:
            os.chmod(path, FILE_MODE)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_path(folder)


__all__ = [
    "empty_directory",
    "fsync_path",
    "fsync_tree",
    "staging_directory",
    "write_atomically",
    "write_synced",
]
