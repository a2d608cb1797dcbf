"""ECE and NLL of each built-in digits classifier before and after calibration, on the test
split (397 images; the map never sees them).

    OMP_NUM_THREADS=1 .venv/bin/python bench/calibration_ece.py [--models digits-lru digits-snn]
        [--shift gaussian_noise] [--plot-dir DIR] [--json out.json]

Rows per model:
- raw:       the model's own softmax of its last-step logits
- artifact:  `fit_calibration_artifact` on the calibration split, as the server fits it (map
             chosen by cross-validated NLL on its tuning half, 200 images)
- map (400): `fit_best_map` on the whole calibration split (400 images)

ECE uses 15 equal-width top-label bins. With 397 test images ECE has a sampling floor of its
own, so each ECE is printed with a bootstrap standard deviation over the test images (200
resamples, seeded). `--shift gaussian_noise` evaluates on the noisy test split instead
(calibration stays clean), the distribution shift FIELD_NOTES describes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from calibration.artifact import fit_calibration_artifact
from calibration.maps import fit_best_map
from calibration.metrics import calibration_report, expected_calibration_error

BUILTIN_CLASSIFIERS = ("digits-lru", "digits-snn")
BOOTSTRAP_RESAMPLES = 200


def builtin_logits(name: str, split: str, shift: str | None = None) -> tuple[Tensor, Tensor]:
    """Last-step logits [N, C] (float64) and labels [N] of a built-in model on a digits split."""
    from models.digits import load_digits_seq
    from models.repository import ModelRepository, default_repository_root

    model = ModelRepository(default_repository_root()).load(name).model
    dataset = load_digits_seq(split, variant="rows", shift=shift)
    with torch.no_grad():
        logits = model(dataset.inputs)[0][:, -1]  # [N, T, C] -> [N, C]
    return logits.to(torch.float64), dataset.labels


def bootstrap_ece_sd(probs: Tensor, labels: Tensor, seed: int = 0) -> float:
    generator = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    values = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        pick = torch.randint(n, (n,), generator=generator)
        values.append(expected_calibration_error(probs[pick], labels[pick]))
    return float(torch.tensor(values).std())


def describe_map(calibration_map) -> str:
    params = calibration_map.to_dict()
    if params["kind"] == "temperature":
        return f"temperature T={params['temperature']:.3f}"
    return params["kind"]


def evaluate_model(name: str, shift: str | None, plot_dir: Path | None) -> list[dict]:
    cal_logits, cal_labels = builtin_logits(name, "calibration")
    test_logits, test_labels = builtin_logits(name, "test", shift)
    artifact = fit_calibration_artifact(cal_logits, cal_labels, name, "builtin", "torch")
    full_map = fit_best_map(cal_logits, cal_labels).map
    candidates = {
        "raw": ("softmax", test_logits.softmax(dim=1)),
        "artifact": (describe_map(artifact.calibration_map), artifact.calibrate(test_logits)),
        "map (400)": (describe_map(full_map), full_map.apply(test_logits)),
    }
    rows = []
    for method, (map_name, probs) in candidates.items():
        report = calibration_report(probs, test_labels)
        rows.append(
            {
                "model": name,
                "test": shift or "clean",
                "method": method,
                "map": map_name,
                **report,
                "ece_bootstrap_sd": bootstrap_ece_sd(probs, test_labels),
            }
        )
        if plot_dir is not None:
            from calibration.plot import plot_reliability_diagram

            filename = f"{name}-{shift or 'clean'}-{method.split()[0]}.png"
            plot_reliability_diagram(
                probs, test_labels, plot_dir / filename, title=f"{name} {method} ({map_name})"
            )
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| model | test | method | map | accuracy | NLL | ECE (± bootstrap sd) "
        "| adaptive ECE | MCE | Brier |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['model']} | {row['test']} | {row['method']} | {row['map']} "
            f"| {row['accuracy']:.4f} | {row['nll']:.4f} "
            f"| {row['ece']:.4f} ± {row['ece_bootstrap_sd']:.4f} | {row['adaptive_ece']:.4f} "
            f"| {row['mce']:.4f} | {row['brier']:.4f} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUILTIN_CLASSIFIERS))
    parser.add_argument("--shift", default=None, help="a models.digits shift for the test split")
    parser.add_argument("--plot-dir", type=Path, default=None, help="write reliability PNGs here")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.plot_dir is not None:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        try:
            rows.extend(evaluate_model(name, args.shift, args.plot_dir))
        except (ImportError, LookupError, FileNotFoundError) as error:
            print(f"cannot evaluate built-in model {name!r}: {error}", file=sys.stderr)
            return 1
    print_table(rows)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
