"""A bounded load test on loopback: many concurrent sessions stepping for a fixed time.

Starts its own `neuroserve serve` on loopback (state in a private `redis-server` when one is on
PATH, else in the server's process, or in `--redis-url`), creates `--sessions` sessions of the
built-in digits model and steps each one, one time step per request on its own keep-alive
connection, back to back, for `--seconds`; then it stops by itself. Every answer must be 200
and carry the step count this client expects, and afterwards every session's stored step count
must equal the number of steps the client sent and had acknowledged: a lost or doubled update
shows up as a mismatch. Reported: requests, errors, lost updates, steps per second, p50/p99/max
latency. The load generator shares the machine's cores with the server, so the absolute figures
are machine-bound.

    .venv/bin/python bench/load_test.py [--sessions 200] [--seconds 60] [--model digits-lru]
        [--redis-url URL | --in-process] [--append docs/BENCHMARKS.md]

The default suite runs a 10-second, 50-session version (tests/bench/test_load_test.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.session_throughput import neuroserve, private_redis  # noqa: E402
from service.app import GC_THRESHOLDS  # noqa: E402

CONNECT_BATCH = 50  # sessions created / connections opened at a time


class Connection:
    """One keep-alive connection; `post` sends JSON and returns (status, body). A minimal
    HTTP/1.1 client on asyncio streams: an HTTP library would cost more CPU than the server
    on a small machine, and this generator shares its cores."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, host)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", header)
        if match is None:
            raise RuntimeError(f"response without Content-Length: {header[:200]!r}")
        return status, await self.reader.readexactly(int(match.group(1)))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def step_body(features: int, rng: random.Random) -> bytes:
    row = [round(rng.uniform(0, 16), 3) for _ in range(features)]
    return json.dumps({"inputs": [row]}).encode()


async def create_sessions(port: int, model: str, count: int) -> list[str]:
    connection = await Connection.open("127.0.0.1", port)
    ids = []
    for _ in range(count):
        body = json.dumps({"model": model}).encode()
        status, answer = await connection.post("/v1/sessions", body)
        if status != 201:
            raise RuntimeError(f"creating a session: HTTP {status}: {answer[:300]!r}")
        ids.append(json.loads(answer)["session_id"])
    await connection.close()
    return ids


@dataclass(frozen=True)
class LoadReport:
    sessions: int
    seconds: float  # how long the stepping actually ran
    store: str
    requests: int  # answered step requests
    errors: list[str]  # non-200 answers, wrong step counts, broken connections
    lost_updates: list[str]  # sessions whose stored step count differs from what was sent
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def steps_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def table_row(self) -> str:
        return (
            f"| {self.sessions} | {self.seconds:.0f} | {self.store} | {self.requests} | "
            f"{self.steps_per_second:.0f} | {self.p50_ms:.1f} | {self.p99_ms:.1f} | "
            f"{self.max_ms:.1f} | {len(self.errors)} | {len(self.lost_updates)} |"
        )


TABLE_HEADER = (
    "| sessions | seconds | store | step requests | steps/s | p50 ms | p99 ms | max ms | "
    "errors | lost updates |\n|---|---|---|---|---|---|---|---|---|---|"
)


async def step_sessions(
    port: int, session_ids: list[str], seconds: float, features: int = 8
) -> tuple[dict[str, int], list[float], list[str], float]:
    """Step every session back to back until `seconds` have passed.

    Returns per session the acknowledged step count, the latencies, the errors and the time
    the stepping took. A session stops at its first error (its count is then still exact).
    """
    connections: list[Connection] = []
    for start in range(0, len(session_ids), CONNECT_BATCH):
        batch = session_ids[start : start + CONNECT_BATCH]
        connections += await asyncio.gather(*(Connection.open("127.0.0.1", port) for _ in batch))
    acknowledged = dict.fromkeys(session_ids, 0)
    latencies: list[float] = []
    errors: list[str] = []
    began = time.perf_counter()
    deadline = began + seconds

    async def stepper(session_id: str, connection: Connection) -> None:
        rng = random.Random(session_id)
        path = f"/v1/sessions/{session_id}/step"
        while time.perf_counter() < deadline:
            body = step_body(features, rng)
            sent = time.perf_counter()
            try:
                status, answer = await connection.post(path, body)
            except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                errors.append(f"{session_id}: connection failed: {error!r}")
                return
            latencies.append(time.perf_counter() - sent)
            if status != 200:
                errors.append(f"{session_id}: HTTP {status}: {answer[:200]!r}")
                return
            step = json.loads(answer)["step"]
            if step != acknowledged[session_id] + 1:
                errors.append(f"{session_id}: answered step {step}, expected the next one")
                return
            acknowledged[session_id] = step

    await asyncio.gather(*(stepper(s, c) for s, c in zip(session_ids, connections, strict=True)))
    took = time.perf_counter() - began
    for connection in connections:
        await connection.close()
    return acknowledged, latencies, errors, took


