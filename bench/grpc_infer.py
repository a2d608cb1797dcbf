"""Stateless V2 inference of one digit over gRPC, beside V2 over HTTP (JSON) and the native
REST route, on one `neuroserve serve`, in one run.

The server runs as `neuroserve serve` (one worker, in-process store, defaults otherwise) on
loopback ports; the load comes from a separate client process per row (this script with
`--client`), closed loop: each of N concurrent clients sends its next request as soon as its
answer is back, for `--warmup` s unmeasured and then `--seconds` s.

- grpc: `ModelInfer` through the stock generated stub (`tritonclient.grpc.service_pb2_grpc`)
  on `grpc.aio`, the input in raw contents as `tritonclient.grpc` sends it; one channel (one
  HTTP/2 connection) per client.
- v2 http json: `POST /v2/models/{model}/infer` with a JSON tensor (httpx, one connection per
  client).
- v1 predict: `POST /v1/models/{model}/predict` (httpx, one connection per client).

At each number of clients the three protocols run back to back, so a change in the machine's
load (other processes) weighs on them alike.

Every request is one digit (sklearn's first 8x8 digit: 8 time steps of 8 features) and asks
for every output. Reported per row: answers per second (errors excluded, and counted), p50 and
p99 latency as the client saw it, and the client process's CPU use (near 100% means the
client, not the server, set the pace). Server and client share the machine's cores, so
compare rows of one run.

    .venv/bin/python bench/grpc_infer.py [--seconds 5] [--warmup 1] [--concurrency 1 64]
        [--model digits-lru] [--append docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import torch
from sklearn.datasets import load_digits
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `python bench/grpc_infer.py` from anywhere

from bench._report import append_section  # noqa: E402

PROTOCOLS = ("grpc", "v2 http json", "v1 predict")
START_TIMEOUT_S = 120.0


def one_digit() -> np.ndarray:
    """[1, 8, 8] float32: the first digit of sklearn's set, one row of 8 features per step."""
    return load_digits().images[:1].astype(np.float32)


# ---- the client process ---------------------------------------------------------------------


async def _closed_loop(send: Any, concurrency: int, warmup: float, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    measuring = False

    async def client(index: int) -> None:
        nonlocal errors
        while not stop.is_set():
            start = time.perf_counter()
            ok = await send(index)
            if measuring:
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

    stop = asyncio.Event()
    tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
    await asyncio.sleep(warmup)
    measuring = True
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    measuring = False
    elapsed = time.perf_counter() - started
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    ms = np.array(latencies) * 1000.0
    return {
        "answers": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "client_cpu": cpu / elapsed,
    }


async def run_grpc(
    address: str, model: str, concurrency: int, warmup: float, seconds: float
) -> dict:
    digit = one_digit()
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(digit.shape))
    request.raw_input_contents.append(digit.astype("<f4").tobytes())
    # One connection per client: channels with a local subchannel pool do not share one.
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(concurrency)
    ]
    stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels]

    async def send(index: int) -> bool:
        try:
            response = await stubs[index].ModelInfer(request, timeout=30)
        except grpc.aio.AioRpcError:
            return False
        return len(response.outputs) == 6

    try:
        return await _closed_loop(send, concurrency, warmup, seconds)
    finally:
        for channel in channels:
            await channel.close()


async def run_http(
    base_url: str, protocol: str, model: str, concurrency: int, warmup: float, seconds: float
) -> dict:
    digit = one_digit()
    if protocol == "v1 predict":
        path, body = f"/v1/models/{model}/predict", {"inputs": digit.tolist()}
    else:
        tensor = {"name": "input", "datatype": "FP32", "shape": list(digit.shape),
                  "data": digit.reshape(-1).tolist()}  # fmt: skip
        path, body = f"/v2/models/{model}/infer", {"inputs": [tensor]}
    payload = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    clients = [httpx.AsyncClient(base_url=base_url, timeout=30) for _ in range(concurrency)]

    async def send(index: int) -> bool:
        try:
            response = await clients[index].post(path, content=payload, headers=headers)
        except httpx.HTTPError:
            return False
        return response.status_code < 400

    try:
        return await _closed_loop(send, concurrency, warmup, seconds)
    finally:
        for client in clients:
            await client.aclose()


def client_main(args: argparse.Namespace) -> int:
    if args.client == "grpc":
        result = asyncio.run(
            run_grpc(args.grpc_address, args.model, args.clients, args.warmup, args.seconds)
        )
    else:
        result = asyncio.run(
            run_http(
                args.base_url, args.client, args.model, args.clients, args.warmup, args.seconds
            )
        )
    print(json.dumps(result))
    return 0


# ---- the server and the table ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(log: Path) -> tuple[subprocess.Popen, str, str]:
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(http_port),
               "--grpc-port", str(grpc_port), "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("NEUROSERVE_")}
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
                return server, base_url, f"127.0.0.1:{grpc_port}"
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("neuroserve serve was not ready in time")


def measure(protocol: str, concurrency: int, args: argparse.Namespace, base_url: str,
            grpc_address: str) -> dict:  # fmt: skip
    command = [sys.executable, __file__, "--client", protocol, "--clients", str(concurrency),
               "--base-url", base_url, "--grpc-address", grpc_address, "--model", args.model,
               "--seconds", str(args.seconds), "--warmup", str(args.warmup)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[tuple[str, int, dict]]) -> str:
    lines = [
        "| protocol | clients | requests/s | p50 ms | p99 ms | errors | client CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for protocol, clients, r in rows:
        rate = r["answers"] / r["seconds"]
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.2f}"
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.2f}"
        lines.append(
            f"| {protocol} | {clients} | {rate:,.0f} | {p50} | {p99} | {r['errors']} | "
            f"{r['client_cpu']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--model", default="digits-lru")
    parser.add_argument("--append", type=Path, help="append the table to this Markdown file")
    # The client process (run by this script for each row).
    parser.add_argument("--client", choices=PROTOCOLS, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--grpc-address", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return client_main(args)

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        server, base_url, grpc_address = start_server(Path(folder) / "server.log")
        try:
            for concurrency in args.concurrency:  # the protocols back to back at each level
                for protocol in PROTOCOLS:
                    result = measure(protocol, concurrency, args, base_url, grpc_address)
                    rows.append((protocol, concurrency, result))
                    print(f"{protocol:>13} x{concurrency:<3} {result}", file=sys.stderr)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)
    caption = (
        f"{args.model}, one digit (8 steps of 8 features) per request, every output; one "
        f"`neuroserve serve` (1 worker, in-process store, batching on) and one client process "
        f"per row, closed loop, {args.warmup:g} s warm-up then {args.seconds:g} s per row; server "
        f"and client on the same {os.cpu_count()} cores ({platform.machine()}, load average "
        f"{os.getloadavg()[0]:.1f} at the end), 1 torch thread, torch {torch.__version__}. "
        "requests/s counts answers without error."
    )
    result = f"{caption}\n\n{table(rows)}"
    print(result)
    if args.append:
        command = "python bench/grpc_infer.py " + " ".join(argv or sys.argv[1:])
        append_section(
            args.append, "## V2 over gRPC, HTTP and native REST", result, command.strip()
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
