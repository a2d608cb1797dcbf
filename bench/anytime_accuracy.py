"""Anytime accuracy of the digits classifiers: held-out accuracy after each of the 8 rows.

    OMP_NUM_THREADS=1 .venv/bin/python bench/anytime_accuracy.py [--repository DIR]
        [--models digits-lru digits-snn digits-snn-lite] [--splits test calibration] [--nll]

A session that has read t rows of an image answers with the logits after step t, so its
accuracy at t = 1..8 is what an early answer is worth. Each model (its latest version in the
repository, default: the built-in repository) runs its own dataset's held-out split in one
forward pass (`model(inputs)[0]` is [N, T, C]) on PyTorch; the table has one row per model
and split and one column per step. Nothing is written to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.evaluate import step_classification_metrics
from models.repository import ModelRepository, default_repository_root
from models.training import ClassificationData, load_training_data

MODELS = ("digits-lru", "digits-snn", "digits-snn-lite")


def measure(repository: ModelRepository, models: list[str], splits: list[str]) -> list[dict]:
    rows = []
    for name in models:
        if not repository.versions(name):
            print(f"skipping {name}: not in {repository.root}")
            continue
        loaded = repository.load(name)
        config = loaded.card.config
        spec = config.get("dataset", {}).get("spec")
        if config.get("task") != "classification" or spec is None:
            print(f"skipping {name}: not a classifier trained on a named dataset")
            continue
        # The seed decides the held-out part of npz data, as it did in training.
        data = load_training_data(spec, config.get("provenance", {}).get("seed", 0))
        assert isinstance(data, ClassificationData)
        for split in splits:
            if split not in data.evaluation:
                print(f"skipping {name} {split}: its dataset has no {split} split")
                continue
            dataset = data.evaluation[split]
            metrics = step_classification_metrics(loaded.model, dataset)
            rows.append(
                {
                    "model": name,
                    "version": loaded.card.version,
                    "split": split,
                    "n": len(dataset),
                    **metrics,
                }
            )
    return rows


def format_table(rows: list[dict], metric: str = "accuracy") -> str:
    steps = max((len(row[metric]) for row in rows), default=0)
    header = " | ".join(f"t={t}" for t in range(1, steps + 1))
    lines = [
        f"Held-out {metric} after t steps (t = 1..{steps}), one forward pass per split.",
        "",
        f"| model | version | split | n | {header} |",
        "|---|---|---|---:|" + "---:|" * steps,
    ]
    for row in rows:
        cells = " | ".join(f"{value:.4f}" for value in row[metric])
        name = f"{row['model']} | {row['version']} | {row['split']} | {row['n']}"
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=None, help="default: the built-ins")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--splits", nargs="+", default=["test"])
    parser.add_argument("--nll", action="store_true", help="also print the per-step NLL (nats)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repository = ModelRepository(args.repository or default_repository_root())
    rows = measure(repository, args.models, args.splits)
    print(format_table(rows))
    if args.nll:
        print()
        print(format_table(rows, "nll"))


if __name__ == "__main__":
    main()
