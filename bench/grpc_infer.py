"""Stateless V2 inference of one digit over gRPC, beside V2 over HTTP (JSON) and the native
REST route, on one `neuroserve serve`, in one run.

The server runs as `neuroserve serve` (one worker, in-process store, defaults otherwise) on
loopback ports. The load comes from C load generators in their own processes, closed loop
(each connection sends its next request as soon as its answer is back), one connection per
client, `--warmup` s unmeasured and then `--seconds` s:

- grpc: `h2load` (nghttp2's HTTP/2 load generator: `apt-get install nghttp2-client`) posting
  one `ModelInfer` message to `/inference.GRPCInferenceService/ModelInfer`, the input in raw
  contents as `tritonclient.grpc` sends it;
- v2 http json: `wrk` posting `POST /v2/models/{model}/infer` with a JSON tensor;
- v1 predict: `wrk` posting `POST /v1/models/{model}/predict`.

Every request is one digit (sklearn's first 8x8 digit: 8 time steps of 8 features) and asks
for every output. A gRPC failure still travels in an HTTP 200 (its status is a trailer), so
each row's errors are read from the server's own request counter
(`neuroserve_requests_total` of the row's route and protocol, status not 200), which counts
every request both protocols answer. Reported per row: answers per second, p50 and p99
latency (wrk's distribution; h2load's per-request log), and the errors. At each number of
clients the three protocols run back to back; server and load generator share the machine's
cores, so compare rows of one run.

    .venv/bin/python bench/grpc_infer.py [--seconds 5] [--warmup 1] [--concurrency 1 64]
        [--model digits-lru] [--append docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits
from tritonclient.grpc import service_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `python bench/grpc_infer.py` from anywhere

from bench._report import append_section  # noqa: E402

GRPC_ROUTE = "/inference.GRPCInferenceService/ModelInfer"
START_TIMEOUT_S = 120.0
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def one_digit() -> np.ndarray:
    """[1, 8, 8] float32: the first digit of sklearn's set, one row of 8 features per step."""
    return load_digits().images[:1].astype(np.float32)


def grpc_frame(model: str, digit: np.ndarray) -> bytes:
    """One gRPC message on the wire: uncompressed flag, big-endian length, the protobuf."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(digit.shape))
    request.raw_input_contents.append(digit.astype("<f4").tobytes())
    message = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + message


def http_body(protocol: str, digit: np.ndarray) -> str:
    if protocol == "v1 predict":
        return json.dumps({"inputs": digit.tolist()})
    tensor = {"name": "input", "datatype": "FP32", "shape": list(digit.shape),
              "data": digit.reshape(-1).tolist()}  # fmt: skip
    return json.dumps({"inputs": [tensor]})


# ---- the server -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(log: Path) -> tuple[subprocess.Popen, str, int]:
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(http_port),
               "--grpc-port", str(grpc_port), "--log-level", "warning"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEUROSERVE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    with log.open("wb") as handle:
        server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=handle,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    base_url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"neuroserve serve exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{base_url}/v2/health/ready", timeout=5).status_code == 200:
                return server, base_url, grpc_port
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("neuroserve serve was not ready in time")


def request_counts(base_url: str, route: str, protocol: str) -> dict[str, float]:
    """The server's request counter for one route and protocol, by status."""
    counts: dict[str, float] = {}
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "neuroserve_requests_total"
                and labels.get("route") == route
                and labels.get("protocol") == protocol
            ):
                counts[labels["status"]] = counts.get(labels["status"], 0.0) + sample.value
    return counts


# ---- the load generators --------------------------------------------------------------------


def run_h2load(url: str, frame: Path, clients: int, args: argparse.Namespace, log: Path) -> dict:
    command = ["h2load", "-c", str(clients), "-m", "1", "-t", str(min(clients, 2)),
               "-D", str(args.seconds), "--warm-up-time", str(args.warmup),
               "-H", "content-type: application/grpc", "-H", "te: trailers",
               "-d", str(frame), "--log-file", str(log), url]  # fmt: skip
    log.unlink(missing_ok=True)  # h2load appends to its log
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output).group(1))
    # Per request: start time (us), HTTP status, time to the response's end (us).
    latencies_ms = [int(line.split()[2]) / 1000.0 for line in log.read_text().splitlines()]
    return {
        "rate": rate,
        "p50_ms": float(np.percentile(latencies_ms, 50)),
        "p99_ms": float(np.percentile(latencies_ms, 99)),
    }


