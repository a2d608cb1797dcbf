"""Coverage and mean set size of conformal prediction sets per score and alpha, over random
calibration/test re-splits, through the same pipeline the server uses.

    OMP_NUM_THREADS=1 .venv/bin/python bench/conformal_table.py [--source digits-lru ...]
        [--splits 100] [--alphas 0.05 0.1 0.2] [--json out.json]

Sources: a built-in digits classifier (its calibration and test splits pooled, 797 images,
re-split at random 400/397), or "synthetic" (797 i.i.d. examples of a 10-class classifier
that is 1.5x overconfident, see `calibration.synthetic`). For every split a
`CalibrationArtifact` is fitted on the 400 calibration points (map and RAPS tuned on 200 of
them, conformal scores from the other n = 200) and every test point gets a set for each
score and alpha: plain, never-empty (top label added to empty sets) and class-conditional.

Columns: coverage as mean ± standard error over splits; the interval split conformal
promises, [1 - alpha, 1 - alpha + 1/(n + 1)] (the upper end only for plain sets of untied
scores: not for top-k, never-empty or class-conditional sets, which only promise
>= 1 - alpha); mean set size; fraction of empty sets; the worst class's coverage (mean over
splits per class, min over classes), which only class-conditional sets protect.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from calibration.artifact import fit_calibration_artifact
from calibration.scores import SCORE_NAMES
from calibration.synthetic import sample_classifier_outputs

N_CALIBRATION = 400
VARIANTS = ("plain", "never-empty", "class-conditional")


def builtin_pool(name: str) -> tuple[Tensor, Tensor]:
    """Last-step logits [797, C] and labels of a built-in model on calibration + test."""
    from models.digits import load_digits_seq
    from models.repository import ModelRepository, default_repository_root

    model = ModelRepository(default_repository_root()).load(name).model
    logits, labels = [], []
    for split in ("calibration", "test"):
        dataset = load_digits_seq(split, variant="rows")
        with torch.no_grad():
            logits.append(model(dataset.inputs)[0][:, -1])  # [N, T, C] -> [N, C]
        labels.append(dataset.labels)
    return torch.cat(logits).to(torch.float64), torch.cat(labels)


def synthetic_pool() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return sample_classifier_outputs(797, 10, generator, overconfidence=1.5)


def evaluate(logits: Tensor, labels: Tensor, alphas: list[float], n_splits: int):
    """Per (alpha, score, variant): lists over splits of coverage, size, empty, class coverage."""
    results: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    generator = torch.Generator().manual_seed(1)
    num_classes = logits.shape[1]
    n_conformal = None
    for split in range(n_splits):
        order = torch.randperm(len(labels), generator=generator)
        cal, test = order[:N_CALIBRATION], order[N_CALIBRATION:]
        artifact = fit_calibration_artifact(
            logits[cal], labels[cal], "bench", "1", "torch", seed=split
        )
        n_conformal = artifact.n
        test_labels = labels[test]
        rows = torch.arange(len(test))
        for alpha in alphas:
            for score in SCORE_NAMES:
                for variant in VARIANTS:
                    _, sets = artifact.predict(
                        logits[test],
                        alpha,
                        score,
                        class_conditional=variant == "class-conditional",
                        never_empty=variant == "never-empty",
                        rng=torch.Generator().manual_seed(split),
                    )
                    covered = sets[rows, test_labels].to(torch.float64)  # [m]
                    sizes = sets.sum(dim=1).to(torch.float64)  # [m]
                    entry = results[(alpha, score, variant)]
                    entry["coverage"].append(float(covered.mean()))
                    entry["size"].append(float(sizes.mean()))
                    entry["empty"].append(float((sizes == 0).to(torch.float64).mean()))
                    per_class = [
                        float(covered[test_labels == c].mean())
                        if bool((test_labels == c).any())
                        else math.nan
                        for c in range(num_classes)
                    ]
                    entry["class_coverage"].append(per_class)
    return results, n_conformal


def mean_se(values: list[float]) -> tuple[float, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    se = float(tensor.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(tensor.mean()), se


def summarise(source: str, results, n_conformal: int) -> list[dict]:
    rows = []
    for (alpha, score, variant), entry in results.items():
        coverage, coverage_se = mean_se(entry["coverage"])
        class_means = torch.tensor(entry["class_coverage"], dtype=torch.float64).nanmean(dim=0)
        rows.append(
            {
                "source": source,
                "score": score,
                "alpha": alpha,
                "variant": variant,
                "coverage": coverage,
                "coverage_se": coverage_se,
                "target_low": 1 - alpha,
                # The upper end needs untied scores and the plain marginal quantile.
                "target_high": 1 - alpha + 1 / (n_conformal + 1)
                if variant == "plain" and score != "topk"
                else None,
                "mean_set_size": mean_se(entry["size"])[0],
                "empty_fraction": mean_se(entry["empty"])[0],
                "worst_class_coverage": float(class_means.min()),
                "splits": len(entry["coverage"]),
                "n_conformal": n_conformal,
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| source | score | alpha | sets | coverage ± SE | target | mean size | empty "
        "| worst class |"
    )
    print("|---|---|---:|---|---:|---|---:|---:|---:|")
    for row in sorted(rows, key=lambda r: (r["source"], r["alpha"], r["variant"], r["score"])):
        if row["target_high"] is None:
            target = f">= {row['target_low']:.3f}"
        else:
            target = f"[{row['target_low']:.3f}, {row['target_high']:.3f}]"
        print(
            f"| {row['source']} | {row['score']} | {row['alpha']:.2f} | {row['variant']} "
            f"| {row['coverage']:.4f} ± {row['coverage_se']:.4f} "
            f"| {target} "
            f"| {row['mean_set_size']:.3f} | {row['empty_fraction']:.3f} "
            f"| {row['worst_class_coverage']:.3f} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", nargs="+", default=["digits-lru", "digits-snn"])
    parser.add_argument("--splits", type=int, default=100)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    all_rows = []
    for source in args.source:
        start = time.perf_counter()
        try:
            logits, labels = synthetic_pool() if source == "synthetic" else builtin_pool(source)
        except (ImportError, LookupError, FileNotFoundError) as error:
            print(f"cannot load source {source!r}: {error}", file=sys.stderr)
            return 1
        results, n_conformal = evaluate(logits, labels, args.alphas, args.splits)
        all_rows.extend(summarise(source, results, n_conformal))
        elapsed = time.perf_counter() - start
        print(f"{source}: {args.splits} splits in {elapsed:.1f} s", file=sys.stderr)
    print_table(all_rows)
    if args.json is not None:
        args.json.write_text(json.dumps(all_rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
