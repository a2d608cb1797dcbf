"""Requests per second of one-digit inference over each protocol the server speaks, in one
run against one `neuroserve serve`: the native REST route `POST /v1/models/{model}/predict`,
V2 `POST /v2/models/{model}/infer` with JSON tensors and with the binary tensor data
extension (the default of `tritonclient.http`), and V2 over gRPC (`ModelInfer`).

Load comes from `wrk` (closed loop: each connection sends its next request when its answer
is back), in its own process, with the wrk plumbing of bench/session_throughput.py. Every
request carries the same digit (8 time steps of 8 features, from the test split) and
answers every output:
- v1 predict: `{"inputs": [digit]}`, the JSON answer.
- v2 infer, HTTP JSON: a JSON FP32 tensor; every output as JSON.
- v2 infer, HTTP binary: the body `tritonclient.http` sends for `set_data_from_numpy(digit)`
  and `infer(model, [input])` with no other argument (`generate_request_body`): the digit as
  raw little-endian FP32 after the JSON part, every output binary.
- v2 infer, gRPC raw: the `ModelInfer` message `tritonclient.grpc` sends with its defaults
  (the digit in `raw_input_contents`), posted by `h2load` (nghttp2's HTTP/2 load generator,
  `apt-get install nghttp2-client`; the row is left out without it), one connection per
  client. A gRPC failure still travels in an HTTP 200 (its status is a trailer), so this
  row's status errors are the server's own count of gRPC answers that were not OK.

Each row is a `Protocol`: its name, its encoding, and `prepare`, which readies its load
against the server and returns the function that measures it at a number of connections. A
protocol whose load another generator drives (gRPC: wrk speaks HTTP/1.1 only) adds a
`Protocol` of its own to `PROTOCOLS` whose measure returns the same `Cell`.

The rows are measured round-robin, `--rounds` times (the order rotating each round), so a
machine whose load drifts during the run moves every row alike; each cell reports the round
with the median rate. Reported per row and number of connections: answers below HTTP 400 per
second, p50 and p99 latency of that round, wrk's error counts over all rounds, and the rate
as a fraction of v1 predict at the same number of connections. Server and wrk share the
machine's cores: compare rows of one run.

    .venv/bin/python bench/v2_protocols.py [--seconds 5] [--warmup 1] [--rounds 3]
        [--concurrency 1 64] [--model digits-lru] [--append docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from models.digits import load_digits_seq

try:
    from bench import session_throughput as wrk_bench
    from bench._report import append_section
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    import _report
    import session_throughput as wrk_bench

    append_section = _report.append_section

HEADING = "## V2 protocols: one digit over REST, V2 HTTP JSON, V2 HTTP binary and V2 gRPC"

# Like session_throughput's static script, plus the headers in `<body file>.headers`
# ("Name: value" lines): the binary extension's Inference-Header-Content-Length.
HEADERS_LUA = r"""
function init(args)
   local file = assert(io.open(args[1], "rb"))
   wrk.method, wrk.body = "POST", file:read("*a")
   file:close()
   wrk.headers["Content-Type"] = "application/json"
   local extra = io.open(args[1] .. ".headers", "r")
   if extra then
      for line in extra:lines() do
         local name, value = line:match("^([^:]+):%s*(.*)$")
         if name then wrk.headers[name] = value end
      end
      extra:close()
   end
end
"""


@dataclass(frozen=True)
class Server:
    """What a protocol's load needs to know about the server under test."""

    host: str
    http_port: int
    model: str
    digit: np.ndarray  # [T, F] float32
    grpc_port: int = 0


# (connections, seconds, warm-up seconds) -> one measured run
Measure = Callable[[int, int, int], wrk_bench.Cell]


@dataclass(frozen=True)
class Protocol:
    name: str  # the table's protocol column
    encoding: str  # the table's encoding column
    # (server, scratch folder) -> its measure; checks one request first
    prepare: Callable[[Server, Path], Measure]


def http_protocol(
    name: str, encoding: str, body: Callable[[Server], tuple[str, bytes, dict[str, str]]]
) -> Protocol:
    """A protocol measured with wrk posting one body: `body` gives (path, bytes, headers)."""

    def prepare(server: Server, workdir: Path) -> Measure:
        path, content, headers = body(server)
        url = f"http://{server.host}:{server.http_port}{path}"
        wrk_bench.check_answers(url, content, headers)
        stem = workdir / f"{name}-{encoding}".replace(" ", "-")
        script, data = workdir / "headers.lua", stem.with_suffix(".body")
        script.write_text(wrk_bench.SUMMARY_LUA + HEADERS_LUA)
        data.write_bytes(content)
        Path(f"{data}.headers").write_text("".join(f"{k}: {v}\n" for k, v in headers.items()))
        return wrk_bench.Load(url, script, data).measure

    return Protocol(name, encoding, prepare)


