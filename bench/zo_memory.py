"""Peak memory of one zeroth-order step against one backprop-through-time step, by length.

Same model for all (digits-lru's original architecture: LRU, d_model 64, d_state 64, 2 layers,
random weights), batch 16, random 8-feature inputs, a classification loss on the last step:

- zo_streaming: one MeZO step (two perturbed passes) whose passes feed one `step()` at a
  time and keep only the recurrent state;
- zo_parallel: the same step, but each pass runs the parallel-scan `forward` without
  gradients, which still materialises [B, T, ...] activations;
- bptt: one backprop-through-time step (forward with autograd, backward, SGD update).

How it is measured: tracemalloc cannot see torch's allocations, so every measurement runs in
a fresh Python process that builds the model and data, warms up with a 2-step sequence,
resets the kernel's peak-RSS counter (writing "5" to /proc/self/clear_refs), runs one step
and reports VmHWM - VmRSS from /proc/self/status: the extra resident memory the step needed
at its peak, as the kernel saw it. Linux only.

    OMP_NUM_THREADS=1 .venv/bin/python bench/zo_memory.py [--lengths 64 256 1024 4096]

Prints a markdown table in MiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
from pathlib import Path

METHODS = ("zo_streaming", "zo_parallel", "bptt")
BATCH = 16
ARCHITECTURE = {"d_input": 8, "d_output": 10, "d_model": 64, "d_state": 64, "n_layers": 2}


def _status_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1))


def measure(method: str, length: int) -> int:
    """Extra peak resident bytes of one training step of `method` (run in a fresh process)."""
    import torch

    from models.architectures import build_model
    from models.zo import ZOConfig, ZOOptimizer
    from service.finetuning.forward import BackendForward

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("lru", dict(ARCHITECTURE, dropout=0.0))
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(BATCH, length, 8, generator=generator) * 16  # [B, T, F]
    labels = torch.randint(0, 10, (BATCH,), generator=generator)

    if method == "bptt":
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def one_step(inputs):
            logits, _ = model(inputs)  # [B, T, C], every activation kept for backward
            loss = torch.nn.functional.cross_entropy(logits[:, -1], labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    else:
        zo = ZOOptimizer(list(model.named_parameters()), ZOConfig())
        forward = BackendForward(model, stream=method == "zo_streaming")

        def one_step(inputs):
            zo.step([7], lambda seed: forward.loss(inputs, labels, "cross_entropy"), lr=1e-4)

    one_step(x[:, :2])  # warm-up: lazy initialisation, kernels, allocator pools
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_kib("VmRSS")
    one_step(x)
    return (_status_kib("VmHWM") - before) * 1024


def run_isolated(method: str, length: int) -> int:
    command = [sys.executable, __file__, "--measure", method, "--length", str(length)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child process: one measurement
        print(json.dumps({"peak_bytes": measure(args.measure, args.length)}))
        return
    mib = 1024 * 1024
    print(
        f"Extra peak RSS of one training step, MiB (LRU {ARCHITECTURE['d_model']}x"
        f"{ARCHITECTURE['d_state']}x{ARCHITECTURE['n_layers']}, batch {BATCH})\n"
    )
    print("| T | " + " | ".join(METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for length in args.lengths:
        cells = [f"{run_isolated(method, length) / mib:.2f}" for method in METHODS]
        print(f"| {length} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
