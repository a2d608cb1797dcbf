"""Sequential early decisions on the digits test split: coverage at the stopping time and the
time steps saved, per model, backend, score and alpha.

    OMP_NUM_THREADS=1 .venv/bin/python bench/early_decision.py [--backends torch ...]
        [--alphas 0.05 0.1 0.2] [--scores lac raps] [--max-set-size 1]
        [--append docs/BENCHMARKS.md]

Every test image is read row by row (8 steps); at each step the calibrated probabilities go
through the early-decision rule that `neuroserve calibrate` stored beside the backend's
calibration (the rule a session with `"early_decision"` is served), and the stream stops at
the first checkpoint whose set at level alpha / 8 holds at most `max_set_size` labels. The
served sessions take exactly these decisions (tests/service/test_early_decision.py).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from models.repository import ModelRepository, default_repository_root
from service.calibration_store import CalibrationStore
from service.cli_calibrate import backend_step_logits, prepared_runner, test_data
from service.early_decision import EarlyDecisionStore, checkpoint_probabilities

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
    early = EarlyDecisionStore(calibrations)
    rows = []
    for model in MODELS:
        card = repository.card(model)
        test = test_data(card)
        assert test is not None, f"{model} has no digits test split"
        for backend in backends:
            stored = calibrations.get(model, card.version, backend)
            data = early.get(model, card.version, backend)
            if stored is None or data is None or not data.belongs_to(stored.artifact):
                print(f"skipping {model} on {backend}: no current early-decision rule")
                continue
            runner = prepared_runner(repository, card, backend, stored.backend_options)
            step_logits = backend_step_logits(runner, test.inputs)
            probs = checkpoint_probabilities(stored.artifact, step_logits)  # [N, 8, C]
            for score in scores:
                for alpha in alphas:
                    rule = data.rule(stored.artifact, alpha, score, max_set_size)
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
