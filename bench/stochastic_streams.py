"""digits-lru on the stochastic backend: stream length, weight-sampling uncertainty, cost.

1. Bitstream mode (stochastic computing, counting adders): test accuracy and ECE (15 bins)
   of the last-step prediction against stream length, for low-discrepancy (Sobol) streams
   and for independent (seeded PRNG) streams.
2. Sampling mode (S chains of noisy weights): accuracy and ECE of the predictive mean on the
   test digits, and the mutual information (epistemic uncertainty) on the test digits
   against out-of-distribution images of uniform noise (0..16, same shape, seeded); the AUROC
   of mutual information, and of predictive entropy, for telling the two apart.
3. Cost: time of each run relative to the torch runner on the same batch.

    OMP_NUM_THREADS=1 .venv/bin/python bench/stochastic_streams.py [--json out.json]

Independent streams are simulated through exact binomial bit counts, which costs about the
same at every length and far more than Sobol counting; `--random-lengths` picks their grid.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

from calibration.metrics import expected_calibration_error
from hardware_backends.base import Runner
from hardware_backends.stochastic import (
    StochasticBackend,
    mutual_information,
    predictive_entropy,
    predictive_probabilities,
)
from hardware_backends.torch_backend import TorchBackend
from models.base import StatefulModel
from models.digits import N_IMAGES, PIXEL_MAX, load_digits_seq
from models.repository import ModelRepository, default_repository_root

MODEL_NAME = "digits-lru"
ECE_BINS = 15
SOBOL_LENGTHS = [32, 64, 128, 256, 512, 1024, 2048, 4096]
RANDOM_LENGTHS = [32, 256, 4096]
SAMPLING_SETTINGS = [
    {"noise": "gaussian", "relative_std": 0.05},
    {"noise": "gaussian", "relative_std": 0.1},
    {"noise": "pcm"},
]
OOD_SEED = 0


def load_model() -> tuple[StatefulModel, str]:
    """The built-in digits-lru model and its "<name>/<version>" key."""
    loaded = ModelRepository(default_repository_root()).load(MODEL_NAME)
    return loaded.model, f"{MODEL_NAME}/{loaded.card.version}"


def noise_images(count: int, steps: int, features: int) -> Tensor:
    """Out-of-distribution inputs: every pixel uniform in [0, 16], seeded."""
    generator = torch.Generator().manual_seed(OOD_SEED)
    return torch.rand(count, steps, features, generator=generator) * PIXEL_MAX


def timed(call: Callable[[], tuple]) -> tuple[tuple, float]:
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def classification(probabilities: Tensor, labels: Tensor) -> dict[str, float]:
    return {
        "accuracy": float((probabilities.argmax(-1) == labels).float().mean()),
        "ece": expected_calibration_error(probabilities, labels, n_bins=ECE_BINS),
    }


def stream_sweep(
    model: StatefulModel, key: str, inputs: Tensor, labels: Tensor, source: str, lengths: list[int]
) -> list[dict]:
    rows = []
    for length in lengths:
        options = {"mode": "bitstream", "stream_length": length, "source": source}
        runner = StochasticBackend().prepare(model, model_key=key, options=options)
        (logits, _, _), seconds = timed(lambda runner=runner: runner.run(inputs))
        probabilities = torch.softmax(logits[:, -1], dim=-1)  # [N, C]
        rows.append({"length": length, **classification(probabilities, labels), "seconds": seconds})
    return rows


def sampling_study(
    model: StatefulModel, key: str, inputs: Tensor, labels: Tensor, samples: int
) -> list[dict]:
    ood = noise_images(len(labels), inputs.shape[1], inputs.shape[2])
    rows = []
    for setting in SAMPLING_SETTINGS:
        options = {"samples": samples, **setting}
        runner = StochasticBackend().prepare(model, model_key=key, options=options)
        (test_logits, _, _), seconds = timed(lambda runner=runner: runner.run(inputs))
        ood_logits, _, _ = runner.run(ood)
        test_last, ood_last = test_logits[:, :, -1], ood_logits[:, :, -1]  # [S, N, C]
        is_ood = [0] * len(labels) + [1] * len(labels)
        mi_test, mi_ood = mutual_information(test_last), mutual_information(ood_last)
        entropy = torch.cat([predictive_entropy(test_last), predictive_entropy(ood_last)])
        rows.append(
            {
                "setting": options,
                **classification(predictive_probabilities(test_last), labels),
                "mi_test_mean": float(mi_test.mean()),
                "mi_ood_mean": float(mi_ood.mean()),
                "auroc_mutual_information": roc_auc_score(is_ood, torch.cat([mi_test, mi_ood])),
                "auroc_predictive_entropy": roc_auc_score(is_ood, entropy),
                "seconds": seconds,
            }
        )
    return rows


def median_seconds(runner: Runner, inputs: Tensor, repeats: int) -> float:
    return statistics.median(timed(lambda: runner.run(inputs))[1] for _ in range(repeats))


def run(model: StatefulModel, key: str, args: argparse.Namespace) -> dict:
    test = load_digits_seq("test")
    inputs, labels = test.inputs, test.labels  # [397, 8, 8], [397]
    torch_runner = TorchBackend().prepare(model, model_key=key, options={"device": "cpu"})
    torch_logits, _, _ = torch_runner.run(inputs)
    torch_seconds = median_seconds(torch_runner, inputs, repeats=5)
    return {
        "model": key,
        "test_images": len(test),
        "n_images_total": N_IMAGES,
        "torch": {
            **classification(torch.softmax(torch_logits[:, -1], -1), labels),
            "seconds": torch_seconds,
        },
        "bitstream_sobol": stream_sweep(model, key, inputs, labels, "sobol", args.lengths),
        "bitstream_random": stream_sweep(model, key, inputs, labels, "random", args.random_lengths),
        "sampling": sampling_study(model, key, inputs, labels, args.samples),
        "samples": args.samples,
    }


def report(results: dict) -> str:
    base = results["torch"]
    torch_s = base["seconds"]
    lines = [
        f"## {results['model']} on the stochastic backend ({results['test_images']} test images)",
        "",
        f"Float (torch): accuracy {100 * base['accuracy']:.1f}%, ECE {base['ece']:.3f}, "
        f"{1000 * torch_s:.1f} ms per batch.",
        "",
        "Bitstream mode (counting adders): accuracy / ECE (15 bins) / time relative to torch.",
        "",
        "| stream length | Sobol streams | independent streams |",
        "|---|---|---|",
    ]
    random_rows = {row["length"]: row for row in results["bitstream_random"]}
    sobol_rows = {row["length"]: row for row in results["bitstream_sobol"]}

    def cell(row: dict | None) -> str:
        if row is None:
            return "–"
        return f"{100 * row['accuracy']:.1f}% / {row['ece']:.3f} / {row['seconds'] / torch_s:.0f}x"

    for length in sorted(set(random_rows) | set(sobol_rows)):
        lines.append(
            f"| {length} | {cell(sobol_rows.get(length))} | {cell(random_rows.get(length))} |"
        )
    lines += [
        "",
        f"Sampling mode, S = {results['samples']} chains: predictive mean on test digits; "
        "mutual information (MI, nats) on test digits vs uniform-noise images; AUROC for "
        "telling them apart by MI and by predictive entropy.",
        "",
        "| weight noise | accuracy | ECE | MI test | MI noise | AUROC (MI) | AUROC (entropy) "
        "| time vs torch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["sampling"]:
        setting = row["setting"]
        name = setting["noise"]
        if "relative_std" in setting:
            name += f" σ = {setting['relative_std']} × max abs(W)"
        else:
            name += " (programming + read noise, t = 0)"
        lines.append(
            f"| {name} | {100 * row['accuracy']:.1f}% | {row['ece']:.3f} | "
            f"{row['mi_test_mean']:.4f} | {row['mi_ood_mean']:.4f} | "
            f"{row['auroc_mutual_information']:.3f} | {row['auroc_predictive_entropy']:.3f} | "
            f"{row['seconds'] / torch_s:.1f}x |"
        )
    return "\n".join(lines)


def parse_lengths(text: str) -> list[int]:
    lengths = [int(part) for part in text.split(",") if part.strip()]
    if not lengths or any(length < 1 or length > 4096 for length in lengths):
        raise argparse.ArgumentTypeError(f"lengths must be integers in 1..4096, got {text!r}")
    return lengths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=parse_lengths, default=SOBOL_LENGTHS)
    parser.add_argument("--random-lengths", type=parse_lengths, default=RANDOM_LENGTHS)
    parser.add_argument("--samples", type=int, default=16, help="chains in sampling mode")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", help="also write the raw results to this JSON file")
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error("--samples must be at least 2 for mutual information")
    torch.set_num_threads(args.threads)
    model, key = load_model()
    results = run(model, key, args)
    print(report(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
