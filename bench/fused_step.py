"""Step time of every built-in: the fused step against its reference twin, batch 1 and more.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fused_step.py [--batches 1 16] [--steps 64]
        [--repeats 9] [--compile] [--append docs/BENCHMARKS.md]

Each built-in artifact (digits-lru, digits-snn, charlm-selective) steps through a fixed
input stream (digits test rows, tokens of the held-out text) from the zero state, in eval
mode under `torch.inference_mode()`, one torch thread:

- `reference`: `model.step_reference`, the plain step kept beside the fused one;
- `fused`: `model.step`, which takes the fused path (models/*_fused.py) here;
- `runner`: the torch backend's `runner.step`, what the server calls per step (input checks,
  device moves and the usage counters around `model.step`).

Times are the fastest of `--repeats` blocks of `--steps` steps; blocks of every (model,
path, batch) take turns in an order shuffled every round, after a warm-up round, so machine
load hits them alike and no block always follows the same one. The largest
difference between the fused and reference logits and states over the stream (relative
where a value exceeds 1) is printed beside them. For the models with a numba kernel
(models/kernels.py: charlm-selective, digits-lru) at every batch, the fused step is also
timed through the kernel and as torch ops, called alike (no input checks), which is where
`KERNEL_MAX_BATCH` comes from. `--compile` adds, at batch 1, the same step run eagerly and
compiled by torch.compile (inductor), with its compile time.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from hardware_backends.registry import prepare_runner
from models.base import State, StatefulModel
from models.charcorpus import load_char_corpus
from models.digits import load_digits_seq
from models.lru_fused import fused_lru_step, kernel_lru_step
from models.lru_fused import model_step as lru_model_step
from models.repository import ModelRepository, default_repository_root
from models.selective_fused import (
    fused_selective_step,
    kernel_selective_step,
    model_step,
    scripted_model_step,
)

try:
    from bench._report import append_section
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from _report import append_section

HEADING = "## Fused step"
MODELS = ("digits-lru", "digits-snn", "charlm-selective")


def input_stream(model: StatefulModel, batch: int, steps: int) -> list[Tensor]:
    """`steps` real inputs of `batch` samples: digits rows (cycled) or held-out characters."""
    if model.input_kind == "tokens":
        ids = load_char_corpus().valid_ids[: batch * steps]  # [batch * steps]
        return list(ids.view(batch, steps).t())  # steps x [B]
    rows = load_digits_seq("test").inputs[:batch]  # [B, 8, 8]
    return [rows[:, t % rows.shape[1]] for t in range(steps)]  # steps x [B, 8]


def stepper(step: Callable, state: State, inputs: list[Tensor]) -> Callable[[], None]:
    """A block: every input once, from `state`, through `step(x_t, state) -> (logits, state)`."""

    def block() -> None:
        current = state
        for x_t in inputs:
            current = step(x_t, current)[1]

    return block


def largest_difference(model: StatefulModel, inputs: list[Tensor]) -> float:
    """max |fused − reference| / max(1, |reference|) over logits and states along the stream:
    the absolute difference for values up to 1, the relative one above (a spiking readout
    integrates to logits in the tens)."""
    fused = reference = model.init_state(inputs[0].shape[0])
    worst = 0.0
    for x_t in inputs:
        logits_f, fused = model.step(x_t, fused)
        logits_r, reference = model.step_reference(x_t, reference)
        pairs = [(logits_f, logits_r)] + [(fused[n], reference[n]) for n in fused]
        worst = max(worst, *(float(((a - b).abs() / b.abs().clamp_min(1)).max()) for a, b in pairs))
    return worst


def fastest(blocks: dict, repeats: int) -> dict:
    """Fastest block time of each, blocks taking turns in an order shuffled every round (so
    no block always follows the same one); a warm-up round first."""
    best = dict.fromkeys(blocks, math.inf)
    order = list(blocks)
    shuffler = random.Random(0)
    for round_ in range(repeats + 1):
        shuffler.shuffle(order)
        for name in order:
            block = blocks[name]
            started = time.perf_counter()
            block()
            if round_:
                best[name] = min(best[name], time.perf_counter() - started)
    return best


def compiled_step_blocks(name: str, model: StatefulModel, inputs: list[Tensor]) -> dict:
    """The fused step through its numba kernel ("kernel") and as torch ops ("torch":
    charlm-selective's TorchScript function, digits-lru's eager one), each called the same
    way: straight to the fused step, no input checks."""
    state = model.init_state(inputs[0].shape[0])
    derived = model._fused_weights.get(model)
    if name == "charlm-selective":
        kernel, torch_step = kernel_selective_step, scripted_model_step
        fused = fused_selective_step
    else:
        kernel, torch_step, fused = kernel_lru_step, lru_model_step, fused_lru_step
    return {
        "kernel": stepper(lambda x, s: kernel(derived, x, s), state, inputs),
        "torch": stepper(lambda x, s: fused(model, x, s, torch_step), state, inputs),
    }


def eager_and_inductor_blocks(model: StatefulModel, inputs: list[Tensor]) -> tuple[dict, float]:
    """The same step run eagerly and compiled by torch.compile; the second value is
    torch.compile's compile time (its first call) in seconds."""
    compiled = torch.compile(model_step, dynamic=False)
    state = model.init_state(inputs[0].shape[0])
    started = time.perf_counter()
    fused_selective_step(model, inputs[0], state, step=compiled)
    compile_seconds = time.perf_counter() - started
    blocks = {
        "eager": stepper(
            lambda x, s: fused_selective_step(model, x, s, step=model_step), state, inputs
        ),
        "torch.compile": stepper(
            lambda x, s: fused_selective_step(model, x, s, step=compiled), state, inputs
        ),
    }
    return blocks, compile_seconds


