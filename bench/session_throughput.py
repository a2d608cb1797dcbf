"""Session-step throughput and latency of a real server under `wrk`, against a bare FastAPI
ceiling and a naive stateful peer.

Every server runs on loopback, one at a time, with the same number of uvicorn workers
(`--workers`), and `wrk` (the C load generator: `apt-get install wrk`) drives it from its own
process, closed loop: each connection sends its next request as soon as its answer is back.
A neuroserve server takes load once it reports ready (`GET /v2/health/ready`: models
preloaded), as behind a load balancer. For every row, a warm-up run of `--warmup` s, then the
measured run of `--seconds` s.

What each row measures:

- hello: a FastAPI route that parses the same JSON body as a session step and answers a
  constant, served by uvicorn the way `neuroserve serve` serves its app. The ceiling: what the
  HTTP stack alone answers on this machine.
- naive step: a FastAPI endpoint that, per request, GETs the session's state (safetensors
  bytes) from Redis, runs one `model.step` of the same model with one torch thread and SETs
  the state back; no batching, no calibration (bench/_peers.py). The peer a stateful server
  has to beat.
- session step: `neuroserve serve` stepping sessions with `POST /v1/sessions/{id}/step`, one
  time step (one row of features) per request, on each state store (in-process, Redis) with
  micro-batching on and off.
- v2 infer, v1 predict: stateless calls with one whole sequence (a digit: 8 rows of 8
  features) to `POST /v2/models/{model}/infer` and `POST /v1/models/{model}/predict`, on the
  default server (in-process store, batching on; the Redis one when `--workers` > 1).

Sessions: every session row opens one wrk connection per session, on sessions created
beforehand over HTTP. wrk cannot bind a session to a connection, so its Lua script leases
them: a request takes the next session with no step in flight, and the answer, which names
its session, hands the lease back. With as many sessions as connections one is always free,
so no two steps of a session overlap; only an answer without a session id (an error) loses a
lease, and a step sent to a busy session is then counted and reported as an overlap (the
server serialises the steps of a session, so that is correct, only slower).

Reported per row: answers below HTTP 400 per second, p50 and p99 latency from wrk's
distribution, wrk's error counts (connect, read, write, status >= 400, timeout; a row with any
says so), and the rate as a fraction of hello and of the naive peer at the same number of
connections. Those two are measured again right before every neuroserve row (their servers
stay up, idle, through the run) and the row's ratios are to those measurements, beside it in
time: a shared machine's speed drifts by tens of percent within minutes, and a ratio to a
peer measured minutes earlier would carry that drift. The peers' first measurements are their
own rows. Servers and wrk share the machine's cores, so compare rows of one run. Time: about
(number of rows, times 2 for a stateless row and 3 for a session row) x (warm-up + seconds),
plus start-ups.

    .venv/bin/python bench/session_throughput.py [--seconds 5] [--warmup 1]
        [--concurrency 1 16 64 256] [--stateless-concurrency 1 16 64] [--workers 1]
        [--model digits-lru] [--redis-url URL] [--window-ms MS] [--append docs/BENCHMARKS.md]

Redis rows (and the naive peer) use `--redis-url`, else a private `redis-server` from PATH
(no persistence), else they are skipped. `--workers N` > 1 needs `neuroserve serve --workers`;
the in-process store is then skipped (each worker process would hold its own sessions).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

try:
    from bench import _peers
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    import _peers

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90.0
WRK_TIMEOUT = "10s"  # an answer slower than this counts as a timeout error
WRK_MARK = "WRK_JSON "  # the line the Lua `done` prints
ERROR_KINDS = ("connect", "read", "write", "status", "timeout")  # wrk's, in its summary
NEUROSERVE = [sys.executable, "-m", "service.cli", "serve"]
SESSION_TTL_S = 600  # sessions the bench leaves behind in a shared Redis expire


# ---- wrk scripts ------------------------------------------------------------------------------

# Shared by both scripts: numbers the threads, and prints the summary as one JSON line.
SUMMARY_LUA = r"""
threads = {}