def v1_predict_body(server: Server) -> tuple[str, bytes, dict[str, str]]:
    body = json.dumps({"inputs": [server.digit.tolist()]}).encode()
    return f"/v1/models/{server.model}/predict", body, {}


def v2_json_body(server: Server) -> tuple[str, bytes, dict[str, str]]:
    digit = server.digit[None]  # [1, T, F]
    tensor = {
        "name": "input",
        "datatype": "FP32",
        "shape": list(digit.shape),
        "data": digit.reshape(-1).tolist(),
    }
    return f"/v2/models/{server.model}/infer", json.dumps({"inputs": [tensor]}).encode(), {}


def v2_binary_body(server: Server) -> tuple[str, bytes, dict[str, str]]:
    """Exactly what the stock client sends for `infer(model, [input])` with its defaults."""
    digit = server.digit[None]  # [1, T, F]
    tensor = triton.InferInput("input", list(digit.shape), "FP32")
    tensor.set_data_from_numpy(digit)
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor])
    headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
    return f"/v2/models/{server.model}/infer", body, headers


GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def grpc_frame(server: Server) -> bytes:
    """The `ModelInfer` request the stock client sends with its defaults (the input's
    elements in raw contents) on the wire: uncompressed flag, big-endian length, message."""
    digit = server.digit[None]  # [1, T, F]
    request = triton_grpc.service_pb2.ModelInferRequest(model_name=server.model)
    request.inputs.add(name="input", datatype="FP32", shape=list(digit.shape))
    request.raw_input_contents.append(digit.astype("<f4").tobytes())
    message = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + message


def grpc_not_ok(server: Server) -> float:
    """gRPC ModelInfer answers that were not OK so far, from the server's request counter."""
    text = httpx.get(f"http://{server.host}:{server.http_port}/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "neuroserve_requests_total"
        and sample.labels.get("protocol") == "grpc"
        and sample.labels.get("route") == GRPC_METHOD
        and sample.labels.get("status") != "200"
    )


def prepare_grpc(server: Server, workdir: Path) -> Measure:
    address = f"{server.host}:{server.grpc_port}"
    frame = grpc_frame(server)
    with triton_grpc.InferenceServerClient(address) as client:  # one request first
        client.infer(server.model, [_grpc_input(server)])
    data, log = workdir / "grpc.body", workdir / "h2load.log"
    data.write_bytes(frame)

    def measure(connections: int, seconds: int, warmup: int) -> wrk_bench.Cell:
        before = grpc_not_ok(server)
        log.unlink(missing_ok=True)  # h2load appends to its log
        command = ["h2load", "-c", str(connections), "-m", "1",
                   "-t", str(wrk_bench.wrk_threads(connections)), "-D", str(seconds),
                   "--warm-up-time", str(warmup), "-H", "content-type: application/grpc",
                   "-H", "te: trailers", "-d", str(data), "--log-file", str(log),
                   f"http://{address}{GRPC_METHOD}"]  # fmt: skip
        subprocess.run(command, capture_output=True, check=True)
        # Per measured request: start (us), HTTP status, time to the response's end (us).
        latencies_ms = [int(line.split()[2]) / 1e3 for line in log.read_text().splitlines()]
        not_ok = round(grpc_not_ok(server) - before)  # warm-up ones too: an upper bound
        return wrk_bench.Cell(
            requests=len(latencies_ms),
            seconds=float(seconds),
            p50_ms=float(np.percentile(latencies_ms, 50)),
            p99_ms=float(np.percentile(latencies_ms, 99)),
            errors={"connect": 0, "read": 0, "write": 0, "status": not_ok, "timeout": 0},
            overlaps=0,
        )

    return measure


def _grpc_input(server: Server) -> triton_grpc.InferInput:
    digit = server.digit[None]  # [1, T, F]
    tensor = triton_grpc.InferInput("input", list(digit.shape), "FP32")
    tensor.set_data_from_numpy(digit)
    return tensor


