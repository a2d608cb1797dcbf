"""Forward-only fine-tuning of digits-lru to shifted digits, against backprop and plain MeZO.

For each shift (inverted x -> 16 - x, translated by one pixel, gaussian noise) the job gets
the same 600 shifted train images inline (the job cuts them into tune 240 / validation 120 /
calibration 120 / test 120, as it would a user's upload) and the built-in `digits-lru` is
tuned eight ways, each in a fresh process (so each one's peak memory is its own):

- "zo default":    the default `FinetuneSpec`: plain MeZO over all parameters (cosine rate
                   5e-4, one perturbation per step, 5000 steps, ε auto = 1e-3 on torch),
                   through the real job (`run_finetune`), early stopping on validation;
- "zo targets":    the parameter-efficient alternative (`TARGETS`: input adapter, norms and
                   readout with ZO-Adam, 2 perturbations x 2500 steps: the same 10,000
                   forward passes), same job;
- "adam backprop": Adam (lr 1e-3) on the default's parameters (all), same batch size and
                   steps, best validation checkpoint kept; "adam targets": the same on
                   `TARGETS`' parameters and steps (lr 1e-2);
- "zo input":      the chip defaults (`CHIP_DEFAULTS`) on torch: the digital reference of
                   the chip rows;
- "zo chip":       the default spec with `"backend": "analog_imc"` and nothing else:
                   chip-in-the-loop with the chip defaults (`CHIP_DEFAULTS`: the input
                   adapter, MeZO at 0.05, 2 perturbations x 1000 steps) on one programmed
                   chip, ε picked above the measured noise floor; evaluated, like the job,
                   on the deployed chip (analog_imc, seed 0) with the adapter merged;
  "zo chip fresh": the same with `"common_noise": false`: every loss reading draws fresh
                   output noise, as a physical chip's periphery would (no common random
                   numbers within a perturbation pair).

Reported on the held-out examples: accuracy on the job's test split (the job's own figure),
and, after recalibration, ECE and conformal coverage / mean set size (alpha 0.1, APS) as
mean ± std over `--resplits` random calibration/test re-splits of the calibration + test
examples; training forward passes (batches), wall seconds, and the process's peak RSS
(and its growth during the method).

    OMP_NUM_THREADS=1 python bench/zo_shift.py [--shifts inverted translated gaussian_noise]
        [--steps N] [--analog-steps N] [--resplits 20] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from calibration.artifact import fit_calibration_artifact
from calibration.metrics import expected_calibration_error
from models.builtin import ensure_builtin_models
from models.digits import load_digits_seq
from models.finetune import attach_targets, merge_targets
from models.repository import ModelRepository, default_repository_root
from service.finetuning.forward import BackendForward
from service.finetuning.job import FinetuneData, load_finetune_data, run_finetune
from service.finetuning.spec import CHIP_DEFAULTS, FinetuneSpec, ProgressEvent

MODEL_NAME = "digits-lru"
SHIFTS = ("inverted", "translated", "gaussian_noise")
# The parameter-efficient alternative measured beside the default (input adapter, norms and
# readout: 2,074 of digits-lru's 135,306 parameters, ZO-Adam, 2 perturbations per step).
TARGETS = {
    "parameters": "input+norm+readout",
    "optimizer": "zo_adam",
    "lr": 1e-2,
    "n_perturbations": 2,
    "steps": 2500,
}
ADAM_LR = {"all": 1e-3}  # Adam's rate by target; 1e-2 for the small targets


def private_repository(directory: Path) -> ModelRepository:
    """A copy of the built-in digits-lru (trained afresh if it is not there), so the tuned
    versions never land among the committed artifacts."""
    source = default_repository_root() / MODEL_NAME
    if source.is_dir():
        shutil.copytree(source, directory / MODEL_NAME)
    repository = ModelRepository(directory)
    ensure_builtin_models(repository, [MODEL_NAME])
    return repository


def inline_data(shift: str, examples: int) -> dict:
    shifted = load_digits_seq("train", shift=shift)
    inputs = shifted.inputs[:examples].tolist()  # [N, 8, 8]
    return {"kind": "inline", "inputs": inputs, "labels": shifted.labels[:examples].tolist()}


# ---- held-out evaluation with re-split calibration -------------------------------------------


def evaluate(model, backend: str, data: FinetuneData, resplits: int, alpha: float = 0.1) -> dict:
    """Test-split accuracy, and ECE / coverage / set size after recalibration over `resplits`
    random halvings of calibration + test (fit on one half, scored on the other)."""
    forward = BackendForward(model.eval(), backend)
    test_logits = forward.final_logits(data.test.inputs)  # [Nt, C]
    accuracy = float((test_logits.argmax(-1) == data.test.labels).float().mean())
    inputs = torch.cat([data.calibration.inputs, data.test.inputs])  # [N, T, F]
    labels = torch.cat([data.calibration.labels, data.test.labels])  # [N]
    final = forward.final_logits(inputs)  # [N, C]
    eces, coverages, sizes = [], [], []
    for split in range(resplits):
        order = torch.from_numpy(np.random.default_rng([split, 7]).permutation(len(labels)))
        fit, score = order[: len(order) // 2], order[len(order) // 2 :]
        artifact = fit_calibration_artifact(
            final[fit], labels[fit], "bench", "0", backend, seed=split
        )  # the whole-sequence calibration (the job fits one per step; the last is this)
        rng = torch.Generator().manual_seed(split)
        probs, sets = artifact.predict(final[score], alpha, "aps", rng=rng)
        truth = labels[score]
        eces.append(expected_calibration_error(probs, truth))
        coverages.append(float(sets[torch.arange(len(truth)), truth].double().mean()))
        sizes.append(float(sets.sum(dim=1).double().mean()))
    return {
        "accuracy": accuracy,
        "ece": (float(np.mean(eces)), float(np.std(eces))),
        "coverage": (float(np.mean(coverages)), float(np.std(coverages))),
        "set_size": (float(np.mean(sizes)), float(np.std(sizes))),
        "resplits": resplits,
        "n_test": len(data.test),
        "n_pooled": len(labels),
    }


# ---- the methods, each in its own process ----------------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_method(method: str, shift: str, args: dict) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as directory:
        repository = private_repository(Path(directory))
        base_version = repository.latest(MODEL_NAME)
        common = {
            "model": MODEL_NAME,
            "version": base_version,
            "seed": args["seed"],
            "data": inline_data(shift, args["examples"]),
        }
        if args["steps"]:
            common["steps"] = args["steps"]
        default = FinetuneSpec(**common)
        base = repository.load(MODEL_NAME, base_version)
        labels = list(base.card.config["labels"])
        data = load_finetune_data(default, labels, base.model.config.d_input)
        rss_before = _peak_rss_mib()
        started = time.monotonic()
        if method == "base":
            model, backend, extra = base.model, "torch", {}
        elif method in ("adam backprop", "adam targets"):
            spec = default if method == "adam backprop" else FinetuneSpec(**common, **TARGETS)
            model, extra = adam_finetune(copy.deepcopy(base.model), spec, data)
            backend = "torch"
        else:
            if method == "zo default":
                spec = default
            elif method == "zo targets":
                spec = FinetuneSpec(**{**common, **TARGETS})
            elif method == "zo input":  # the chip defaults on torch
                digital = {k: v for k, v in common.items() if k != "steps"}
                spec = FinetuneSpec(**{**CHIP_DEFAULTS, **digital})
            else:  # zo chip: the analog_imc defaults (CHIP_DEFAULTS), not torch's step count
                chip = {k: v for k, v in common.items() if k != "steps"}
                if args["analog_steps"]:
                    chip["steps"] = args["analog_steps"]
                if method == "zo chip fresh":
                    chip["common_noise"] = False
                spec = FinetuneSpec(**chip, backend="analog_imc")
            result = run_finetune(spec, repository, progress=_progress(method, shift))
            model, backend = repository.load(MODEL_NAME, result.version).model, spec.backend
            extra = {
                "steps": result.steps_run,
                "best_step": result.best_step,
                "forward_passes": 2 * spec.n_perturbations * result.steps_run,
                "tuned_parameters": result.tuned_parameters,
                "eps": result.eps,
                "noise_floor": result.noise_floor,
                "loss_noise": result.loss_noise,
                "job_accuracy": (result.before.accuracy, result.after.accuracy),
            }
        wall = time.monotonic() - started
        peak = _peak_rss_mib()
        metrics = evaluate(model, backend, data, args["resplits"])
    return {
        "method": method,
        "shift": shift,
        "backend": backend,
        "wall_s": wall,
        "peak_rss_mib": peak,
        "rss_growth_mib": peak - rss_before,
        **extra,
        **metrics,
    }


def _progress(method: str, shift: str):
    def report(event: ProgressEvent) -> None:
        if event.validation_accuracy is not None:
            print(
                f"  [{shift} / {method}] step {event.step}/{event.total_steps}: validation "
                f"{event.validation_accuracy:.3f} (best at {event.best_step})",
                flush=True,
            )
        elif event.message.startswith("eps"):
            print(f"  [{shift} / {method}] {event.message}", flush=True)

    return report


def adam_finetune(model, spec: FinetuneSpec, data: FinetuneData):
    """Backprop with Adam on the default's targets, the job's batches and steps, keeping the
    best validation checkpoint (the same early stopping as the job)."""
    tuned = [p for _, p in attach_targets(model, spec.parameters)]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in tuned:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(tuned, lr=ADAM_LR.get(spec.parameters, 1e-2))
    rng = np.random.default_rng([spec.seed, 1])
    best, best_state, best_step = (-1.0, 0.0), None, 0
    n, steps = len(data.tune), spec.steps
    for step in range(steps + 1):
        if step % spec.eval_every == 0 or step == steps:
            with torch.no_grad():
                logits = model.eval()(data.validation.inputs)[0][:, -1]  # [Nv, C]
                loss = torch.nn.functional.cross_entropy(logits, data.validation.labels)
                accuracy = float((logits.argmax(-1) == data.validation.labels).float().mean())
            if (accuracy, -float(loss)) > best:
                best, best_step = (accuracy, -float(loss)), step
                best_state = [p.detach().clone() for p in tuned]
        if step == steps:
            break
        index = torch.from_numpy(rng.choice(n, size=min(spec.batch_size, n), replace=False))
        logits = model.train()(data.tune.inputs[index])[0][:, -1]  # [b, C]
        loss = torch.nn.functional.cross_entropy(logits, data.tune.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for parameter, value in zip(tuned, best_state, strict=True):
            parameter.copy_(value)
            parameter.requires_grad_(False)
    merge_targets(model)
    return model.eval(), {
        "steps": steps,
        "best_step": best_step,
        "forward_passes": steps,
        "tuned_parameters": sum(p.numel() for p in tuned),
    }


# ---- the table -------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = [
        "| shift | method | tuned params | steps (best) | test accuracy | ECE | coverage | "
        "set size | forward passes | wall s | peak RSS MiB (growth) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = f"{r['steps']} ({r['best_step']})" if "steps" in r else "–"
        params = r.get("tuned_parameters", "–")
        method = r["method"] + (f", ε {r['eps']:g}" if r.get("eps") else "")
        if r.get("noise_floor"):
            method += f" (floor {r['noise_floor']:.2g}, loss SD {r['loss_noise']:.2g})"
        lines.append(
            f"| {r['shift']} | {method} | {params} | {steps} | {r['accuracy']:.3f} | "
            f"{r['ece'][0]:.3f} ± {r['ece'][1]:.3f} | {r['coverage'][0]:.3f} ± "
            f"{r['coverage'][1]:.3f} | {r['set_size'][0]:.2f} | {r.get('forward_passes', 0)} | "
            f"{r['wall_s']:.0f} | {r['peak_rss_mib']:.0f} ({r['rss_growth_mib']:.0f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=SHIFTS)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[
            "base",
            "zo default",
            "zo targets",
            "adam backprop",
            "adam targets",
            "zo input",
            "zo chip",
            "zo chip fresh",
        ],
    )
    parser.add_argument("--examples", type=int, default=600)
    parser.add_argument("--steps", type=int, default=0, help="0: the default spec's steps")
    parser.add_argument("--analog-steps", type=int, default=0, help="0: the chip defaults'")
    parser.add_argument("--resplits", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    options = {
        k: getattr(args, k) for k in ("examples", "steps", "analog_steps", "resplits", "seed")
    }
    context = multiprocessing.get_context("spawn")
    rows = []
    for shift in args.shifts:
        for method in args.methods:
            with context.Pool(1) as pool:
                row = pool.apply(run_method, (method, shift, options))
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    print(
        f"\n{MODEL_NAME}, {args.examples} shifted train examples inline, seed {args.seed}; "
        f"ECE/coverage: mean ± std over {args.resplits} re-splits, alpha 0.1 APS\n"
    )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
