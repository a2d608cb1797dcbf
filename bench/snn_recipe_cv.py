"""Choosing a spiking recipe by k-fold cross-validation on the digits training split.

    OMP_NUM_THREADS=1 .venv/bin/python bench/snn_recipe_cv.py --candidate NAME [...]
        [--folds 5] [--seeds 0 1 2 3 4]

Each candidate is the first digits-snn-lite recipe (150 epochs, input noise 2; BASE below)
with a few fields changed (CANDIDATES); "ep250-noise3" is the recipe the built-in now uses.
The 1000 training images are cut into `--folds` folds by a fixed permutation; fold k is
trained on the other folds (800 images) with seed `--seeds[k]` and validated on fold k
(200 images), so the mean runs over folds and seeds together. Energy per image is the
digital event-driven estimate of hardware_backends.energy (4.6 pJ per FP32 MAC, 0.9 pJ per
spike-driven accumulate) from `spike_statistics` on the validation fold. The calibration
and test splits are never read here: a recipe is chosen on these figures alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from hardware_backends.energy import DIGITAL_FP32
from models.builtin import BUILTIN_RECIPES
from models.datasets import SequenceDataset
from models.evaluate import classification_metrics, spike_statistics
from models.training import build_for_data, fit_classifier, load_training_data, seed_everything

# The recipe the sweep started from; the built-in's own differs in epochs and input noise.
BASE = dataclasses.replace(BUILTIN_RECIPES["digits-snn-lite"], epochs=150, input_noise=2.0)


def variant(model_config: dict | None = None, **fields) -> dict:
    """The base recipe's fields with `model_config` entries and top-level `fields` replaced."""
    return {"model_config": {**BASE.model_config, **(model_config or {})}, **fields}


CANDIDATES: dict[str, dict] = {
    "base": variant(),
    "d320": variant({"d_model": 320}),
    "d384": variant({"d_model": 384}),
    "pen0.1": variant(spike_penalty=0.1),
    "d320-pen0.1": variant({"d_model": 320}, spike_penalty=0.1),
    "d384-pen0.1": variant({"d_model": 384}, spike_penalty=0.1),
    "ep250": variant(epochs=250),
    "d320-ep250": variant({"d_model": 320}, epochs=250),
    "lev8": variant({"input_levels": 8, "input_scale": 0.5}),
    "d320-noise3": variant({"d_model": 320}, input_noise=3.0),
    "d384-ep250": variant({"d_model": 384}, epochs=250),
    "d320-pen0.3": variant({"d_model": 320}, spike_penalty=0.3),
    "d384-pen0.4": variant({"d_model": 384}, spike_penalty=0.4),
    "lr5e-3": variant(lr=5e-3),
    "d320-ep250-pen0.3": variant({"d_model": 320}, epochs=250, spike_penalty=0.3),
    "ep400": variant(epochs=400),
    "ep250-noise3": variant(epochs=250, input_noise=3.0),
    "ep250-lev8": variant({"input_levels": 8, "input_scale": 0.5}, epochs=250),
    "d288-ep250": variant({"d_model": 288}, epochs=250),
    "ep250-pen0.15": variant(epochs=250, spike_penalty=0.15),
    "ep250-noise4": variant(epochs=250, input_noise=4.0),
    "d320-ep250-pen0.3-noise3": variant(
        {"d_model": 320}, epochs=250, spike_penalty=0.3, input_noise=3.0
    ),
}


def fold_split(train: SequenceDataset, folds: int, fold: int) -> tuple[SequenceDataset, ...]:
    """(fit, validation) for one fold of a fixed permutation of the training split."""
    order = np.random.default_rng(0).permutation(len(train))
    held = np.array_split(order, folds)[fold]
    kept = np.setdiff1d(order, held)

    def subset(indices: np.ndarray, part: str) -> SequenceDataset:
        return SequenceDataset.from_arrays(
            f"{train.name}/fold{fold}/{part}",
            train.inputs[indices].numpy(),
            train.labels[indices].numpy(),
            train.label_names,
            train.value_range,
        )

    return subset(kept, "fit"), subset(held, "validation")


def energy_nj(stats: dict[str, float]) -> float:
    joules = (
        stats["dense_macs_per_inference"] * DIGITAL_FP32.mac_joules
        + stats["synaptic_ops_per_inference"] * DIGITAL_FP32.accumulate_joules
    )
    return joules * 1e9


def run_fold(recipe, train: SequenceDataset, folds: int, fold: int) -> dict[str, float]:
    seed_everything(recipe.seed)
    data = load_training_data(recipe.dataset, recipe.seed)
    fit, validation = fold_split(train, folds, fold)
    model = build_for_data(recipe, data)
    fit_classifier(model, fit, recipe, progress=False)
    stats = spike_statistics(model, validation)
    return {
        "accuracy": classification_metrics(model, validation)["accuracy"],
        "energy_nj": energy_nj(stats),
        "spike_rate": stats["spike_fraction"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", nargs="+", required=True, choices=sorted(CANDIDATES))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    if len(args.seeds) < args.folds:
        parser.error("give one seed per fold")
    torch.set_num_threads(1)
    train = load_training_data(BASE.dataset).train
    print(
        "| candidate | folds x seeds | validation accuracy per fold | mean | nJ / image "
        "| spike rate | seconds |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.candidate:
        started = time.perf_counter()
        rows = []
        for fold in range(args.folds):
            recipe = dataclasses.replace(BASE, **CANDIDATES[name], seed=args.seeds[fold])
            rows.append(run_fold(recipe, train, args.folds, fold))
        accuracies = [r["accuracy"] for r in rows]
        print(
            f"| {name} | {args.folds} x {args.seeds[: args.folds]} "
            f"| {' '.join(f'{a:.3f}' for a in accuracies)} "
            f"| {statistics.mean(accuracies):.4f} "
            f"| {statistics.mean(r['energy_nj'] for r in rows):.1f} "
            f"| {statistics.mean(r['spike_rate'] for r in rows):.3f} "
            f"| {time.perf_counter() - started:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