function setup(thread)
   thread:set("index", #threads)  -- 0-based, read by init
   table.insert(threads, thread)
end

function done(summary, latency, requests)
   local overlaps = 0
   for _, thread in ipairs(threads) do
      overlaps = overlaps + (thread:get("overlaps") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %.0f, "duration_us": %.0f, "p50_us": %.0f, "p99_us": %.0f, '
      .. '"connect": %.0f, "read": %.0f, "write": %.0f, "status": %.0f, "timeout": %.0f, '
      .. '"overlaps": %.0f}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      e.connect, e.read, e.write, e.status, e.timeout, overlaps))
end
"""

# Posts one JSON body (the file args[1]) to the URL, again and again.
STATIC_LUA = r"""
function init(args)
   local file = assert(io.open(args[1], "rb"))
   wrk.method, wrk.body = "POST", file:read("*a")
   file:close()
   wrk.headers["Content-Type"] = "application/json"
end
"""

# Steps sessions. args[1] is a file of `session id <TAB> path <TAB> body` lines, one per
# session; thread `index` of args[2] threads takes lines index, index + args[2], ...
# A request leases a session with no step in flight; the answer hands it back.
SESSIONS_LUA = r"""
local requests, slot_of, in_flight = {}, {}, {}
local cursor, checking = 0, false
overlaps = 0  -- global: done() reads it with thread:get

function init(args)
   local count, line_no = tonumber(args[2]), 0
   wrk.headers["Content-Type"] = "application/json"
   for line in io.lines(args[1]) do
      if line_no % count == index then
         local id, path, body = line:match("^([^\t]+)\t([^\t]+)\t(.*)$")
         requests[#requests + 1] = wrk.format("POST", path, nil, body)
         slot_of[id] = #requests
         in_flight[#requests] = 0
      end
      line_no = line_no + 1
   end
   -- wrk builds one request on thread 0 before any connection opens, only to check that it
   -- parses (script_verify_request); it is never sent, so it takes no lease.
   checking = index == 0
end

function request()
   if checking then
      checking = false
      return requests[1]
   end
   local n = #requests
   for _ = 1, n do
      cursor = cursor % n + 1
      if in_flight[cursor] == 0 then
         in_flight[cursor] = 1
         return requests[cursor]
      end
   end
   -- Every session has a step in flight (an answer came back without its id): share one.
   cursor = cursor % n + 1
   in_flight[cursor] = in_flight[cursor] + 1
   overlaps = overlaps + 1
   return requests[cursor]
end

function response(status, headers, body)
   local slot = slot_of[body:match('"session_id"%s*:%s*"([^"]+)"')]
   if slot and in_flight[slot] > 0 then
      in_flight[slot] = in_flight[slot] - 1
   end
end
"""


@dataclass
class Cell:
    """One wrk run."""

    requests: int  # answers, whatever their status
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]  # wrk's counts: connect, read, write, status (>= 400), timeout
    overlaps: int  # steps sent to a session that had one in flight

    @property
    def rate(self) -> float:
        """Answers below HTTP 400 per second."""
        return (self.requests - self.errors["status"]) / self.seconds

    def errors_text(self) -> str:
        counted = {kind: count for kind, count in self.errors.items() if count}
        if not counted:
            return "0"
        kinds = ", ".join(f"{kind} {count}" for kind, count in counted.items())
        return f"**{sum(counted.values())}** ({kinds})"


def wrk_threads(connections: int) -> int:
    """Two threads, or one where two cannot split the connections evenly (wrk gives each
    thread connections // threads)."""
    return 2 if connections % 2 == 0 else 1


def run_wrk(url: str, script: Path, data: Path, connections: int, seconds: int) -> Cell:
    threads = wrk_threads(connections)
    options = ["-t", str(threads), "-c", str(connections), "-d", f"{seconds}s"]
    options += ["--timeout", WRK_TIMEOUT, "-s", str(script)]
    command = ["wrk", *options, url, "--", str(data), str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    lines = [line for line in done.stdout.splitlines() if line.startswith(WRK_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    summary = json.loads(lines[-1][len(WRK_MARK) :])
    return Cell(
        requests=int(summary["requests"]),
        seconds=summary["duration_us"] / 1e6,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        errors={kind: int(summary[kind]) for kind in ERROR_KINDS},
        overlaps=int(summary["overlaps"]),
    )


@dataclass(frozen=True)
class Load:
    """What wrk runs against one server: a Lua script and the file it reads."""

    url: str
    script: Path
    data: Path

    def measure(self, connections: int, seconds: int, warmup: int) -> Cell:
        if warmup > 0:
            run_wrk(self.url, self.script, self.data, connections, warmup)
        return run_wrk(self.url, self.script, self.data, connections, seconds)


def static_load(workdir: Path, name: str, url: str, body: bytes) -> Load:
    script, data = workdir / "static.lua", workdir / f"{name}.json"
    script.write_text(SUMMARY_LUA + STATIC_LUA)
    data.write_bytes(body)
    return Load(url, script, data)


def sessions_load(
    workdir: Path, name: str, port: int, paths: list[str], ids: list[str], bodies: list[bytes]
) -> Load:
    script, data = workdir / "sessions.lua", workdir / f"{name}-{len(ids)}.tsv"
    script.write_text(SUMMARY_LUA + SESSIONS_LUA)
    lines = (f"{i}\t{p}\t{b.decode()}\n" for i, p, b in zip(ids, paths, bodies, strict=True))
    data.write_text("".join(lines))
    return Load(f"http://127.0.0.1:{port}", script, data)


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
        process = subprocess.Popen(
            command, env=env, cwd=REPO, stdout=output, stderr=subprocess.STDOUT
        )
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
    """This environment without NEUROSERVE_* settings, one thread per process, and this
    checkout first on the import path (servers run its code, not an installed copy). The
    servers serve HTTP only: these rows measure HTTP, and the gRPC port may be taken."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEUROSERVE_")}
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return {
        **env,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": path,
        "NEUROSERVE_GRPC_ENABLED": "false",
        **extra,
    }


def check_workers_supported(workers: int) -> None:
    if workers == 1:
        return
    help_text = subprocess.run(
        [*NEUROSERVE, "--help"], env=base_env(), cwd=REPO, capture_output=True, text=True
    ).stdout
    if "--workers" not in help_text:
        raise SystemExit(
            "`neuroserve serve` has no --workers option in this checkout: only --workers 1 "
            "can be compared"
        )


@contextmanager
def neuroserve(
    workdir: Path, name: str, store_url: str | None, batching: bool, args
) -> Iterator[int]:
    """A `neuroserve serve` on a free port, yielded once it is ready (its models preloaded),
    as a load balancer would start sending it traffic: measuring during the preload would
    time the loading too."""
    port = free_port()
    env = base_env(
        NEUROSERVE_BATCHING="true" if batching else "false",
        NEUROSERVE_STATE_STORE_PREFIX=f"bench-{name}-{os.getpid()}",
        NEUROSERVE_SESSION_TTL_SECONDS=str(SESSION_TTL_S),
        NEUROSERVE_LOG_LEVEL="warning",
        **({"NEUROSERVE_REDIS_URL": store_url} if store_url else {}),
        **(
            {"NEUROSERVE_BATCH_WINDOW_MS": str(args.window_ms)}
            if args.window_ms is not None
            else {}
        ),
    )
    command = [*NEUROSERVE, "--host", "127.0.0.1", "--port", str(port)]
    if args.workers > 1:  # passed only when asked for: older `serve` has no such option
        command += ["--workers", str(args.workers)]
    log = workdir / f"{name}.log"
    with server(command, env, port, log) as started:
        wait_ready(started, log)
        yield started


def wait_ready(port: int, log: Path) -> None:
    """Until `GET /v2/health/ready` answers 200 (a server without the route: at once)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        answer = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10)
        if answer.status_code in (200, 404):
            return
        time.sleep(0.2)
    raise RuntimeError(f"server on port {port} was not ready:\n{log.read_text()[-3000:]}")


def hello_server(workdir: Path, workers: int):
    port = free_port()
    command = [sys.executable, __file__, "--serve-hello", str(port), "--workers", str(workers)]
    return server(command, base_env(), port, workdir / "hello.log")


def naive_server(workdir: Path, redis_url: str, model: str, workers: int):
    port = free_port()
    command = [
        sys.executable,
        __file__,
        "--serve-naive",
        str(port),
        redis_url,
        model,
        "--workers",
        str(workers),
    ]
    env = base_env(**{_peers.NAIVE_PREFIX: f"bench-naive-{os.getpid()}"})
    return server(command, env, port, workdir / "naive.log")


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


# ---- requests ---------------------------------------------------------------------------------


def model_input(model: str) -> tuple[int, int]:
    """(features per step, steps per sequence) of a built-in feature model."""
    from models.repository import ModelRepository, default_repository_root

    card = ModelRepository(default_repository_root()).card(model)
    spec = card.config["input"]
    if spec["kind"] != "features":
        raise SystemExit(f"{model} is a token model; this bench steps feature models")
    return int(spec["features"]), int(spec["steps"])


def random_row(features: int, rng: random.Random) -> list[float]:
    return [round(rng.uniform(0, 16), 3) for _ in range(features)]


def stateless_bodies(model: str, sequence: list[list[float]]) -> dict[str, tuple[str, bytes]]:
    """Endpoint name -> (path, body) of the stateless calls, one sequence each."""
    flat = [value for row in sequence for value in row]
    shape = [1, len(sequence), len(sequence[0])]
    v2 = {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": flat}]}
    return {
        "v2 infer": (f"/v2/models/{model}/infer", json.dumps(v2).encode()),
        "v1 predict": (f"/v1/models/{model}/predict", json.dumps({"inputs": [sequence]}).encode()),
    }


def create_sessions(port: int, path: str, body: dict, count: int) -> list[str]:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        ids = []
        for _ in range(count):
            answer = http.post(path, json=body)
            if answer.status_code != 201:
                raise RuntimeError(f"creating a session: HTTP {answer.status_code}: {answer.text}")
            ids.append(answer.json()["session_id"])
    return ids


def check_answers(url: str, body: bytes, headers: dict[str, str] | None = None) -> None:
    """One request before the load: a refused body fails here, with the server's reason."""
    sent = {"Content-Type": "application/json", **(headers or {})}
    answer = httpx.post(url, content=body, headers=sent, timeout=60)
    if not answer.is_success:
        raise RuntimeError(f"POST {url}: HTTP {answer.status_code}: {answer.text[:500]}")


# ---- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    endpoint: str  # hello, naive step, session step, v2 infer, v1 predict
    store: str
    batching: str
    connections: int
    cell: Cell
    hello: Cell | None = None  # the hello route, measured right before this row
    naive: Cell | None = None  # the naive peer, measured right before this (session) row


@dataclass
class Bench:
    """What every row shares: the options, a scratch folder, the request bodies, and the
    peers' loads, measured again beside every neuroserve row."""

    args: argparse.Namespace
    workdir: Path
    step_bodies: list[bytes]  # one per session: {"inputs": [one row]}
    sequence: list[list[float]]  # the stateless calls' one sequence
    rows: list[Row] = field(default_factory=list)
    hello_load: Load | None = None
    naive_loads: dict[int, Load] = field(default_factory=dict)  # by connections

    def measure(self, load: Load, connections: int) -> Cell:
        return load.measure(connections, self.args.seconds, self.args.warmup)

    def static_load(self, name: str, url: str, body: bytes) -> Load:
        check_answers(url, body)
        return static_load(self.workdir, name, url, body)

    def session_loads(self, name: str, port: int, step_path: str, ids: list[str]) -> dict:
        """Connections -> the load stepping that many of the sessions `ids`."""
        paths = [step_path.format(session_id=session_id) for session_id in ids]
        check_answers(f"http://127.0.0.1:{port}{paths[0]}", self.step_bodies[0])
        return {
            n: sessions_load(self.workdir, name, port, paths[:n], ids[:n], self.step_bodies[:n])
            for n in self.args.concurrency
        }

    def add_beside_peers(self, endpoint: str, store: str, batching: str, load: Load, n: int):
        """Measure the peers at `n` connections, then `load`: one row, its ratios to them."""
        stepping = endpoint == "session step"
        hello = self.measure(self.hello_load, n) if self.hello_load is not None else None
        naive_load = self.naive_loads.get(n) if stepping else None
        naive = self.measure(naive_load, n) if naive_load is not None else None
        cell = self.measure(load, n)
        self.rows.append(Row(endpoint, store, batching, n, cell, hello, naive))

    def start_hello(self, stack: ExitStack) -> None:
        """Start the hello server for the whole run and measure its own rows."""
        port = stack.enter_context(hello_server(self.workdir, self.args.workers))
        self.hello_load = self.static_load(
            "hello", f"http://127.0.0.1:{port}/hello", self.step_bodies[0]
        )
        counts = sorted({*self.args.concurrency, *self.args.stateless_concurrency})
        for n in counts:
            self.rows.append(Row("hello", "-", "-", n, self.measure(self.hello_load, n)))

    def start_naive(self, stack: ExitStack, redis_url: str) -> None:
        """Start the naive peer for the whole run and measure its own rows."""
        args = self.args
        server = naive_server(self.workdir, redis_url, args.model, args.workers)
        port = stack.enter_context(server)
        ids = create_sessions(port, "/sessions", {}, len(self.step_bodies))
        self.naive_loads = self.session_loads("naive", port, "/sessions/{session_id}/step", ids)
        for n, load in self.naive_loads.items():
            self.rows.append(Row("naive step", "redis", "off", n, self.measure(load, n)))

    def neuroserve(self, store: str, store_url: str | None, batching: bool, stateless: bool):
        """Session rows of one server; with `stateless`, its v2 infer and v1 predict rows."""
        name = f"{store}-{'batched' if batching else 'single'}"
        with neuroserve(self.workdir, name, store_url, batching, self.args) as port:
            opening = {"model": self.args.model}
            ids = create_sessions(port, "/v1/sessions", opening, len(self.step_bodies))
            loads = self.session_loads(name, port, "/v1/sessions/{session_id}/step", ids)
            for n, load in loads.items():
                self.add_beside_peers("session step", store, "on" if batching else "off", load, n)
            if not stateless:
                return
            for endpoint, (path, body) in stateless_bodies(self.args.model, self.sequence).items():
                load = self.static_load(endpoint, f"http://127.0.0.1:{port}{path}", body)
                for n in self.args.stateless_concurrency:
                    self.add_beside_peers(endpoint, "-", "-", load, n)


def run(args: argparse.Namespace) -> str:
    """Start the peers, then each neuroserve server in turn, measuring its rows beside the
    peers; render the table."""
    features, steps = model_input(args.model)
    rng = random.Random(0)
    rows = [random_row(features, rng) for _ in range(max(args.concurrency))]
    step_bodies = [json.dumps({"inputs": [row]}).encode() for row in rows]
    sequence = [random_row(features, rng) for _ in range(steps)]
    bench = Bench(args, Path(tempfile.mkdtemp(prefix="session-bench-")), step_bodies, sequence)
    notes: list[str] = []
    with ExitStack() as stack:
        redis_url = args.redis_url or stack.enter_context(private_redis(bench.workdir))
        bench.start_hello(stack)
        if redis_url is None:
            notes.append("No Redis was available: the naive peer and the Redis rows were skipped.")
        else:
            bench.start_naive(stack, redis_url)
        stores = [("in-process", None)] if args.workers == 1 else []
        stores += [("redis", redis_url)] if redis_url else []
        if args.workers > 1:
            notes.append("In-process rows skipped: each worker process would hold its sessions.")
        for s, (store, store_url) in enumerate(stores):
            for batching in (True, False):
                bench.neuroserve(store, store_url, batching, stateless=s == 0 and batching)
    return render(args, bench.rows, notes, sequence=f"{steps}x{features}")


def batch_window_ms(args: argparse.Namespace) -> float:
    """The window the servers ran with: --window-ms, else the default of this checkout."""
    from service.settings import Settings

    return (
        args.window_ms
        if args.window_ms is not None
        else Settings.model_fields["batch_window_ms"].default
    )


def ratio(cell: Cell, peer: Cell | None) -> str:
    return f"{cell.rate / peer.rate:.2f}" if peer is not None and peer.rate > 0 else "-"


def wrk_version() -> str:
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    words = (done.stdout + done.stderr).split()
    return " ".join(words[:2]) if words else "wrk"


ENDPOINTS = ("hello", "naive step", "session step", "v2 infer", "v1 predict")  # table order


def render(args: argparse.Namespace, rows: list[Row], notes: list[str], sequence: str) -> str:
    rows = sorted(rows, key=lambda row: ENDPOINTS.index(row.endpoint))  # stable: run order
    hello = {row.connections: row.cell for row in rows if row.endpoint == "hello"}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    command = "python bench/session_throughput.py " + " ".join(sys.argv[1:])
    lines = [
        f"`{command.strip()}`",
        "",
        f"{args.model}; session rows one time step per request, v2 infer / v1 predict one "
        f"{sequence} sequence per request; load from "
        f"{wrk_version()} (closed loop, up to 2 threads, one connection per session), "
        f"{args.warmup} s warm-up then {args.seconds} s per row; {args.workers} uvicorn "
        f"worker(s) per server; servers and wrk on the same {os.cpu_count()} cores "
        f"({platform.machine()}, load average {load:.1f} at the end), 1 torch thread per "
        f"process, torch {importlib.metadata.version('torch')}; batching window "
        f"{batch_window_ms(args):g} ms. requests/s counts answers below HTTP 400. The "
        "ratios of a neuroserve row are to the peers measured right before it (their rates "
        "in brackets); the peers' own rows are their first measurements.",
        "",
        "| endpoint | store | batching | connections | requests/s | p50 ms | p99 ms | errors "
        "| vs hello | vs naive |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        cell = row.cell
        reference = row.hello or (hello.get(row.connections) if row.endpoint != "hello" else cell)
        versus_hello = ratio(cell, reference) + (f" ({row.hello.rate:,.0f})" if row.hello else "")
        versus_naive = "-"
        if row.endpoint == "naive step":
            versus_naive = "1.00"
        elif row.naive is not None:
            versus_naive = f"{ratio(cell, row.naive)} ({row.naive.rate:,.0f})"
        lines.append(
            f"| {row.endpoint} | {row.store} | {row.batching} | {row.connections} | "
            f"{cell.rate:,.0f} | {cell.p50_ms:.2f} | {cell.p99_ms:.2f} | {cell.errors_text()} | "
            f"{versus_hello} | {versus_naive} |"
        )
    failed = [row for row in rows if row.cell.errors_text() != "0"]
    if failed:
        notes.append(f"{len(failed)} row(s) had errors (see the errors column).")
    overlapped = [row for row in rows if row.cell.overlaps]
    for row in overlapped:
        notes.append(
            f"{row.endpoint} ({row.store}, batching {row.batching}, {row.connections}): "
            f"{row.cell.overlaps} step(s) sent to a session with a step in flight."
        )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="measured time per row (whole s)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up per row (whole s, 0: none)")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 16, 64, 256],
        help="concurrent sessions of the session rows",
    )
    parser.add_argument(
        "--stateless-concurrency",
        type=int,
        nargs="+",
        help="connections of the v2 infer / v1 predict rows "
        "(default: those of --concurrency up to 64)",
    )
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per server")
    parser.add_argument("--model", default="digits-lru", help="a built-in feature model")
    parser.add_argument("--redis-url", help="Redis for the Redis rows (default: private)")
    parser.add_argument(
        "--window-ms", type=float, help="micro-batch window (default: the server's default)"
    )
    parser.add_argument("--append", type=Path, help="also append the table to this file")
    parser.add_argument("--serve-hello", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--serve-naive", nargs=3, metavar=("PORT", "REDIS_URL", "MODEL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve_hello is not None:
        _peers.serve("hello_app", args.serve_hello, args.workers)
        return
    if args.serve_naive is not None:
        port, redis_url, model = args.serve_naive
        os.environ.update({_peers.NAIVE_REDIS_URL: redis_url, _peers.NAIVE_MODEL: model})
        _peers.serve("naive_app", int(port), args.workers)
        return
    if args.stateless_concurrency is None:
        args.stateless_concurrency = [n for n in args.concurrency if n <= 64] or [1]
    counts = [*args.concurrency, *args.stateless_concurrency]
    if args.seconds < 1 or args.warmup < 0 or args.workers < 1 or min(counts) < 1:
        parser.error("--seconds, --workers and every connection count must be positive")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not on PATH (Debian/Ubuntu: apt-get install wrk)")
    check_workers_supported(args.workers)
    table = run(args)
    print(table)
    if args.append is not None:
        with args.append.open("a") as output:
            output.write("\n" + table)


if __name__ == "__main__":
    main()
