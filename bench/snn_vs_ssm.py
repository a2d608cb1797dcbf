"""Spiking network against state-space model on digits: accuracy, spike sparsity and the
estimated energy of one inference, event-driven beside the dense-equivalent figure.

    OMP_NUM_THREADS=1 .venv/bin/python bench/snn_vs_ssm.py [--backends torch analog_imc]
        [--append docs/BENCHMARKS.md]

The built-in classifiers (`digits-lru`, the SSM; `digits-snn`, a recurrent LIF network with
a dense input layer; `digits-snn-lite`, a smaller one fed thermometer-coded input spikes) run
the digits test split (397 images, 8 rows of 8 pixels each) through each backend's runner,
exactly as the server does. Work and energy are the runner's `Usage` (hardware_backends.energy:
4.6 pJ per FP32 MAC and 0.9 pJ per spike-driven accumulate on digital hardware, the PCM
chip's figure for crossbar MACs on analog_imc), divided by the number of images. "Event-
driven" charges a spiking layer only for the spikes that happened; "dense-equivalent" counts
the same network as if every synapse were a MAC on every step, the figure to compare with.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from hardware_backends.registry import prepare_runner
from models.digits import load_digits_seq
from models.repository import ModelRepository, default_repository_root
from service.dataplane.plane import runner_key
from service.dataplane.predictions import calibration_inputs, run_last_step

try:
    from bench._report import append_section
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from _report import append_section

HEADING = "## SNN against SSM on digits"
MODELS = ("digits-lru", "digits-snn", "digits-snn-lite")


def measure(model_name: str, backend: str, repository: ModelRepository) -> dict:
    card = repository.card(model_name)
    model = repository.load(model_name).model
    runner = prepare_runner(backend, model, model_key=runner_key(card))
    test = load_digits_seq("test")
    last, usage = run_last_step(runner, test.inputs)  # [N, C] or [S, N, C]
    logits, _ = calibration_inputs(last)  # the predictive mean for sampling backends
    n = len(test)
    counts = usage.to_dict()
    return {
        "model": model_name,
        "architecture": card.config["architecture"],
        "backend": backend,
        "parameters": sum(p.numel() for p in model.parameters()),
        "accuracy": float((logits.argmax(dim=-1) == test.labels).double().mean()),
        "sparsity": counts["sparsity"],
        "macs": counts["macs"] / n,
        "accumulates": counts["accumulates"] / n,
        "energy_nj": counts["energy_joules"] / n * 1e9,
        "dense_nj": counts["dense_equivalent_energy_joules"] / n * 1e9,
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        f"Digits test split (397 images), CPU ({platform.machine()}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}. Per inference = one image, 8 steps. Spike rate = spikes / "
        "neuron updates (its complement is the activation sparsity).",
        "",
        "| model | architecture | backend | parameters | test accuracy | spike rate "
        "| MACs / inference | accumulates / inference | energy / inference (nJ) "
        "| dense-equivalent (nJ) | dense / event-driven |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        sparsity = "-" if row["sparsity"] is None else f"{row['sparsity']:.3f}"
        lines.append(
            f"| {row['model']} | {row['architecture']} | {row['backend']} "
            f"| {row['parameters']:,} | {row['accuracy']:.4f} | {sparsity} "
            f"| {row['macs']:,.0f} | {row['accumulates']:,.0f} | {row['energy_nj']:,.1f} "
            f"| {row['dense_nj']:,.1f} | {row['dense_nj'] / row['energy_nj']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "analog_imc", "stochastic"])
    parser.add_argument("--append", type=Path, default=None, help="append the table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    repository = ModelRepository(default_repository_root())
    rows = [measure(m, b, repository) for b in args.backends for m in MODELS]
    table = format_table(rows)
    print(table)
    if args.append is not None:
        command = "python bench/snn_vs_ssm.py " + " ".join(sys.argv[1:])
        append_section(args.append, HEADING, table, command.strip())


if __name__ == "__main__":
    main()
