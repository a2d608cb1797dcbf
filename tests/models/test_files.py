"""Atomic file writes (`models.files`): whole files or nothing, readable by every user."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from models.files import (
    empty_directory,
    fsync_tree,
    staging_directory,
    write_atomically,
    write_synced,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomically_replaces_the_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    write_atomically(target, b"one")
    write_atomically(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert _mode(target) == 0o644


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    write_atomically(target, b"old")
    with pytest.raises(TypeError):
        write_atomically(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_staging_directory_renamed_into_place_is_whole_and_readable(tmp_path: Path) -> None:
    target = tmp_path / "version"
    with staging_directory(tmp_path, ".staging-") as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".staging-")
        write_synced(staging / "config.json", b"{}")
        write_synced(staging / "calibration" / "torch.json", b"{}")
        fsync_tree(staging)
        staging.rename(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version"]
    assert _mode(target) == _mode(target / "calibration") == 0o755
    assert _mode(target / "config.json") == _mode(target / "calibration" / "torch.json") == 0o644


def test_a_staging_directory_left_behind_is_removed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), staging_directory(tmp_path, ".staging-") as staging:
        write_synced(staging / "sub" / "file", b"x")
        raise RuntimeError("failed half way")
    assert list(tmp_path.iterdir()) == []


def test_empty_directory_keeps_the_directory(tmp_path: Path) -> None:
    write_synced(tmp_path / "sub" / "file", b"x")
    write_synced(tmp_path / "file", b"x")
    empty_directory(tmp_path)
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []
