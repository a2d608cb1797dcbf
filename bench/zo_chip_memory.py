"""Peak memory of chip-in-the-loop zeroth-order tuning: serving's per-call `prepare` against
`ChipInTheLoop`, over a number of ZO steps.

Each ZO step measures two losses (theta +- eps*z) on the analog backend. Two ways:

- prepare_per_call: what tuning did before (and what serving's backend does): every loss
  call runs `AnalogIMCBackend.prepare` on one private backend instance with a fresh model
  key, which deep-copies the model into a snapshot and programs a chip into the backend's
  8-entry chip cache, where no later call can use it;
- chip_in_the_loop: `service.finetuning.chip_loop.ChipInTheLoop`: the live weights on one
  chip for the whole run; every parameter moves here, so every call rewrites every matrix,
  one at a time (the old matrix is dropped before its replacement is written), and both
  calls of a pair share the output-noise seed.

Model: an LRU with random weights (default d_model 512, d_state 512, 4 layers: about 4.2M
parameters), batch 8 sequences of 8 steps. Measured as bench/zo_memory.py does: each
(method, steps) runs in a fresh process that builds the model, warms up with one loss call,
resets the kernel's peak-RSS counter and reports VmHWM - VmRSS (extra resident memory at the
peak) and the resident growth after the last step. Linux only.

    OMP_NUM_THREADS=1 .venv/bin/python bench/zo_chip_memory.py [--steps 1 4 16] [--d-model 512]
        [--methods prepare_per_call chip_in_the_loop] [--pin-mmap-threshold]

Prints a markdown table in MiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

METHODS = ("prepare_per_call", "chip_in_the_loop")
BATCH, LENGTH = 8, 8


def _status_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1))


def measure(method: str, steps: int, d_model: int, layers: int) -> dict[str, int]:
    """Extra peak and retained resident bytes of `steps` ZO steps (in a fresh process)."""
    import torch

    from hardware_backends.analog_imc import AnalogIMCBackend
    from models.architectures import build_model
    from service.finetuning.chip_loop import ChipInTheLoop

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = {"d_input": 8, "d_output": 10, "d_model": d_model, "d_state": d_model}
    model = build_model("lru", dict(config, n_layers=layers, dropout=0.0)).eval()
    parameters = [p for p in model.parameters()]
    x = torch.rand(BATCH, LENGTH, 8, generator=torch.Generator().manual_seed(1)) * 16
    backend, loop, calls = AnalogIMCBackend(), ChipInTheLoop(model), [0]

    def loss(seed: int) -> float:
        calls[0] += 1
        if method == "prepare_per_call":
            runner = backend.prepare(model, model_key=f"zo/{calls[0]}", options={"seed": seed})
        else:
            runner = loop.runner(noise_seed=seed)
        logits, _, _ = runner.run(x)  # [B, T, C]
        return float(logits[:, -1].logsumexp(dim=-1).mean())

    @torch.no_grad()
    def zo_step(seed: int) -> None:
        directions = [torch.randn_like(p, generator=torch.Generator().manual_seed(seed + i))
                      for i, p in enumerate(parameters)]  # fmt: skip
        for p, z in zip(parameters, directions, strict=True):
            p.add_(z, alpha=1e-3)
        loss(seed)
        for p, z in zip(parameters, directions, strict=True):
            p.sub_(z, alpha=2e-3)
        loss(seed)
        for p, z in zip(parameters, directions, strict=True):
            p.add_(z, alpha=1e-3)

    loss(0)  # warm-up: lazy initialisation, kernels, allocator pools
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_kib("VmRSS")
    for step in range(steps):
        zo_step(1000 * (step + 1))
    gc.collect()
    return {
        "peak_bytes": (_status_kib("VmHWM") - before) * 1024,
        "retained_bytes": (_status_kib("VmRSS") - before) * 1024,
        "parameters": sum(p.numel() for p in parameters),
    }


def run_isolated(
    method: str, steps: int, d_model: int, layers: int, pin_mmap_threshold: bool = False
) -> dict[str, int]:
    command = [sys.executable, __file__, "--measure", method, "--n", str(steps),
               "--d-model", str(d_model), "--layers", str(layers)]  # fmt: skip
    env = dict(os.environ)
    if pin_mmap_threshold:  # glibc's default: 128 KiB, raised by every larger block freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--pin-mmap-threshold",
        action="store_true",
        help="children run with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_)",
    )
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child process: one measurement
        print(json.dumps(measure(args.measure, args.n, args.d_model, args.layers)))
        return
    mib = 1024 * 1024
    rows = []
    for steps in args.steps:
        cells = []
        for method in args.methods:
            result = run_isolated(method, steps, args.d_model, args.layers, args.pin_mmap_threshold)
            cells.append(f"{result['peak_bytes'] / mib:.1f} / {result['retained_bytes'] / mib:.1f}")
        rows.append(f"| {steps} | {2 * steps} | " + " | ".join(cells) + " |")
    print(
        f"Chip-in-the-loop ZO steps on analog_imc: extra peak / retained RSS, MiB (LRU "
        f"d_model {args.d_model}, {args.layers} layers, {result['parameters']:,} parameters, "
        f"batch {BATCH}x{LENGTH})\n"
    )
    print("| ZO steps | loss calls | " + " | ".join(args.methods) + " |")
    print("|---|---|" + "---|" * len(args.methods))
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
