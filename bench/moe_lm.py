"""Routed experts against the dense selective SSM: held-out bits per character against the
MACs each token runs, as the server's usage reports them.

    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_lm.py [--control] [--append docs/BENCHMARKS.md]

Both built-in language models (`charlm-selective`, dense; `charlm-moe`, the same selective
SSM family with `mixer: "moe"`) read the held-out docstrings (the corpus's valid split, 44,645
characters) through the torch backend's runner, exactly as the server runs them: 8 streams
side by side in chunks of 512 that carry the state, as `models.evaluate.bits_per_character`
does. Bits per character is the mean next-character cross-entropy; MACs per token is the
runner's `Usage.macs` divided by the tokens read (for charlm-moe only the routers and the
experts each token was routed to), and the active fraction is `Usage.active_fraction`.
Expert load is the share of routed slots each expert received on the same text (per block:
the busiest and the idlest expert; 1/n each when balanced). Step time is one batch-1 `step`
of the torch runner, the fastest of 5 interleaved blocks of 200 steps, one torch thread.
Training step is one optimiser step of each built-in recipe (its batch of 32 windows of 128
characters, forward, loss with the load-balance term, backward, AdamW) on a fresh model,
the fastest of 3 interleaved blocks of 5 steps: times the recipe's steps, the training
budget.

`--control` also trains a dense model of about the MoE's MACs per token (d_model 128, the
charlm-selective recipe otherwise, ~5 min on one core) and scores it the same way: the
question is not only whether routed experts keep the dense model's quality at half its work,
but whether a dense model given the same work would do as well.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from hardware_backends.base import Usage
from hardware_backends.registry import prepare_runner
from models.base import StatefulModel
from models.builtin import BUILTIN_RECIPES
from models.charcorpus import load_char_corpus
from models.evaluate import LN2
from models.experts import RoutedExperts
from models.repository import ModelRepository, default_repository_root
from models.training import build_for_data, fit_language_model, load_training_data, seed_everything

try:
    from bench._report import append_section
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from _report import append_section

HEADING = "## Routed experts: MoE language model against the dense one"
DENSE, MOE = "charlm-selective", "charlm-moe"
N_STREAMS, CHUNK = 8, 512
STEP_BLOCKS, STEPS_PER_BLOCK = 5, 200
TRAIN_BLOCKS, TRAIN_STEPS_PER_BLOCK = 3, 5
CONTROL_CONFIG = {"d_model": 128}


def held_out_score(model: StatefulModel, key: str, ids: torch.Tensor) -> tuple[float, Usage, int]:
    """(bits per character, summed usage, tokens read) of the torch runner over `ids`."""
    runner = prepare_runner("torch", model, model_key=key)
    piece = len(ids) // N_STREAMS
    streams = ids[: piece * N_STREAMS].view(N_STREAMS, piece)  # [S, P]
    state, usage, nats, count = None, Usage(), 0.0, 0
    for start in range(0, piece - 1, CHUNK):
        stop = min(start + CHUNK, piece - 1)
        logits, state, chunk_usage = runner.run(streams[:, start:stop], state)  # [S, c, V]
        targets = streams[:, start + 1 : stop + 1]  # [S, c]
        nats += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        usage, count = usage + chunk_usage, count + targets.numel()
    return nats / count / LN2, usage, count


def expert_load(model: StatefulModel, ids: torch.Tensor) -> list[tuple[float, float]]:
    """(busiest, idlest) expert's share of routed slots per block over `ids`; [] if dense."""
    counts: list[torch.Tensor] = []

    def record(module: RoutedExperts, _inputs, output) -> None:
        chosen = output[1].reshape(-1, module.n_experts).topk(module.top_k, dim=-1).indices
        counts.append(torch.bincount(chosen.flatten(), minlength=module.n_experts).double())

    hooks = [
        m.register_forward_hook(record) for m in model.modules() if isinstance(m, RoutedExperts)
    ]
    if not hooks:
        return []
    with torch.no_grad():
        model(ids[: (len(ids) // N_STREAMS) * N_STREAMS].view(N_STREAMS, -1))
    for hook in hooks:
        hook.remove()
    shares = [c / c.sum() for c in counts]
    return [(float(s.max()), float(s.min())) for s in shares]


def step_times_us(models: dict[str, StatefulModel]) -> dict[str, float]:
    """Batch-1 torch-runner step time per model: fastest of interleaved blocks."""
    runners = {
        name: prepare_runner("torch", m, model_key=f"{name}/bench") for name, m in models.items()
    }
    best = dict.fromkeys(models, float("inf"))
    token = torch.tensor([5])
    for _ in range(STEP_BLOCKS):
        for name, runner in runners.items():
            state = runner.init_state(1)
            started = time.perf_counter()
            for _ in range(STEPS_PER_BLOCK):
                _, state, _ = runner.step(token, state)
            best[name] = min(best[name], (time.perf_counter() - started) / STEPS_PER_BLOCK)
    return {name: seconds * 1e6 for name, seconds in best.items()}


def train_step_seconds(names: list[str]) -> dict[str, float]:
    """Seconds of one training step of each built-in recipe (a fresh model, its batch and
    window, the loss with the auxiliary term, AdamW): fastest of interleaved blocks."""
    data = load_training_data("charcorpus")
    ids = data.corpus.train_ids
    models, optimisers = {}, {}
    for name in names:
        recipe = BUILTIN_RECIPES[name]
        seed_everything(recipe.seed)
        models[name] = build_for_data(recipe, data).train()
        optimisers[name] = torch.optim.AdamW(models[name].parameters(), lr=recipe.lr)
    generator = torch.Generator().manual_seed(0)
    best = dict.fromkeys(names, float("inf"))
    for _ in range(TRAIN_BLOCKS):
        for name in names:
            recipe, model = BUILTIN_RECIPES[name], models[name]
            shape = (TRAIN_STEPS_PER_BLOCK, recipe.batch_size)
            starts = torch.randint(0, len(ids) - recipe.seq_len - 1, shape, generator=generator)
            windows = ids[starts[..., None] + torch.arange(recipe.seq_len + 1)]  # [n, B, L+1]
            started = time.perf_counter()
            for batch in windows:  # [B, L+1]
                logits = model(batch[:, :-1])[0]  # [B, L, V]
                loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
                auxiliary = model.pop_auxiliary_loss()
                loss = loss if auxiliary is None else loss + auxiliary
                optimisers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimisers[name].step()
            seconds = (time.perf_counter() - started) / TRAIN_STEPS_PER_BLOCK
            best[name] = min(best[name], seconds)
    return best


def train_control() -> tuple[StatefulModel, float]:
    """The charlm-selective recipe at d_model 128: a dense model of about the MoE's MACs."""
    recipe = BUILTIN_RECIPES[DENSE]
    recipe = replace(recipe, model_config={**recipe.model_config, **CONTROL_CONFIG})
    data = load_training_data(recipe.dataset, seed=recipe.seed)
    seed_everything(recipe.seed)
    model = build_for_data(recipe, data)
    started = time.perf_counter()
    fit_language_model(model, data.corpus, recipe, progress=False)
    return model.eval(), time.perf_counter() - started


def measure(name: str, model: StatefulModel, ids: torch.Tensor, trained: str) -> dict:
    bpc, usage, tokens = held_out_score(model, f"{name}/bench", ids)
    return {
        "model": name,
        "config": model.config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "bpc": bpc,
        "macs": usage.macs / tokens,
        "routed_macs": usage.routed_macs / tokens,
        "active_fraction": usage.active_fraction,
        "load": expert_load(model, ids),
        "trained": trained,
    }


def format_table(
    rows: list[dict], step_us: dict[str, float], train_s: dict[str, float], tokens: int
) -> str:
    dense = rows[0]
    lines = [
        f"Held-out docstrings ({tokens:,} characters scored), torch backend, CPU "
        f"({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}. "
        "MACs / token from the runner's usage; Δ against charlm-selective.",
        "",
        "| model | mixer | parameters | valid bpc | Δ bpc | MACs / token | MACs vs dense "
        "| routed MACs / token | active fraction | expert load (busiest / idlest) "
        "| step (µs, batch 1) | training step (s) | trained |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in rows:
        cfg = row["config"]
        mixer = (
            f"moe: top-{cfg.top_k} of {cfg.n_experts}, d_expert {cfg.d_expert_resolved}"
            if cfg.mixer == "moe"
            else "ssm"
        )
        mixer += f" (d_model {cfg.d_model}, expand {cfg.expand})"
        fraction = "-" if row["active_fraction"] is None else f"{row['active_fraction']:.3f}"
        load = " ".join(f"{hi:.2f}/{lo:.2f}" for hi, lo in row["load"]) or "-"
        lines.append(
            f"| {row['model']} | {mixer} | {row['parameters']:,} | {row['bpc']:.4f} "
            f"| {row['bpc'] - dense['bpc']:+.4f} | {row['macs']:,.0f} "
            f"| {row['macs'] / dense['macs']:.3f} | {row['routed_macs']:,.0f} | {fraction} "
            f"| {load} | {step_us.get(row['model'], float('nan')):,.0f} "
            f"| {train_s.get(row['model'], float('nan')):.3f} | {row['trained']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", action="store_true", help="train the same-MACs dense model")
    parser.add_argument("--append", type=Path, default=None, help="append the table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    repository = ModelRepository(default_repository_root())
    ids = load_char_corpus().valid_ids
    models = {name: repository.load(name).model.eval() for name in (DENSE, MOE)}
    rows = []
    for name, model in models.items():
        card = repository.card(name).config
        trained = f"{card['training']['steps']} steps, `{card['provenance']['command']}`"
        rows.append(measure(name, model, ids, trained))
    if args.control:
        control, seconds = train_control()
        models["dense control"] = control
        rows.append(measure("dense control", control, ids, f"800 steps here ({seconds:.0f} s)"))
    steps_us = step_times_us(models)
    train_s = train_step_seconds([DENSE, MOE])
    tokens = (len(ids) // N_STREAMS - 1) * N_STREAMS
    table = format_table(rows, steps_us, train_s, tokens)
    print(table)
    if args.append is not None:
        command = "python bench/moe_lm.py " + " ".join(sys.argv[1:])
        append_section(args.append, HEADING, table, command.strip())


if __name__ == "__main__":
    main()
