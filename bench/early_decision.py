"""Sequential early decisions on the digits test split: coverage at the stopping time and the
time steps saved, per model, backend, score and alpha.

    OMP_NUM_THREADS=1 .venv/bin/python bench/early_decision.py [--backends torch ...]
        [--alphas 0.05 0.1 0.2] [--scores lac raps] [--max-set-size 1]
        [--append docs/BENCHMARKS.md]

Every test image is read row by row (8 steps); at each step the probabilities calibrated by
that step's own calibration go through the early-decision rule built from the backend's
stored calibration per step (the rule a session with `"early_decision"` is served), and the
stream stops at the first step whose set at level alpha / 8 holds at most `max_set_size`
labels. The served sessions take exactly these decisions (tests/service/test_early_decision.py).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from calibration import EarlyDecisionRule
from models.repository import ModelRepository, default_repository_root
from service.dataplane.calibration_data import (
    classifier_examples,
    digits_test_split,
    prepared_runner,
)
from service.dataplane.calibration_store import CalibrationStore

try:
    from bench._report import append_section
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from _report import append_section

HEADING = "## Early decisions"
MODELS = ("digits-lru", "digits-snn")
BACKENDS = ("torch", "onnxruntime", "analog_imc", "stochastic")


def measure(
    backends: list[str], alphas: list[float], scores: list[str], max_set_size: int
) -> list[dict]:
    repository = ModelRepository(default_repository_root())
    calibrations = CalibrationStore(repository)
    rows = []
    for model in MODELS:
        card = repository.card(model)
        test = digits_test_split(card)
        assert test is not None, f"{model} has no digits test split"
        for backend in backends:
            stored = calibrations.get(model, card.version, backend)
            if stored is None:
                print(f"skipping {model} on {backend}: not calibrated")
                continue
            runner = prepared_runner(repository, card, backend, stored.backend_options)
            examples = classifier_examples(runner, test)
            artifacts = stored.positional.artifacts
            probs = torch.stack(  # [N, 8, C], each step by its own calibration
                [a.calibrate(x) for a, x in zip(artifacts, examples.logits, strict=True)], dim=1
            )
            for score in scores:
                for alpha in alphas:
                    rule = EarlyDecisionRule.from_calibration(
                        stored.positional, alpha, score, max_set_size
                    )
                    report = rule.evaluate(probs, test.labels)
                    n = int(test.labels.shape[0])
                    rows.append(
                        {
                            "model": model,
                            "backend": backend,
                            "score": score,
                            "alpha": alpha,
                            "coverage": report.coverage,
                            "floor": 1 - alpha - 3 * math.sqrt(alpha * (1 - alpha) / n),
                            "size": report.mean_set_size,
                            "stop": report.mean_stop_step,
                            "saved": report.mean_steps_saved,
                            "fraction": report.fraction_steps_saved,
                            "early": report.stopped_early,
                        }
                    )
    return rows


def format_table(rows: list[dict], max_set_size: int) -> str:
    lines = [
        f"Digits test split (397 images, 8 rows each), a checkpoint after every row, stop at "
        f"the first set of at most {max_set_size} label(s) at level alpha / 8.",
        "",
        "| model | backend | score | alpha | coverage at stop | floor (1 - alpha - 3 SE) "
        "| set size | mean stop step | steps saved | stopped early |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['backend']} | {row['score']} | {row['alpha']:g} "
            f"| {row['coverage']:.4f} | {row['floor']:.4f} | {row['size']:.2f} "
            f"| {row['stop']:.2f} | {row['saved']:.2f} ({100 * row['fraction']:.1f}%) "
            f"| {row['early']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--scores", nargs="+", default=["lac", "raps"])
    parser.add_argument("--max-set-size", type=int, default=1)
    parser.add_argument("--append", type=Path, default=None, help="append the table here")
    args = parser.parse_args()
    torch.manual_seed(0)  # the stochastic backend's draws
    rows = measure(args.backends, args.alphas, args.scores, args.max_set_size)
    table = format_table(rows, args.max_set_size)
    print(table)
    if args.append is not None:
        command = "python bench/early_decision.py " + " ".join(sys.argv[1:])
        append_section(args.append, HEADING, table, command.strip())


if __name__ == "__main__":
    main()