def stored_steps(base_url: str, session_ids: list[str]) -> dict[str, int | None]:
    """Each session's step count as the server has stored it (None if it is gone)."""
    steps: dict[str, int | None] = {}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for session_id in session_ids:
            response = client.get(f"/v1/sessions/{session_id}")
            steps[session_id] = response.json()["step"] if response.status_code == 200 else None
    return steps


def percentile_ms(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_load(
    sessions: int,
    seconds: float,
    *,
    model: str = "digits-lru",
    redis_url: str | None = None,
    use_redis: bool = True,
    workers: int = 1,
) -> LoadReport:
    """Start a server, run the load, check every session, stop the server; the report."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="load-test-")))
        if redis_url is None and use_redis:
            redis_url = stack.enter_context(private_redis(workdir))
        store = "redis" if redis_url else "in-process"
        server_options = argparse.Namespace(window_ms=None, workers=workers)  # server defaults
        name = f"loadtest-{uuid.uuid4().hex[:8]}"
        port = stack.enter_context(neuroserve(workdir, name, redis_url, True, server_options))
        session_ids = asyncio.run(create_all(port, model, sessions))
        acknowledged, latencies, errors, took = asyncio.run(
            step_sessions(port, session_ids, seconds)
        )
        stored = stored_steps(f"http://127.0.0.1:{port}", session_ids)
    lost = [
        f"{session_id}: sent and acknowledged {acknowledged[session_id]} steps, "
        f"stored {stored[session_id]}"
        for session_id in session_ids
        if stored[session_id] != acknowledged[session_id]
    ]
    latencies.sort()
    return LoadReport(
        sessions=sessions,
        seconds=took,
        store=store,
        requests=len(latencies),
        errors=errors,
        lost_updates=lost,
        p50_ms=1000 * statistics.median(latencies) if latencies else float("nan"),
        p99_ms=percentile_ms(latencies, 0.99),
        max_ms=1000 * latencies[-1] if latencies else float("nan"),
    )


async def create_all(port: int, model: str, count: int) -> list[str]:
    batches = [min(CONNECT_BATCH, count - start) for start in range(0, count, CONNECT_BATCH)]
    created = await asyncio.gather(*(create_sessions(port, model, size) for size in batches))
    return [session_id for batch in created for session_id in batch]


def section(report: LoadReport) -> str:
    machine = (
        f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {sys.version.split()[0]}"
    )
    return (
        f"\n## Load\n\n{report.sessions} concurrent sessions for {report.seconds:.0f} s "
        "(`.venv/bin/python bench/load_test.py --sessions "
        f"{report.sessions} --seconds {report.seconds:.0f}`): one `neuroserve serve` on "
        "loopback, every session stepping one time step per request on its own keep-alive "
        "connection, back to back; the load generator runs on the same cores "
        f"({machine}).\n\n{TABLE_HEADER}\n{report.table_row()}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--model", default="digits-lru")
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--redis-url", help="an existing Redis for the sessions")
    store.add_argument("--in-process", action="store_true", help="the server's own store")
    parser.add_argument("--workers", type=int, default=1, help="server processes (Redis only)")
    parser.add_argument("--append", type=Path, help="append the result to this Markdown file")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.seconds <= 0:
        parser.error("--sessions must be at least 1 and --seconds positive")
    # The generator's own collector pauses would show up as server latency: collect rarely,
    # as the server does (service.app.GC_THRESHOLDS).
    gc.set_threshold(*GC_THRESHOLDS)
    report = run_load(
        args.sessions,
        args.seconds,
        model=args.model,
        redis_url=args.redis_url,
        use_redis=not args.in_process,
        workers=args.workers,
    )
    print(TABLE_HEADER)
    print(report.table_row())
    for problem in (report.errors + report.lost_updates)[:20]:
        print("  ", problem)
    if args.append is not None:
        with args.append.open("a") as output:
            output.write(section(report))
    return 0 if not report.errors and not report.lost_updates else 1


if __name__ == "__main__":
    sys.exit(main())
