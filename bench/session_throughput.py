"""Session-step throughput and latency of a real server, against a plain FastAPI ceiling.

Starts its own servers on loopback: `neuroserve serve` subprocesses for every combination
of state store (in-process, Redis) and micro-batching (on, off), and, as the ceiling, a
FastAPI app whose one route parses the same JSON body and answers a constant, served by
`uvicorn.run` exactly as `neuroserve serve` serves its app. For every concurrency, that many
sessions step as fast as their answers come back (closed loop, one time step per request,
one keep-alive connection per session).

Reported per row: session steps per second, p50 and p99 latency, the mean micro-batch size
the server reported, and steps/s as a fraction of the hello ceiling at the same concurrency.
All rows are measured in turns, `--repeats` rounds of `--seconds` each after a warm-up round,
and each row keeps its fastest round: on a shared machine that is the round least disturbed
by other work, and every row had the same chances. The load generator is a minimal HTTP/1.1
client on asyncio streams (an HTTP library would cost more CPU than the server on a small
machine); it runs in this process, on the same cores as the servers, so absolute numbers are
machine-bound: compare rows of one run. Time: about 20 rows x (0.5 + repeats x seconds) s,
plus start-up.

    .venv/bin/python bench/session_throughput.py [--seconds 1.5] [--repeats 3]
        [--concurrency 1 16 64 256] [--model digits-lru] [--redis-url URL] [--window-ms 2]
        [--append docs/BENCHMARKS.md]

Redis rows use `--redis-url`, else a private `redis-server` from PATH (no persistence),
else they are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 90.0
WARMUP_S = 0.5  # per row, in the warm-up round
SCRIPT = Path(sys.executable).with_name("neuroserve")
NEUROSERVE = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "service.cli"]


# ---- a minimal keep-alive HTTP/1.1 client -----------------------------------------------------


class Connection:
    """One keep-alive connection; `post` sends JSON and returns (status, body)."""

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


# ---- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited during start-up:\n{log.read_text()[-3000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start:\n{log.read_text()[-3000:]}")


@contextmanager
def server(command: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[int]:
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_listening(port, process, log)
            yield port
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEUROSERVE_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def neuroserve(
    workdir: Path, name: str, store_url: str | None, batching: bool, prefix: str, window_ms: float
):
    port = free_port()
    env = base_env(
        NEUROSERVE_BATCHING="true" if batching else "false",
        NEUROSERVE_BATCH_WINDOW_MS=str(window_ms),
        NEUROSERVE_STATE_STORE_PREFIX=prefix,
        NEUROSERVE_LOG_LEVEL="warning",
        **({"NEUROSERVE_REDIS_URL": store_url} if store_url else {}),
    )
    command = [*NEUROSERVE, "serve", "--host", "127.0.0.1", "--port", str(port)]
    return server(command, env, port, workdir / f"{name}.log")


def hello_server(workdir: Path):
    port = free_port()
    command = [sys.executable, __file__, "--serve-hello", str(port)]
    return server(command, base_env(), port, workdir / "hello.log")


def serve_hello(port: int) -> None:
    """The ceiling: FastAPI parsing the same body, served by uvicorn as `neuroserve serve`
    serves its app (`uvicorn.run(app, host, port, log_level)`)."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/hello")
    async def hello(body: dict) -> dict:
        return {"hello": "world", "fields": len(body)}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


@contextmanager
def private_redis(workdir: Path) -> Iterator[str | None]:
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
    with server(command, base_env(), port, workdir / "redis.log"):
        yield f"redis://127.0.0.1:{port}/0"


# ---- load -------------------------------------------------------------------------------------


@dataclass
class Cell:
    rate: float  # completed requests per second
    p50_ms: float
    p99_ms: float
    mean_batch: float | None


def step_body(features: int, rng: random.Random) -> bytes:
    row = [round(rng.uniform(0, 16), 3) for _ in range(features)]
    return json.dumps({"inputs": [row]}).encode()


async def closed_loop(
    port: int, paths: list[str], bodies: list[bytes], seconds: float, read_batch: bool
) -> Cell:
    """Each path gets one connection posting its body back to back. The window of `seconds`
    opens once every client has had its first answer (the pipeline is full), and counts the
    requests that complete inside it, whenever they were sent."""
    connections = [await Connection.open("127.0.0.1", port) for _ in paths]
    latencies: list[float] = []
    batches: list[int] = []
    window: list[float] = []  # [opens, closes] once every client has been answered
    answered = 0

    async def worker(connection: Connection, path: str, body: bytes) -> None:
        nonlocal answered
        first = True
        while True:
            sent = time.perf_counter()
            if window and sent >= window[1]:
                return
            status, answer = await connection.post(path, body)
            done = time.perf_counter()
            if status != 200:
                raise RuntimeError(f"{path}: HTTP {status}: {answer[:300]!r}")
            if first:
                first, answered = False, answered + 1
                if answered == len(paths):
                    window.extend([done, done + seconds])
            if window and window[0] <= done <= window[1]:
                latencies.append(done - sent)
                if read_batch:
                    batches.append(json.loads(answer)["usage"]["batch_size"])

    workers = zip(connections, paths, bodies, strict=True)
    await asyncio.gather(*(worker(c, p, b) for c, p, b in workers))
    for connection in connections:
        await connection.close()
    latencies.sort()
    if not latencies:
        return Cell(0.0, float("nan"), float("nan"), None)
    return Cell(
        rate=len(latencies) / seconds,
        p50_ms=1000 * statistics.median(latencies),
        p99_ms=1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        mean_batch=statistics.fmean(batches) if batches else None,
    )


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
class Target:
    """One row of the table: a server and what to post to it."""

    store: str  # "hello ceiling", "in-process" or "redis"
    batching: str  # "on", "off" or "-"
    port: int
    paths: list[str]  # one per concurrent client; the first `concurrency` are used
    bodies: list[bytes]

    async def measure(self, concurrency: int, seconds: float) -> Cell:
        paths, bodies = self.paths[:concurrency], self.bodies[:concurrency]
        return await closed_loop(self.port, paths, bodies, seconds, self.store != "hello ceiling")


