"""Accuracy, coverage and set size of the digits classifiers after every row read, per backend:
the calibration per step that the server answers sessions and prefixes with.

    OMP_NUM_THREADS=1 .venv/bin/python bench/stepwise_coverage.py [--backends torch ...]
        [--models digits-lru digits-snn digits-snn-lite] [--alphas 0.05 0.1 0.2] [--scores raps lac]
        [--append docs/BENCHMARKS.md]

The digits test split (397 images, never used to fit anything) is run through each backend
as the server runs it; after t rows, each image's logits are calibrated by step t's stored
calibration and its conformal set built at alpha. Columns: accuracy and mean confidence of
the calibrated probabilities, coverage and mean size of the plain split-conformal sets
(which may be empty) and of the never-empty sets the server returns by default, and the
band the plain coverage must fall in, [1 - alpha - 3 SE, 1 - alpha + 1/(n+1) + 3 SE]
(`calibration.position_report.coverage_interval`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from calibration.position_report import CoverageRow, position_report
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

HEADING = "## Calibration per step: accuracy, coverage and set size after every row"
MODELS = ("digits-lru", "digits-snn", "digits-snn-lite")
BACKENDS = ("torch", "onnxruntime", "analog_imc", "stochastic")


def measure(
    models: list[str], backends: list[str], alphas: list[float], scores: list[str]
) -> list[tuple[str, str, CoverageRow]]:
    repository = ModelRepository(default_repository_root())
    calibrations = CalibrationStore(repository)
    rows = []
    for model in models:
        card = repository.card(model)
        test = digits_test_split(card)
        assert test is not None, f"{model} has no digits test split"
        for backend in backends:
            stored = calibrations.get(model, card.version, backend)
            if stored is None:
                print(f"skipping {model} on {backend}: not calibrated", file=sys.stderr)
                continue
            runner = prepared_runner(repository, card, backend, stored.backend_options)
            examples = classifier_examples(runner, test)
            report = position_report(
                stored.positional, examples.logits, examples.labels, alphas, scores
            )
            rows += [(model, backend, row) for row in report]
    return rows


def format_table(rows: list[tuple[str, str, CoverageRow]]) -> str:
    lines = [
        "Digits test split (397 images), read row by row; each row t answered with step t's "
        "calibration (200 conformal scores per step).",
        "",
        "| model | backend | score | alpha | step | accuracy | confidence | coverage (plain) "
        "| band | in band | size (plain) | empty | coverage (never empty) | size (never empty) "
        "| one-label answers |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, backend, row in rows:
        lines.append(
            f"| {model} | {backend} | {row.score} | {row.alpha:g} | {row.position} "
            f"| {row.accuracy:.3f} | {row.mean_confidence:.3f} | {row.coverage:.3f} "
            f"| [{row.lower:.3f}, {row.upper:.3f}] | {'yes' if row.within else 'NO'} "
            f"| {row.mean_set_size:.2f} | {row.empty_fraction:.3f} "
            f"| {row.never_empty_coverage:.3f} | {row.never_empty_mean_set_size:.2f} "
            f"| {row.singleton_fraction:.3f} |"
        )
    within = sum(row.within for _, _, row in rows)
    lines += ["", f"{within} of {len(rows)} plain coverages lie in their band."]
    return "\n".join(lines)


def format_summary(rows: list[tuple[str, str, CoverageRow]], alpha: float, score: str) -> str:
    """One line per model and backend: accuracy, plain coverage and mean never-empty set size
    after each row read, at one alpha and score."""
    chosen = [(m, b, r) for m, b, r in rows if r.alpha == alpha and r.score == score]
    steps = sorted({int(r.position) for _, _, r in chosen})
    lines = [
        f"After t rows, alpha = {alpha}, {score}: accuracy / coverage of the plain sets / mean "
        "size of the never-empty sets served by default.",
        "",
        "| model | backend | " + " | ".join(f"t={t}" for t in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for model, backend in dict.fromkeys((m, b) for m, b, _ in chosen):
        cells = {
            int(
                r.position
            ): f"{r.accuracy:.2f} / {r.coverage:.2f} / {r.never_empty_mean_set_size:.2f}"
            for m, b, r in chosen
            if (m, b) == (model, backend)
        }
        lines.append(f"| {model} | {backend} | " + " | ".join(cells[t] for t in steps) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--scores", nargs="+", default=["raps", "lac"])
    parser.add_argument("--append", type=Path, default=None, help="append the table here")
    args = parser.parse_args()
    torch.manual_seed(0)  # the stochastic backend's draws
    rows = measure(args.models, args.backends, args.alphas, args.scores)
    summary = format_summary(rows, 0.1 if 0.1 in args.alphas else args.alphas[0], args.scores[0])
    table = summary + "\n\n<details><summary>every step, alpha and score</summary>\n\n"
    table += format_table(rows) + "\n\n</details>"
    print(table)
    if args.append is not None:
        command = "python bench/stepwise_coverage.py " + " ".join(sys.argv[1:])
        append_section(args.append, HEADING, table, command.strip())


if __name__ == "__main__":
    main()