def run_wrk(url: str, body: str, clients: int, args: argparse.Namespace, script: Path) -> dict:
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [==[{body}]==]\n"  # a long bracket that JSON's "]]" cannot close
    )
    threads = str(min(clients, 2))
    if args.warmup > 0:
        subprocess.run(["wrk", "-t", threads, "-c", str(clients), "-d", f"{args.warmup}s",
                        "-s", str(script), url], capture_output=True, check=True)  # fmt: skip
    command = ["wrk", "-t", threads, "-c", str(clients), "-d", f"{args.seconds}s", "--latency",
               "-s", str(script), url]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout

    def percentile(name: str) -> float:
        value, unit = re.search(rf"^\s+{name}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M).groups()
        return float(value) * _WRK_UNITS[unit]

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    return {"rate": rate, "p50_ms": percentile("50"), "p99_ms": percentile("99")}


# ---- the table ------------------------------------------------------------------------------


def table(rows: list[tuple[str, int, dict]]) -> str:
    lines = [
        "| protocol | load | clients | requests/s | p50 ms | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for protocol, clients, r in rows:
        tool = "h2load" if protocol == "grpc" else "wrk"
        lines.append(
            f"| {protocol} | {tool} | {clients} | {r['rate']:,.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['errors']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Whole seconds: wrk takes no fractions.
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--model", default="digits-lru")
    parser.add_argument("--append", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args(argv)
    for tool, package in (("h2load", "nghttp2-client"), ("wrk", "wrk")):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not on PATH: apt-get install {package}")

    digit = one_digit()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        frame = work / "request.grpc"
        frame.write_bytes(grpc_frame(args.model, digit))
        server, base_url, grpc_port = start_server(work / "server.log")
        routes = {
            "grpc": (GRPC_ROUTE, "grpc"),
            "v2 http json": ("/v2/models/{name}/infer", "http"),
            "v1 predict": ("/v1/models/{name}/predict", "http"),
        }
        try:
            for clients in args.concurrency:  # the protocols back to back at each level
                for protocol, (route, transport) in routes.items():
                    before = request_counts(base_url, route, transport)
                    if protocol == "grpc":
                        url = f"http://127.0.0.1:{grpc_port}{GRPC_ROUTE}"
                        result = run_h2load(url, frame, clients, args, work / "h2load.log")
                    else:
                        path = route.replace("{name}", args.model)
                        body = http_body(protocol, digit)
                        result = run_wrk(base_url + path, body, clients, args, work / "post.lua")
                    after = request_counts(base_url, route, transport)
                    served = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                    result["errors"] = sum(n for status, n in served.items() if status != "200")
                    if served.get("200", 0.0) == 0:
                        raise SystemExit(f"{protocol}: no request answered 200: {served}")
                    rows.append((protocol, clients, result))
                    print(f"{protocol:>13} x{clients:<3} {result}", file=sys.stderr)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)

    caption = (
        f"{args.model}, one digit (8 steps of 8 features) per request, every output; one "
        "`neuroserve serve` (1 worker, in-process store, batching on); load from h2load (gRPC) "
        f"and wrk (HTTP), closed loop, one connection per client, {args.warmup:g} s warm-up "
        f"then {args.seconds:g} s per row; server and load on the same {os.cpu_count()} cores "
        f"({platform.machine()}, load average {os.getloadavg()[0]:.1f} at the end), 1 torch "
        f"thread, torch {torch.__version__}. Errors: the server's count of non-200 answers."
    )
    result = f"{caption}\n\n{table(rows)}"
    print(result)
    if args.append:
        command = "python bench/grpc_infer.py " + " ".join(argv or sys.argv[1:])
        heading = "## V2 over gRPC, HTTP and native REST"
        append_section(args.append, heading, result, command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