def measure(batches: list[int], steps: int, repeats: int, compile_too: bool) -> tuple[list, dict]:
    torch.set_num_threads(1)
    repository = ModelRepository(default_repository_root())
    # Loaded outside inference mode, as the server does: parameters keep version counters.
    models = {name: repository.load(name).model.eval() for name in MODELS}
    with torch.inference_mode():
        return _measure(models, batches, steps, repeats, compile_too)


def _measure(
    models: dict[str, StatefulModel],
    batches: list[int],
    steps: int,
    repeats: int,
    compile_too: bool,
) -> tuple[list, dict]:
    blocks, rows, extra = {}, [], {}
    for name, model in models.items():
        runner = prepare_runner("torch", model, model_key=f"bench/{name}")
        for batch in batches:
            inputs = input_stream(model, batch, steps)
            state = model.init_state(batch)
            paths = {
                "reference": model.step_reference,
                "fused": model.step,
                "runner": lambda x, s, runner=runner: runner.step(x, s)[:2],
            }
            for path, step in paths.items():
                blocks[(name, batch, path)] = stepper(step, state, inputs)
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "macs": model.macs_per_step()["dense_macs"],
                    "difference": largest_difference(model, inputs),
                }
            )
            if name in KERNEL_MODELS:
                forms = compiled_step_blocks(name, model, inputs)
                if compile_too and batch == 1 and name == "charlm-selective":
                    more, extra["compile_seconds"] = eager_and_inductor_blocks(model, inputs)
                    forms.update(more)
                blocks.update({(name, batch, form): b for form, b in forms.items()})
    seconds = fastest(blocks, repeats)
    for row in rows:
        for path in COMPILED_FORMS + ("reference", "fused", "runner"):
            key = (row["model"], row["batch"], path)
            if key in seconds:
                row[path] = seconds[key] / steps
    return rows, extra


COMPILED_FORMS = ("kernel", "torch", "eager", "torch.compile")
KERNEL_MODELS = ("digits-lru", "charlm-selective")  # those with a kernel (models/kernels.py)


def format_table(rows: list[dict], extra: dict, steps: int, repeats: int) -> str:
    lines = [
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.1f} when the run ended), 1 torch thread, torch "
        f"{torch.__version__}; fastest of {repeats} interleaved blocks of {steps} steps, "
        "inference mode. `runner` is the torch backend's step (what the server calls). Largest "
        "difference: max over logits and states along the stream of |fused − reference| / "
        "max(1, |reference|).",
        "",
        "| model | batch | dense MACs/step | reference µs/step | fused µs/step | speed-up "
        "| runner µs/step | largest difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['macs']:,} "
            f"| {row['reference'] * 1e6:,.0f} | {row['fused'] * 1e6:,.0f} "
            f"| {row['reference'] / row['fused']:.2f}x | {row['runner'] * 1e6:,.0f} "
            f"| {row['difference']:.1e} |"
        )
    compiled_rows = [r for r in rows if "kernel" in r]
    if compiled_rows:
        lines += [
            "",
            "The fused step through its numba kernel and as torch ops (charlm-selective: the "
            "TorchScript function; digits-lru: eager), called alike (no input checks of "
            "`model.step`), µs/step:",
            "",
            "| model | batch | numba kernel | torch ops | torch / kernel |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in compiled_rows:
            lines.append(
                f"| {row['model']} | {row['batch']} | {row['kernel'] * 1e6:,.0f} "
                f"| {row['torch'] * 1e6:,.0f} | {row['torch'] / row['kernel']:.2f}x |"
            )
    for row in (r for r in rows if "torch.compile" in r):
        lines += [
            "",
            f"{row['model']}, batch {row['batch']}, the same call eagerly: "
            f"{row['eager'] * 1e6:,.0f} µs, by torch.compile (inductor) "
            f"{row['torch.compile'] * 1e6:,.0f} µs after {extra['compile_seconds']:.1f} s "
            "compiling on the first call.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=64, help="steps per timing block")
    parser.add_argument("--repeats", type=int, default=9, help="timing blocks (fastest of)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--append", type=Path, default=None, help="append the table here")
    args = parser.parse_args()
    if any(b < 1 for b in args.batches) or args.steps < 1 or args.repeats < 1:
        parser.error("batches, steps and repeats must be positive")
    rows, extra = measure(args.batches, args.steps, args.repeats, args.compile)
    table = format_table(rows, extra, args.steps, args.repeats)
    print(table)
    if args.append is not None:
        command = "OMP_NUM_THREADS=1 python bench/fused_step.py " + " ".join(sys.argv[1:])
        append_section(args.append, HEADING, table, command.strip())


if __name__ == "__main__":
    main()