PROTOCOLS: list[Protocol] = [
    http_protocol("v1 predict", "REST JSON", v1_predict_body),
    http_protocol("v2 infer", "HTTP JSON", v2_json_body),
    http_protocol("v2 infer", "HTTP binary", v2_binary_body),
]
if shutil.which("h2load") is not None:
    PROTOCOLS.append(Protocol("v2 infer", "gRPC raw", prepare_grpc))


def one_digit() -> np.ndarray:
    return load_digits_seq("test").inputs[0].numpy().astype(np.float32)  # [T, F]


def run(args: argparse.Namespace) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="v2-protocols-"))
    port, grpc_port = wrk_bench.free_port(), wrk_bench.free_port()
    env = wrk_bench.base_env(NEUROSERVE_LOG_LEVEL="warning", NEUROSERVE_GRPC_ENABLED="true")
    command = [*wrk_bench.NEUROSERVE, "--host", "127.0.0.1", "--port", str(port),
               "--grpc-port", str(grpc_port)]  # fmt: skip
    runs: dict[tuple[int, int], list[wrk_bench.Cell]] = {}  # (protocol, connections) -> rounds
    with wrk_bench.server(command, env, port, workdir / "neuroserve.log"):
        server = Server("127.0.0.1", port, args.model, one_digit(), grpc_port)
        measures = [protocol.prepare(server, workdir) for protocol in PROTOCOLS]
        for round_ in range(args.rounds):
            for n in args.concurrency:
                for i in rotated(range(len(PROTOCOLS)), round_):
                    cell = measures[i](n, args.seconds, args.warmup)
                    runs.setdefault((i, n), []).append(cell)
    results = [
        (protocol, {n: median_cell(runs[(i, n)]) for n in args.concurrency})
        for i, protocol in enumerate(PROTOCOLS)
    ]
    return render(args, results)


def rotated(items: range, by: int) -> list[int]:
    shift = by % len(items)
    return [*items[shift:], *items[:shift]]


def median_cell(cells: list[wrk_bench.Cell]) -> wrk_bench.Cell:
    """The round with the median rate, carrying the errors of every round."""
    middle = sorted(cells, key=lambda cell: cell.rate)[len(cells) // 2]
    errors = {kind: sum(cell.errors[kind] for cell in cells) for kind in middle.errors}
    return replace(middle, errors=errors)


def render(args: argparse.Namespace, results: list[tuple[Protocol, dict]]) -> str:
    native = dict(results[0][1])  # v1 predict: the reference of the last column
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"{args.model}, one digit ({'x'.join(map(str, one_digit().shape))}) per request, "
        f"every output answered; load from {wrk_bench.wrk_version()} (closed loop, up to 2 "
        f"threads), {args.warmup} s warm-up then {args.seconds} s per cell, {args.rounds} "
        f"round(s) round-robin, the median round shown; one `neuroserve "
        f"serve` (1 uvicorn worker, default settings); server and load on the same "
        f"{os.cpu_count()} cores ({platform.machine()}, load average {load:.1f} at the end), "
        f"torch {importlib.metadata.version('torch')}, tritonclient "
        f"{importlib.metadata.version('tritonclient')}. requests/s counts answers below "
        "HTTP 400.",
        "",
        "| protocol | encoding | connections | requests/s | p50 ms | p99 ms | errors "
        "| vs v1 predict |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for protocol, cells in results:
        for n, cell in cells.items():
            lines.append(
                f"| {protocol.name} | {protocol.encoding} | {n} | {cell.rate:,.0f} | "
                f"{cell.p50_ms:.2f} | {cell.p99_ms:.2f} | {cell.errors_text()} | "
                f"{wrk_bench.ratio(cell, native.get(n))} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="measured time per row (whole s)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up per row (whole s, 0: none)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds (median)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--model", default="digits-lru", help="a built-in feature model")
    parser.add_argument("--append", type=Path, help="also append the table to this file")
    args = parser.parse_args()
    if args.seconds < 1 or args.warmup < 0 or args.rounds < 1 or min(args.concurrency) < 1:
        parser.error("--seconds, --rounds and every connection count must be positive")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not on PATH (Debian/Ubuntu: apt-get install wrk)")
    table = run(args)
    print(table)
    if args.append is not None:
        command = "python bench/v2_protocols.py " + " ".join(sys.argv[1:])
        append_section(args.append, HEADING, table, command.strip())


if __name__ == "__main__":
    main()