# ---- the table --------------------------------------------------------------------------------


def model_features(model: str) -> int:
    from models.repository import ModelRepository, default_repository_root

    card = ModelRepository(default_repository_root()).card(model)
    if card.config["input"]["kind"] != "features":
        raise SystemExit(f"{model} is a token model; this bench steps feature models")
    return int(card.config["input"]["features"])


def run(args: argparse.Namespace) -> str:
    """Start every server, then measure all rows in turns (`--repeats` rounds after one
    warm-up round), keeping each row's fastest round: on a shared machine that is the round
    least disturbed by other work, and every row had the same chances."""
    features = model_features(args.model)
    most = max(args.concurrency)
    rng = random.Random(0)
    bodies = [step_body(features, rng) for _ in range(most)]
    workdir = Path(tempfile.mkdtemp(prefix="session-bench-"))
    with ExitStack() as servers:
        targets = [Target("hello ceiling", "-", servers.enter_context(hello_server(workdir)),
                          ["/hello"] * most, bodies)]  # fmt: skip
        url = args.redis_url
        if url is None:
            url = servers.enter_context(private_redis(workdir))
        stores = [("in-process", None)] + ([("redis", url)] if url else [])
        for store_name, store_url in stores:
            for batching in (True, False):
                name = f"{store_name}-{'batched' if batching else 'single'}"
                prefix = f"bench-{name}-{os.getpid()}"
                server = neuroserve(workdir, name, store_url, batching, prefix, args.window_ms)
                port = servers.enter_context(server)
                ids = asyncio.run(create_sessions(port, args.model, most))
                paths = [f"/v1/sessions/{session_id}/step" for session_id in ids]
                targets.append(Target(store_name, "on" if batching else "off", port, paths, bodies))
        best: dict[tuple[int, int], Cell] = {}
        for round_ in range(args.repeats + 1):
            for t, target in enumerate(targets):
                for n in args.concurrency:
                    seconds = WARMUP_S if round_ == 0 else args.seconds
                    cell = asyncio.run(target.measure(n, seconds))
                    if round_ > 0 and ((t, n) not in best or cell.rate > best[(t, n)].rate):
                        best[(t, n)] = cell
    hello = {n: best[(0, n)] for n in args.concurrency}
    rows = [
        (target.store, target.batching, n, best[(t, n)])
        for t, target in enumerate(targets)
        if t > 0
        for n in args.concurrency
    ]
    return render(args, hello, rows, redis_ran=len(targets) > 3)


def render(
    args: argparse.Namespace,
    hello: dict[int, Cell],
    rows: list[tuple[str, str, int, Cell]],
    redis_ran: bool,
) -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    command = "python bench/session_throughput.py " + " ".join(sys.argv[1:])
    lines = [
        f"`{command.strip()}`",
        "",
        f"{args.model}, one time step per request, closed loop; each row the fastest of "
        f"{args.repeats} interleaved rounds of {args.seconds:g} s (after a warm-up round); "
        "servers and load generator on the same "
        f"{os.cpu_count()} cores ({platform.machine()}, load average {load:.1f} at the end), "
        f"1 torch thread per server, torch {torch.__version__}; batching window "
        f"{args.window_ms:g} ms, max batch 64."
        + ("" if redis_ran else " No Redis was available: Redis rows skipped."),
        "",
        "| store | batching | concurrent sessions | steps/s | p50 ms | p99 ms "
        "| mean batch | vs hello |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, cell in hello.items():
        lines.append(
            f"| hello ceiling | - | {n} | {cell.rate:,.0f} | {cell.p50_ms:.2f} | "
            f"{cell.p99_ms:.2f} | - | 1.00 |"
        )
    for store, batching, n, cell in rows:
        ratio = cell.rate / hello[n].rate if hello[n].rate else float("nan")
        batch = f"{cell.mean_batch:.1f}" if cell.mean_batch is not None else "-"
        lines.append(
            f"| {store} | {batching} | {n} | {cell.rate:,.0f} | {cell.p50_ms:.2f} | "
            f"{cell.p99_ms:.2f} | {batch} | {ratio:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="time per row and round")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds over all rows")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--model", default="digits-lru", help="a built-in feature model")
    parser.add_argument("--redis-url", help="Redis for the Redis rows (default: private)")
    parser.add_argument(
        "--window-ms", type=float, default=2.0, help="micro-batch window (server default 2)"
    )
    parser.add_argument("--append", type=Path, help="also append the table to this file")
    parser.add_argument("--serve-hello", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_hello is not None:
        serve_hello(args.serve_hello)
        return
    if args.seconds <= 0 or args.repeats < 1 or any(n < 1 for n in args.concurrency):
        parser.error("--seconds, --repeats and every --concurrency must be positive")
    table = run(args)
    print(table)
    if args.append is not None:
        with args.append.open("a") as output:
            output.write("\n" + table)


if __name__ == "__main__":
    main()
