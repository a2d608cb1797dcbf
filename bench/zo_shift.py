"""Zeroth-order fine-tuning of digits-lru to translated digits, on torch and on the PCM chip.

The built-in `digits-lru` (98.7% on clean test digits) drops to about 50% when every image is
moved by one pixel (`translated`). This runs the real fine-tuning job (`run_finetune`) twice
on a temporary copy of the built-in repository:

- torch: MeZO over all 51k parameters, cosine-decayed rate;
- analog_imc: the same, chip-in-the-loop -- every loss is measured on a chip programmed from
  the current weights (common random numbers for the two passes of a perturbation, so
  ε = 1e-2: at 1e-3 the ADC and read noise swamp the difference), fewer steps because each
  chip pass costs ~0.2 s on one core.

Tuning sees 800 translated train images (200 more validate, for early stopping); the base and
the tuned model are each recalibrated on the 400 translated calibration images and scored on
the 397 translated test images through the same backend.

    OMP_NUM_THREADS=1 .venv/bin/python bench/zo_shift.py [--torch-steps 6000]
        [--analog-steps 600] [--shift translated] [--seed 0] [--json out.json]

Prints a markdown table; takes about 6 minutes on one core. `--estimator-check` instead
measures how one SPSA estimate on the chip correlates with the float one (the reason for
ε = 1e-2 on the chip), with shared and with independent chip noise for the two passes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from models.builtin import ensure_builtin_models
from models.digits import load_digits_seq
from models.repository import ModelRepository, default_repository_root
from models.zo import ZOConfig, ZOOptimizer
from service.finetuning.forward import BackendForward
from service.finetuning.job import run_finetune
from service.finetuning.spec import FinetuneResult, FinetuneSpec, ProgressEvent

MODEL_NAME = "digits-lru"


def private_repository(directory: Path) -> ModelRepository:
    """A copy of the built-in digits-lru (trained afresh if it is not there), so the tuned
    versions never land among the committed artifacts."""
    source = default_repository_root() / MODEL_NAME
    if source.is_dir():
        shutil.copytree(source, directory / MODEL_NAME)
    repository = ModelRepository(directory)
    ensure_builtin_models(repository, [MODEL_NAME])
    return repository


def run(spec: FinetuneSpec, repository: ModelRepository) -> FinetuneResult:
    def progress(event: ProgressEvent) -> None:
        if event.validation_accuracy is not None:
            print(
                f"  [{spec.backend}] step {event.step}/{event.total_steps}: validation "
                f"accuracy {event.validation_accuracy:.3f} (best at step {event.best_step})",
                flush=True,
            )

    return run_finetune(spec, repository, progress=progress)


def estimator_check(repository: ModelRepository, shift: str, draws: int = 40) -> str:
    """How well one SPSA estimate on the chip tracks the same estimate in float arithmetic:
    correlation over `draws` directions on one batch of 64, for two ε and two ways of
    drawing the chip noise of the two passes (same chip seed, or independent chips)."""
    model = repository.load(MODEL_NAME).model
    data = load_digits_seq("train", shift=shift)
    x, labels = data.inputs[:64], data.labels[:64]  # [64, 8, 8], [64]
    exact, chip = BackendForward(model), BackendForward(model, "analog_imc")
    rows = ["| ε | chip noise of the two passes | correlation with float | std ratio |",
            "|---|---|---|---|"]  # fmt: skip
    for eps in (1e-3, 1e-2):
        optimizer = ZOOptimizer(list(model.named_parameters()), ZOConfig(eps=eps))
        reference = [
            optimizer.estimate(s, lambda _: exact.loss(x, labels, "cross_entropy"))[0]
            for s in range(draws)
        ]
        for shared in (True, False):
            chip_seeds = iter(range(10_000, 10_000 + 2 * draws))

            def loss(seed: int, shared: bool = shared, chip_seeds=chip_seeds) -> float:
                chip_seed = seed if shared else next(chip_seeds)
                return chip.loss(x, labels, "cross_entropy", chip_seed=chip_seed)

            measured = [optimizer.estimate(s, loss)[0] for s in range(draws)]
            pair = torch.tensor([reference, measured], dtype=torch.float64)
            correlation = float(torch.corrcoef(pair)[0, 1])
            ratio = float(pair[1].std() / pair[0].std())
            kind = "same seed (common random numbers)" if shared else "independent chips"
            rows.append(f"| {eps:g} | {kind} | {correlation:.2f} | {ratio:.2f} |")
    return "\n".join(rows)


def table(results: list[FinetuneResult]) -> str:
    rows = [
        "| backend | steps (best) | accuracy | ECE | coverage | mean set size | wall s | "
        "trajectory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b, a = r.before, r.after
        rows.append(
            f"| {r.backend} | {r.steps_run} ({r.best_step}) | {b.accuracy:.3f} → "
            f"{a.accuracy:.3f} | {b.ece:.3f} → {a.ece:.3f} | {b.coverage:.3f} → "
            f"{a.coverage:.3f} | {b.mean_set_size:.2f} → {a.mean_set_size:.2f} | "
            f"{r.wall_seconds:.0f} | {r.trajectory_bytes / 1024:.0f} KiB |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shift", default="translated")
    parser.add_argument("--torch-steps", type=int, default=6000)
    parser.add_argument("--analog-steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the full results here")
    parser.add_argument(
        "--estimator-check", action="store_true", help="only compare chip and float estimates"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.estimator_check:
        with tempfile.TemporaryDirectory() as directory:
            print(estimator_check(private_repository(Path(directory)), args.shift))
        return

    # backend -> (steps, lr, eps, eval_every)
    runs = {
        "torch": (args.torch_steps, 5e-4, 1e-3, 200),
        "analog_imc": (args.analog_steps, 1e-3, 1e-2, 100),
    }
    results = []
    with tempfile.TemporaryDirectory() as directory:
        repository = private_repository(Path(directory))
        base_version = repository.latest(MODEL_NAME)  # every run starts from the built-in
        for backend, (steps, lr, eps, eval_every) in runs.items():
            if steps < 1:
                continue
            spec = FinetuneSpec(
                model=MODEL_NAME,
                version=base_version,
                data={"kind": "builtin", "shift": args.shift},
                backend=backend,
                parameters="all",
                optimizer="mezo",
                schedule="cosine",
                steps=steps,
                lr=lr,
                eps=eps,
                eval_every=eval_every,
                batch_size=64,
                alpha=0.1,
                score="aps",
                seed=args.seed,
            )
            results.append(run(spec, repository))
    print(
        f"\n{MODEL_NAME} on digits-seq/{args.shift}: base → tuned on the test split "
        f"(n={results[0].before.n}), alpha = 0.1 APS sets, MeZO over all "
        f"{results[0].tuned_parameters} parameters, seed {args.seed}\n"
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([r.model_dump(mode="json") for r in results], indent=2))


if __name__ == "__main__":
    main()
