"""The cost of simulation: wall time of each backend on the same batch, relative to torch.

    OMP_NUM_THREADS=1 .venv/bin/python bench/backend_cost.py [--batch 64] [--repeats 3]
        [--threads 1] [--no-bitstream] [--append docs/BENCHMARKS.md]

For both built-in classifiers, one batch of digits test images (8 steps each) runs through
every backend's `runner.run` (the serving path of a stateless prediction): torch, onnxruntime,
the simulated PCM crossbar (analog_imc: the chip read once per inference time, fresh output
noise on every crossbar call, step by step), the stochastic sampler (16 weight samples as
parallel chains) and, unless --no-bitstream, stochastic computing on 1024-bit bitstreams.
Preparation (ONNX export, programming the chip, drawing weight samples) is timed once,
apart. Runs are interleaved over `--repeats` rounds after a warm-up round and the fastest
round is reported: on a shared machine the slower rounds measure the other load, not the
backend.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from hardware_backends.base import Runner
from hardware_backends.registry import prepare_runner
from models.digits import load_digits_seq
from models.repository import ModelRepository, default_repository_root
from service.dataplane.plane import runner_key

try:
    from bench._report import append_section
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from _report import append_section

HEADING = "## Backend cost"
MODELS = ("digits-lru", "digits-snn")
# (label, backend, options): what a request would name.
CONFIGURATIONS = (
    ("torch", "torch", {}),
    ("onnxruntime", "onnxruntime", {}),
    ("analog_imc", "analog_imc", {}),
    ("stochastic (sampling, S=16)", "stochastic", {}),
    ("stochastic (bitstream, 1024 bits)", "stochastic", {"mode": "bitstream"}),
)


def run_seconds(runner: Runner, x: torch.Tensor) -> float:
    start = time.perf_counter()
    runner.run(x)
    return time.perf_counter() - start


def measure(batch: int, repeats: int, bitstream: bool) -> list[dict]:
    repository = ModelRepository(default_repository_root())
    x = load_digits_seq("test").inputs[:batch]  # [batch, 8, 8]
    configurations = [c for c in CONFIGURATIONS if bitstream or "bitstream" not in c[0]]
    rows = []
    for name in MODELS:
        card = repository.card(name)
        model = repository.load(name).model
        runners = {}
        for label, backend, options in configurations:
            start = time.perf_counter()
            runners[label] = prepare_runner(
                backend, model, model_key=f"bench:{runner_key(card)}", options=options
            )
            prepare = time.perf_counter() - start
            rows.append({"model": name, "backend": label, "prepare": prepare, "runs": []})
        model_rows = rows[-len(configurations) :]
        for round_index in range(repeats + 1):
            for row in model_rows:
                seconds = run_seconds(runners[row["backend"]], x)
                if round_index:  # round 0 warms caches and allocators up
                    row["runs"].append(seconds)
        torch_best = min(model_rows[0]["runs"])
        for row in model_rows:
            row["best"] = min(row["runs"])
            row["ratio"] = row["best"] / torch_best
    return rows


def format_table(rows: list[dict], batch: int, repeats: int, threads: int) -> str:
    lines = [
        f"Batch of {batch} digits test images x 8 steps, CPU ({platform.machine()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} when the run ended), "
        f"{threads} torch thread(s), torch {torch.__version__}; fastest of {repeats} "
        "interleaved rounds after a warm-up round.",
        "",
        "| model | backend | prepare (s, once) | run (ms / batch) | µs / image | x torch |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['backend']} | {row['prepare']:.2f} "
            f"| {row['best'] * 1e3:,.1f} | {row['best'] / batch * 1e6:,.0f} "
            f"| {row['ratio']:,.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="test images per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (fastest kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-bitstream", dest="bitstream", action="store_false")
    parser.add_argument("--append", type=Path, default=None, help="append the table here")
    args = parser.parse_args()
    if not 1 <= args.batch <= 397 or args.repeats < 1 or args.threads < 1:
        parser.error("batch must be in 1..397 (the test split), repeats and threads positive")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("NEUROSERVE_ORT_INTRA_OP_THREADS", str(args.threads))
    rows = measure(args.batch, args.repeats, args.bitstream)
    table = format_table(rows, args.batch, args.repeats, args.threads)
    print(table)
    if args.append is not None:
        command = "python bench/backend_cost.py " + " ".join(sys.argv[1:])
        append_section(args.append, HEADING, table, command.strip())


if __name__ == "__main__":
    main()
