"""Per-step latency and per-session state against context length: selective SSM vs Transformer.

Generating one token costs a state-space model the same at any context length: its state is
a fixed-size summary. A Transformer decoding with a KV cache attends to every cached
position, so its per-step time and its cache (the state a server would keep per session)
grow linearly with the context. This bench measures both, batch 1, on CPU:

- the selective SSM in the `charlm-selective` configuration (seeded random weights: speed
  and memory do not depend on training), fed the context with `forward`, then timed `step`;
- a decoder-only Transformer with a KV cache (`bench/_transformer_baseline.py`), as deep as
  the SSM and as wide as brings its parameter count closest, prefilled with the context, then
  timed `step`.

Both `step`s are the fused ones (models/selective_fused.py; the baseline's `decode_step`:
SDPA over a preallocated cache, fused QKV, the same weight layout and norm folding); each
model's `step_reference`, the plain module-by-module step, is timed beside it in the same
rounds, so the table shows what the fused steps changed.

Each time is the fastest of `--repeats` blocks of `--steps` decode steps, every block
starting again from the same context; blocks of all contexts and both models take turns in
a freshly shuffled order each round (after a warm-up round), so changes in machine load hit
them alike and no block always follows the same one.

    .venv/bin/python bench/context_length.py [--contexts 64 256 1024 2048 4096 8192]
        [--steps 16] [--repeats 5] [--threads 1] [--append docs/BENCHMARKS.md]
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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from models.architectures import build_model
from models.base import StatefulModel
from models.builtin import BUILTIN_RECIPES
from models.charcorpus import VOCABULARY

try:
    from bench._transformer_baseline import DecoderConfig, TransformerDecoder
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from _transformer_baseline import DecoderConfig, TransformerDecoder
try:
    from bench._report import append_section
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from _report import append_section

DEFAULT_CONTEXTS = [64, 256, 1024, 2048, 4096, 8192]
HEADING = "## Context length"


def selective_lm() -> StatefulModel:
    """The charlm-selective architecture and sizes over the character vocabulary."""
    recipe = BUILTIN_RECIPES["charlm-selective"]
    vocab = len(VOCABULARY)
    config = {**recipe.model_config, "input_kind": "tokens", "vocab_size": vocab, "d_output": vocab}
    torch.manual_seed(0)
    return build_model(recipe.architecture, config).eval()


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # tied weights are counted once


def matched_decoder(target: int, n_layers: int, n_heads: int = 4) -> TransformerDecoder:
    """The Transformer of `n_layers` whose width gives the parameter count closest to target."""
    candidates = []
    for d_model in range(2 * n_heads, 1025, 2 * n_heads):  # even head dims for the positions
        torch.manual_seed(0)
        candidates.append(
            TransformerDecoder(DecoderConfig(len(VOCABULARY), d_model, n_heads, n_layers))
        )
        if parameter_count(candidates[-1]) > target:
            break
    return min(candidates, key=lambda m: abs(parameter_count(m) - target)).eval()


@dataclass
class DecodeRun:
    """One model decoding after one context: `reset` goes back to the state right after the
    context, `step(t)` decodes the t-th token of the block."""

    reset: Callable[[], None]
    step: Callable[[int], None]
    state_bytes: int  # what a server keeps per session at this context length


def ssm_run(
    model: StatefulModel, context: Tensor, next_tokens: Tensor, reference: bool = False
) -> DecodeRun:
    _, after_context = model(context)  # {name: [1, ...]}, the fixed-size state
    state: dict[str, Tensor] = {}
    model_step = model.step_reference if reference else model.step

    def step(t: int) -> None:
        _, new_state = model_step(next_tokens[t], state)
        state.update(new_state)

    return DecodeRun(
        reset=lambda: state.update(after_context),
        step=step,
        state_bytes=sum(tensor.nbytes for tensor in after_context.values()),
    )


def transformer_run(
    model: TransformerDecoder, context: Tensor, next_tokens: Tensor, reference: bool = False
) -> DecodeRun:
    length = context.shape[1]
    cache = model.new_cache(1, length + len(next_tokens))
    model(context, cache)  # prefill: keys and values of every context position
    model_step = model.step_reference if reference else model.step

    def reset() -> None:
        cache.length = length  # the block's own slots are simply overwritten

    return DecodeRun(
        reset=reset,
        step=lambda t: model_step(next_tokens[t], cache),
        state_bytes=cache.nbytes(),
    )


def seconds_per_step(runs: list[DecodeRun], steps: int, repeats: int) -> list[float]:
    """The fastest block's mean step time for every run.

    Every run gets one block per round, `repeats` rounds after a warm-up round, so a change
    in machine load hits every context alike; the order is shuffled each round (seeded), so
    no block always follows the same one (a block runs slower after one that filled the
    caches with other data). The fastest block is reported because on a shared machine the
    slower ones measure the other load, not the code.
    """
    best = [math.inf] * len(runs)
    order = list(range(len(runs)))
    shuffler = random.Random(0)
    for round_ in range(repeats + 1):
        shuffler.shuffle(order)
        for i in order:
            run = runs[i]
            run.reset()
            started = time.perf_counter()
            for t in range(steps):
                run.step(t)
            if round_:
                best[i] = min(best[i], (time.perf_counter() - started) / steps)
    return best


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.inference_mode()
def measure(contexts: list[int], steps: int, repeats: int, threads: int) -> tuple[list, dict]:
    torch.set_num_threads(threads)
    ssm = selective_lm()
    decoder = matched_decoder(parameter_count(ssm), n_layers=ssm.config.n_layers)
    models = {
        "ssm_parameters": parameter_count(ssm),
        "ssm_macs_per_step": ssm.macs_per_step()["dense_macs"],
        "transformer_parameters": parameter_count(decoder),
        "transformer_config": decoder.config,
    }
    next_tokens = torch.randint(0, len(VOCABULARY), (steps, 1), generator=_generator(1))
    runs: dict[tuple[str, str, int], DecodeRun] = {}
    for length in contexts:
        context = torch.randint(0, len(VOCABULARY), (1, length), generator=_generator(0))
        for reference in (False, True):
            kind = "reference" if reference else "fused"
            runs[("ssm", kind, length)] = ssm_run(ssm, context, next_tokens, reference)
            runs[("transformer", kind, length)] = transformer_run(
                decoder, context, next_tokens, reference
            )
    seconds = dict(zip(runs, seconds_per_step(list(runs.values()), steps, repeats), strict=True))
    rows = [
        {
            "context": length,
            "ssm": {
                "seconds": seconds[("ssm", "fused", length)],
                "reference_seconds": seconds[("ssm", "reference", length)],
                "bytes": runs[("ssm", "fused", length)].state_bytes,
            },
            "transformer": {
                "seconds": seconds[("transformer", "fused", length)],
                "reference_seconds": seconds[("transformer", "reference", length)],
                "bytes": runs[("transformer", "fused", length)].state_bytes,
                "macs": decoder.macs_per_step(length),
            },
        }
        for length in contexts
    ]
    return rows, models


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def format_table(rows: list[dict], models: dict, threads: int, steps: int, repeats: int) -> str:
    tf = models["transformer_config"]
    lines = [
        f"Batch 1, CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} when the run ended), {threads} torch "
        f"thread(s), torch {torch.__version__}; fastest of {repeats} interleaved blocks of "
        f"{steps} steps. "
        f"Selective SSM (charlm-selective config): {models['ssm_parameters']:,} parameters, "
        f"{models['ssm_macs_per_step']:,} MACs/step. Transformer ({tf.n_layers} layers, "
        f"d_model {tf.d_model}, {tf.n_heads} heads, KV cache): "
        f"{models['transformer_parameters']:,} parameters.",
        "",
        "| context | SSM µs/step | SSM reference µs/step | SSM state KiB "
        "| Transformer µs/step | Transformer reference µs/step | Transformer KV cache KiB "
        "| Transformer MACs/step | time ratio T/SSM | memory ratio T/SSM |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ssm, tr = row["ssm"], row["transformer"]
        lines.append(
            f"| {row['context']:,} | {ssm['seconds'] * 1e6:,.0f} "
            f"| {ssm['reference_seconds'] * 1e6:,.0f} | {_kib(ssm['bytes'])} "
            f"| {tr['seconds'] * 1e6:,.0f} | {tr['reference_seconds'] * 1e6:,.0f} "
            f"| {_kib(tr['bytes'])} | {tr['macs']:,} "
            f"| {tr['seconds'] / ssm['seconds']:.2f} | {tr['bytes'] / ssm['bytes']:.1f} |"
        )
    first, last = rows[0], rows[-1]
    ssm, tr = last["ssm"], last["transformer"]
    lines += [
        "",
        f"SSM step at {last['context']:,} against {first['context']:,} tokens: "
        f"{ssm['seconds'] / first['ssm']['seconds']:.2f}x. Fused against reference step at "
        f"{last['context']:,}: SSM {ssm['reference_seconds'] / ssm['seconds']:.2f}x faster, "
        f"Transformer {tr['reference_seconds'] / tr['seconds']:.2f}x faster. Time ratio "
        "T/SSM: fused Transformer over fused SSM.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timing block")
    parser.add_argument("--repeats", type=int, default=5, help="timing blocks (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--append", type=Path, default=None, help="append the table here")
    args = parser.parse_args()
    if any(c < 1 for c in args.contexts) or args.steps < 1 or args.repeats < 1:
        parser.error("contexts, steps and repeats must be positive")
    rows, models = measure(args.contexts, args.steps, args.repeats, args.threads)
    table = format_table(rows, models, args.threads, args.steps, args.repeats)
    print(table)
    if args.append is not None:
        command = "python bench/context_length.py " + " ".join(sys.argv[1:])
        append_section(args.append, HEADING, table, command.strip())


if __name__ == "__main__":
    main()
