"""The load test, shortened: 50 concurrent sessions for 10 seconds against a real server on
loopback (Redis-backed when redis-server is on PATH). The full run (200 sessions, 60 s) is
`.venv/bin/python bench/load_test.py`, with its figures in docs/BENCHMARKS.md."""

from __future__ import annotations

import math

import pytest

from bench.load_test import TABLE_HEADER, main, run_load

SESSIONS = 50
SECONDS = 10.0


def test_fifty_sessions_for_ten_seconds_without_errors_or_lost_updates() -> None:
    report = run_load(SESSIONS, SECONDS)
    assert report.errors == []
    assert report.lost_updates == []
    # Every session kept stepping the whole time (each of them answered many times).
    assert report.requests >= 2 * SESSIONS
    assert SECONDS <= report.seconds < SECONDS + 30
    assert 0 < report.p50_ms <= report.p99_ms <= report.max_ms
    assert not math.isnan(report.p99_ms)
    row = report.table_row()
    assert row.count("|") == TABLE_HEADER.splitlines()[0].count("|")
    assert row.endswith("| 0 | 0 |")


@pytest.mark.parametrize("argv", [["--sessions", "0"], ["--seconds", "-1"]])
def test_the_command_refuses_a_load_that_would_test_nothing(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
