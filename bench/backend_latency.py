"""Per-step latency of the onnxruntime and analog_imc backends against the torch backend.

For every built-in architecture (default config, seeded random weights) and batch sizes 1
and 64, times `runner.step` (the serving path, conversions included) on torch, onnxruntime
and analog_imc (default options: rescaled mapping, t = 0, drift compensation) in the same
process, with the same thread count, their blocks interleaved (fastest of 5 kept).
analog_imc is timed twice on the same chip: as served (conductances read once per chip and
inference time, output noise per read from each sequence's stream) and as before (every
call re-reading all conductances with fresh 1/f noise, `bench/_analog_before.py`).

    .venv/bin/python bench/backend_latency.py [--steps 200] [--threads 1] [--batches 1 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from hardware_backends.analog_imc import AnalogIMCBackend
from hardware_backends.base import Runner
from hardware_backends.onnx_export import ExportCache
from hardware_backends.onnxruntime_backend import OnnxRuntimeBackend
from hardware_backends.torch_backend import TorchBackend
from models.architectures import ARCHITECTURES, build_model
from models.base import StatefulModel

try:
    from bench._analog_before import rereading_runner
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from _analog_before import rereading_runner

REPEATS = 5  # timing blocks per measurement; the median block is reported


def example_steps(model: StatefulModel, batch: int, steps: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    cfg = model.config
    if model.input_kind == "tokens":
        return torch.randint(0, cfg.vocab_size, (batch, steps), generator=generator)
    return torch.rand(batch, steps, cfg.d_input, generator=generator) / abs(cfg.input_scale)


def block_seconds(runner: Runner, x: torch.Tensor) -> float:
    """Mean time of one `step` over a block of x.shape[1] steps from a fresh state."""
    state = runner.init_state(x.shape[0])
    start = time.perf_counter()
    for t in range(x.shape[1]):
        _, state, _ = runner.step(x[:, t], state)
    return (time.perf_counter() - start) / x.shape[1]


def seconds_per_step(runners: dict[str, Runner], x: torch.Tensor) -> dict[str, float]:
    """Fastest of REPEATS blocks per runner, the runners' blocks interleaved (so that load
    from elsewhere on the machine hits them alike), after a warm-up block each."""
    timings: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(REPEATS + 1):
        for name, runner in runners.items():
            seconds = block_seconds(runner, x)
            if repeat:  # the first block warms caches and allocators up
                timings[name].append(seconds)
    return {name: min(values) for name, values in timings.items()}


def measure(steps: int, threads: int, batches: list[int]) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        onnx_backend = OnnxRuntimeBackend(cache_dir=cache_dir, exports=ExportCache())
        for architecture in sorted(ARCHITECTURES):
            torch.manual_seed(0)
            model = build_model(architecture, {})
            key = f"bench-{architecture}/1"
            torch_runner = TorchBackend().prepare(model, model_key=key, options={"device": "cpu"})
            options = {"intra_op_threads": threads, "inter_op_threads": 1}
            onnx_runner = onnx_backend.prepare(model, model_key=key, options=options)
            analog_runner = AnalogIMCBackend().prepare(model, model_key=key)
            before_runner = rereading_runner(analog_runner)
            for batch in batches:
                x = example_steps(model, batch, steps)
                runners = {"torch": torch_runner, "onnx": onnx_runner}
                runners |= {"analog": analog_runner, "before": before_runner}
                timed = seconds_per_step(runners, x)
                torch_s, onnx_s = timed["torch"], timed["onnx"]
                analog_s, before_s = timed["analog"], timed["before"]
                rows.append(
                    {
                        "architecture": architecture,
                        "batch": batch,
                        "dense_macs": model.macs_per_step()["dense_macs"],
                        "torch_us": torch_s * 1e6,
                        "onnxruntime_us": onnx_s * 1e6,
                        "speedup": torch_s / onnx_s,
                        "analog_us": analog_s * 1e6,
                        "analog_before_us": before_s * 1e6,
                    }
                )
    return rows


def print_table(rows: list[dict], threads: int) -> None:
    print(f"per-step latency, fastest of {REPEATS} interleaved blocks, {threads} thread(s)")
    columns = ["architecture", "batch", "dense MACs/sample", "torch µs/step"]
    columns += ["onnxruntime µs/step", "torch/ort", "analog_imc µs/step", "analog/torch"]
    columns += ["analog_imc before (re-read per call) µs/step", "before/torch"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['architecture']} | {r['batch']} | {r['dense_macs']:,} | {r['torch_us']:.1f} "
            f"| {r['onnxruntime_us']:.1f} | {r['speedup']:.2f}x | {r['analog_us']:.1f} "
            f"| {r['analog_us'] / r['torch_us']:.1f}x | {r['analog_before_us']:.1f} "
            f"| {r['analog_before_us'] / r['torch_us']:.1f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per timing block")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    if args.steps < 1 or args.threads < 1 or min(args.batches) < 1:
        parser.error("--steps, --threads and --batches must be positive")
    print_table(measure(args.steps, args.threads, args.batches), args.threads)


if __name__ == "__main__":
    main()
