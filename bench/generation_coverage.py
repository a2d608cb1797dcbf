"""The character language model's next-token sets by context length, and how often generated
tokens fall in their own sets.

    OMP_NUM_THREADS=1 .venv/bin/python bench/generation_coverage.py [--backends torch ...]
        [--alphas 0.05 0.1 0.2] [--temperatures 0.7 1.0 1.5] [--prompts 24] [--tokens 48]
        [--append docs/BENCHMARKS.md]

1. Coverage by context bucket: windows of the held-out text's second half (the half the
   calibration never saw; `service.dataplane.calibration_data`), each read for a random
   length within each bucket and labelled with the next character, answered with that
   bucket's stored calibration on each backend: accuracy, coverage and mean size of the
   plain sets and of the never-empty sets served by default, with the band the plain
   coverage must fall in.
2. Generation through a real server (uvicorn on loopback, `POST /v1/models/.../generate`):
   prompts cut from the same held-out half, tokens sampled from the reported (calibrated)
   distribution at each temperature; the fraction of emitted tokens inside their own set
   (about 1 - alpha at temperature 1 for a calibrated model, more when sharper, less when
   flatter), the mean set size and the share of one-token sets, by context bucket.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn

from calibration.position_report import position_report
from models.repository import ModelRepository, default_repository_root
from service.app import create_app
from service.dataplane.calibration_data import (
    held_out_text,
    language_examples,
    prepared_runner,
    split_text,
)
from service.dataplane.calibration_store import CalibrationStore
from service.settings import Settings

try:
    from bench._report import append_section
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from _report import append_section

HEADING = "## Language model: next-token sets by context length, and generated tokens in their sets"
MODEL = "charlm-selective"


def coverage_by_bucket(backends: list[str], alphas: list[float]) -> list[str]:
    repository = ModelRepository(default_repository_root())
    card = repository.card(MODEL)
    _, test_text = split_text(held_out_text(card, None))
    lines = [
        f"Held-out text not used for calibration ({test_text.ids.shape[0]} characters), 2000 "
        "random windows per context bucket; LAC sets (the language models' default).",
        "",
        "| backend | context | alpha | accuracy | coverage (plain) | band | size (plain) "
        "| coverage (never empty) | size (never empty) | one-token sets |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for backend in backends:
        stored = CalibrationStore(repository).get(MODEL, card.version, backend)
        if stored is None:
            print(f"skipping {backend}: not calibrated", file=sys.stderr)
            continue
        runner = prepared_runner(repository, card, backend, stored.backend_options)
        examples = language_examples(runner, test_text, seed=1)
        rows = position_report(stored.positional, examples.logits, examples.labels, alphas, ["lac"])
        for row in rows:
            lines.append(
                f"| {backend} | {row.position} | {row.alpha:g} | {row.accuracy:.3f} "
                f"| {row.coverage:.3f} | [{row.lower:.3f}, {row.upper:.3f}] "
                f"| {row.mean_set_size:.2f} | {row.never_empty_coverage:.3f} "
                f"| {row.never_empty_mean_set_size:.2f} | {row.singleton_fraction:.3f} |"
            )
    return lines


def _bucket(position: int) -> str:
    for low, high in ((1, 1), (2, 3), (4, 7), (8, 15), (16, 1024)):
        if low <= position <= high:
            return f"{low}" if low == high else f"{low}-{high}"
    return "past 1024"


def prompts_from_test_text(count: int, seed: int) -> list[str]:
    repository = ModelRepository(default_repository_root())
    card = repository.card(MODEL)
    _, test_text = split_text(held_out_text(card, None))
    vocabulary = card.config["vocabulary"]
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        length = int(rng.integers(2, 40))
        start = int(rng.integers(0, test_text.ids.shape[0] - length))
        prompts.append("".join(vocabulary[i] for i in test_text.ids[start : start + length]))
    return prompts


async def _generate(
    base_url: str, prompts: list[str], tokens: int, temperature: float, alpha: float
):
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
        answers = await asyncio.gather(
            *(
                http.post(
                    f"/v1/models/{MODEL}/generate",
                    json={
                        "prompt": prompt,
                        "max_tokens": tokens,
                        "temperature": temperature,
                        "alpha": alpha,
                        "seed": str(2**60 + i),
                    },
                )
                for i, prompt in enumerate(prompts)
            )
        )
    return [answer.json() for answer in answers]


def generation_in_set(
    temperatures: list[float], alphas: list[float], prompts: int, tokens: int
) -> list[str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    app = create_app(Settings(model_repository=default_repository_root()))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    texts = prompts_from_test_text(prompts, seed=2)
    lines = [
        f"{prompts} prompts of 2-39 characters cut from the held-out half, {tokens} tokens each, "
        "sampled from the reported distribution through `POST /v1/models/charlm-selective/generate`"
        " (torch); LAC sets, never empty.",
        "",
        "| temperature | alpha | context | tokens | emitted token in its set | mean set size "
        "| one-token sets |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    try:
        for temperature in temperatures:
            for alpha in alphas:
                answers = asyncio.run(_generate(base_url, texts, tokens, temperature, alpha))
                by_bucket: dict[str, list[dict]] = defaultdict(list)
                for answer in answers:
                    for token in answer["tokens"]:
                        by_bucket[_bucket(token["position"])].append(token)
                order = sorted(by_bucket, key=lambda b: int(b.split("-")[0].split()[-1]))
                by_bucket["all"] = [t for a in answers for t in a["tokens"]]
                for bucket in [*order, "all"]:
                    taken = by_bucket[bucket]
                    in_set = [t["in_set"] for t in taken if t["in_set"] is not None]
                    sizes = [t["set_size"] for t in taken if t["set_size"] is not None]
                    lines.append(
                        f"| {temperature:g} | {alpha:g} | {bucket} | {len(taken)} "
                        f"| {np.mean(in_set):.3f} | {np.mean(sizes):.2f} "
                        f"| {np.mean([s == 1 for s in sizes]):.3f} |"
                    )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch"])
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.7, 1.0, 1.5])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--append", type=Path, default=None, help="append the tables here")
    args = parser.parse_args()
    torch.manual_seed(0)  # the stochastic backend's draws
    lines = coverage_by_bucket(args.backends, args.alphas)
    lines += [""] + generation_in_set(args.temperatures, [0.1], args.prompts, args.tokens)
    table = "\n".join(lines)
    print(table)
    if args.append is not None:
        command = "python bench/generation_coverage.py " + " ".join(sys.argv[1:])
        append_section(args.append, HEADING, table, command.strip())


if __name__ == "__main__":
    main()
