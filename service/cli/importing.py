"""`neuroserve import nir` and `neuroserve import onnx`: publish a model trained elsewhere.

    neuroserve import nir net.nir --name my-snn --dt 1e-4 --readout sum
    neuroserve import onnx gru.onnx --name my-gru --labels yes,no
    neuroserve calibrate my-snn --data calibration.npz          # then serve it

A NIR graph (snnTorch, Norse, Sinabs, Rockpool, Lava-dl ...) becomes a stepped spiking model
(`models.nir_graph`); an ONNX step graph with its state as inputs and outputs becomes a model
run by onnxruntime (`models.onnx_step`). Either is checked whole before anything is written,
and the new version records the source file's sha256. See docs/BRING_YOUR_OWN_MODEL.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.cli.common import add_repository_flag


def _labels(text: str) -> list[str]:
    labels = [label.strip() for label in text.split(",")]
    if not all(labels):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-empty names, got {text!r}")
    return labels


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"dt must be a positive number of seconds, got {text}")
    return value


def run_import(args: argparse.Namespace) -> int:
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    from models.repository import ModelRepository, default_repository_root
    from models.training import current_command

    repository = ModelRepository(args.repository or default_repository_root())
    command = getattr(args, "command_line", None) or current_command()
    try:
        if args.format == "nir":
            # Imported here: reading NIR pulls in h5py, which only this command needs.
            from models.nir_import import import_nir

            card = import_nir(
                repository,
                args.file,
                args.name,
                dt=args.dt,
                readout=args.readout,
                input_scale=args.input_scale,
                labels=args.labels,
                command=command,
            )
        else:
            # Imported here, not at the top, so that `neuroserve --help` starts fast.
            from models.onnx_import import import_onnx

            card = import_onnx(
                repository, args.file, args.name, labels=args.labels, command=command
            )
    except ValueError as error:  # NIRImportError, OnnxImportError, bad names and labels
        print(f"neuroserve import {args.format}: {error}", file=sys.stderr)
        return 2
    config = card.config
    print(
        f"published {card.name} version {card.version} at {card.path} "
        f"({config['architecture']}, {config['input']['features']} features -> "
        f"{len(config['labels'])} classes, source sha256 {config['imported']['sha256'][:16]}…)"
    )
    print(f"next: neuroserve calibrate {card.name} --data CALIBRATION.npz")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `import` with its two formats."""
    parser = subparsers.add_parser(
        "import",
        help="publish a NIR graph or a stateful ONNX step graph as a model",
        description="Import a model trained elsewhere into the repository (a new version).",
    )
    formats = parser.add_subparsers(title="formats", dest="format", metavar="FORMAT")
    formats.required = True

    nir = formats.add_parser(
        "nir",
        help="a NIR graph (.nir) from snnTorch, Norse, Sinabs, Rockpool, Lava-dl ...",
        description=(
            "Step a NIR graph with forward Euler at --dt seconds per step (snnTorch exports "
            "with dt 1e-4; Norse 1.1 with tau = dt·tau, import those with 1e-6). Supported "
            "nodes: Input, Output, Affine, Linear, Scale, Flatten, Conv1d, Conv2d, Threshold, "
            "LIF, CubaLIF, LI, IF, I, and nested graphs; cycles are recurrent connections "
            "delayed by one step."
        ),
    )
    nir.add_argument("file", type=Path, metavar="FILE.nir")
    nir.add_argument(
        "--dt",
        type=_positive_seconds,
        default=1e-4,
        help="seconds per step of the discretisation (default 1e-4, snnTorch's export step)",
    )
    nir.add_argument(
        "--readout",
        choices=("value", "sum"),
        default="value",
        help="logits: the Output node's value at each step (value, e.g. a leaky integrator's "
        "membrane), or its running sum (sum: spike counts of a rate-coded classifier)",
    )
    nir.add_argument(
        "--input-scale",
        dest="input_scale",
        type=float,
        default=1.0,
        help="multiply the served features by this before the graph (e.g. 0.0625 for pixels "
        "0..16 when the network was trained on 0..1)",
    )

    onnx = formats.add_parser(
        "onnx",
        help="an ONNX step graph with its state as inputs and outputs",
        description=(
            "Inputs 'x' [batch, F] and 'state.<name>'; outputs 'logits' [batch, C] and "
            "'next_state.<name>' for each state (same shape and dtype), optionally "
            "'activity.<counter>' [batch]: the interface `neuroserve export-onnx` writes."
        ),
    )
    onnx.add_argument("file", type=Path, metavar="FILE.onnx")
    for sub in (nir, onnx):
        sub.add_argument("--name", required=True, help="model name to publish under")
        sub.add_argument(
            "--labels",
            type=_labels,
            help="comma-separated class names, one per output (default 0..C-1)",
        )
        add_repository_flag(sub)
        sub.set_defaults(func=run_import)
