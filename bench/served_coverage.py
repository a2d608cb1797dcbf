"""Coverage of the served conformal sets on the digits test split, per model and backend,
through the dataplane with the committed calibrations (the same code path as
`POST /v1/models/{name}/predict`).

    OMP_NUM_THREADS=1 .venv/bin/python bench/served_coverage.py [--alpha 0.1] [--score raps]
        [--append docs/BENCHMARKS.md]

Each calibration holds n = 200 conformity scores (the other 200 calibration images fitted the
map), so one fixed calibration covers 1 - alpha only on average over calibration draws: its
own coverage scatters around it with sd ~ sqrt(alpha (1 - alpha) / (n + 2)) ~ 0.021 at
alpha = 0.1, and the test split's 397 images add a binomial SE of 0.015. The floor column is
1 - alpha - 3 SE(397), what the HTTP tests require.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from models.digits import load_digits_seq
from models.repository import ModelRepository, default_repository_root
from service.dataplane import ConformalOptions, DataPlane, InputLimits

try:
    from bench._report import append_section
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from _report import append_section

HEADING = "## Conformal coverage per backend"
MODELS = ("digits-lru", "digits-snn")
BACKENDS = ("torch", "onnxruntime", "analog_imc", "stochastic")
BATCH = 64


def measure(alpha: float, score: str) -> list[dict]:
    dataplane = DataPlane(ModelRepository(default_repository_root()), InputLimits(BATCH, 64))
    test = load_digits_seq("test")
    conformal = ConformalOptions(alpha=alpha, score=score, seed=0)
    rows = []
    for model in MODELS:
        for backend in BACKENDS:
            covered = correct = size = empty = 0
            for start in range(0, len(test), BATCH):
                batch = dataplane.predict_blocking(
                    model,
                    test.inputs[start : start + BATCH].tolist(),
                    backend=backend,
                    conformal=conformal,
                )
                labels = test.labels[start : start + BATCH].tolist()
                for prediction, label in zip(batch.predictions, labels, strict=True):
                    covered += label in prediction.set_indices
                    correct += prediction.index == label
                    size += prediction.set_size
                    empty += prediction.set_size == 0
            n = len(test)
            rows.append(
                {
                    "model": model,
                    "backend": backend,
                    "accuracy": correct / n,
                    "coverage": covered / n,
                    "size": size / n,
                    "empty": empty / n,
                    "floor": 1 - alpha - 3 * math.sqrt(alpha * (1 - alpha) / n),
                }
            )
    return rows


def format_table(rows: list[dict], alpha: float, score: str) -> str:
    lines = [
        f"Digits test split (397 images), alpha = {alpha}, score {score}, plain sets.",
        "",
        "| model | backend | accuracy | coverage | floor (1 - alpha - 3 SE) | mean set size "
        "| empty sets |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['backend']} | {row['accuracy']:.4f} "
            f"| {row['coverage']:.4f} | {row['floor']:.4f} | {row['size']:.3f} "
            f"| {row['empty']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--score", default="raps")
    parser.add_argument("--append", type=Path, default=None, help="append the table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    table = format_table(measure(args.alpha, args.score), args.alpha, args.score)
    print(table)
    if args.append is not None:
        command = "python bench/served_coverage.py " + " ".join(sys.argv[1:])
        append_section(args.append, HEADING, table, command.strip())


if __name__ == "__main__":
    main()
