"""`neuroserve calibrate` and `neuroserve export-onnx`: argparse sub-commands.

    neuroserve calibrate digits-lru --backend analog_imc --backend-option t_inference=3600
    neuroserve calibrate my-model --data holdout.npz --plot reliability.png
    neuroserve export-onnx digits-lru --output digits-lru.onnx

`calibrate` runs labelled calibration data through the model on one backend (exactly as
the server will) and fits one calibration per position (`calibration.PositionalCalibration`):
per step for sequence classifiers, per context-length bucket for language models (the
examples: `service.dataplane.calibration_data`). Each position's fit chooses its map by
cross-validated NLL on one half of its examples and keeps the conformity scores of the other
half. The calibration is stored beside the weights (`service.dataplane.calibration_store`)
with a report measured on test data the calibration never saw (the digits test split, or the
held-out text's last quarter): accuracy, coverage and set sizes by position, and early
decisions for classifiers. Data:

- classifiers trained on digits-seq: the fixed calibration split (400 images, never trained on);
- language models: random windows of the held-out text (its first three quarters);
- `--data FILE.npz` (classifiers: `inputs` [N, T, F], `labels` [N], see `models.userdata`)
  or `--data FILE.txt` (language models) instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli.common import parse_key_value

if TYPE_CHECKING:  # torch-heavy; imported in the handlers so `neuroserve --help` stays fast
    from calibration import PositionalCalibration
    from models.repository import ModelCard
    from service.dataplane.calibration_data import PositionExamples

REPORT_ALPHA = 0.1  # the level the printed table shows (the stored report has more)
EARLY_REPORT_ALPHAS = (0.05, 0.1, 0.2)
EARLY_REPORT_SCORES = ("lac", "raps")  # LAC stops soonest; RAPS is the server's default
METRIC_ORDER = ("accuracy", "nll", "ece", "adaptive_ece", "mce", "brier")


# ---- the test report ------------------------------------------------------------------------


def early_decision_report(
    positional: PositionalCalibration, test: PositionExamples
) -> list[dict[str, Any]]:
    """Coverage at the stopping time and steps saved on the test streams, per level."""
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    import torch

    from calibration import EarlyDecisionRule

    probs = torch.stack(  # [N, K, C], each step by its own map
        [a.calibrate(x) for a, x in zip(positional.artifacts, test.logits, strict=True)], dim=1
    )
    rows = []
    for score in EARLY_REPORT_SCORES:
        for alpha in EARLY_REPORT_ALPHAS:
            rule = EarlyDecisionRule.from_calibration(positional, alpha, score, max_set_size=1)
            report = rule.evaluate(probs, test.labels[0])
            rows.append(
                {"alpha": alpha, "score": score, "max_set_size": 1, "n": len(test.labels[0])}
                | dataclasses.asdict(report)
            )
    return rows


def report_on_test_data(
    positional: PositionalCalibration, test: PositionExamples, classifier: bool
) -> dict[str, Any]:
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    from calibration.position_report import position_report, rows_as_dicts

    report: dict[str, Any] = {
        "data": test.name,
        "positions": rows_as_dicts(position_report(positional, test.logits, test.labels)),
    }
    if classifier:
        report["early_decisions"] = early_decision_report(positional, test)
    return report


def format_positions(report: dict[str, Any]) -> str:
    rows = [r for r in report["positions"] if r["alpha"] == REPORT_ALPHA]
    lines = [
        f"by position on {report['data']} (alpha {REPORT_ALPHA}; plain sets, and never-empty "
        "sets as served by default):",
        "  score            position  accuracy  coverage  size   never-empty coverage  size",
    ]
    for row in rows:
        lines.append(
            f"  {row['score']:<16} {row['position']:>8}  {row['accuracy']:8.3f}  "
            f"{row['coverage']:8.3f}  {row['mean_set_size']:5.2f}  "
            f"{row['never_empty_coverage']:20.3f}  {row['never_empty_mean_set_size']:5.2f}"
        )
    return "\n".join(lines)


def format_early_decisions(rows: list[dict[str, Any]]) -> str:
    lines = ["early decisions (max_set_size 1, stop at the first small set):"]
    for row in rows:
        lines.append(
            f"  alpha={row['alpha']:g} {row['score']}: coverage at stopping "
            f"{row['coverage']:.4f} (>= {1 - row['alpha']:g} guaranteed), mean stop step "
            f"{row['mean_stop_step']:.2f}, steps saved {row['mean_steps_saved']:.2f} "
            f"({100 * row['fraction_steps_saved']:.1f}%) on {row['n']} test streams"
        )
    return "\n".join(lines)


def format_metrics(positional: PositionalCalibration) -> str:
    rows = [("position", "map", *(f"{key} before/after" for key in METRIC_ORDER[:3]))]
    for k, artifact in enumerate(positional.artifacts):
        metrics = artifact.metrics
        rows.append(
            (
                positional.buckets.describe(k),
                _map_name(artifact.calibration_map.to_dict()),
                *(
                    f"{metrics[f'{key}_before']:.4f} / {metrics[f'{key}_after']:.4f}"
                    for key in METRIC_ORDER[:3]
                ),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _map_name(description: dict[str, Any]) -> str:
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    from calibration.plot import describe_map

    return describe_map(description)


# ---- the command ----------------------------------------------------------------------------


def examples(card: ModelCard, runner: Any, data: Path | None, seed: int) -> tuple:
    """(calibration examples, test examples or None) of `card` through `runner`."""
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    from service.dataplane import calibration_data as cd

    if cd.is_language_model(card):
        calibration_text, test_text = cd.split_text(cd.held_out_text(card, data))
        return (
            cd.language_examples(runner, calibration_text, seed),
            cd.language_examples(runner, test_text, seed + 1),
        )
    fitted = cd.classifier_examples(runner, cd.classifier_data(card, data))
    test = cd.digits_test_split(card) if data is None else None
    return fitted, None if test is None else cd.classifier_examples(runner, test)


def run_calibrate(args: argparse.Namespace) -> int:
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    from calibration import fit_positional_calibration
    from models.repository import (
        ArtifactError,
        ModelNotFoundError,
        ModelRepository,
        default_repository_root,
    )
    from models.training import current_command
    from service.dataplane.calibration_data import (
        CalibrateError,
        is_language_model,
        prepared_runner,
    )
    from service.dataplane.calibration_store import CalibrationStore

    repository = ModelRepository(args.repository or default_repository_root())
    options = dict(args.backend_option or [])
    try:
        card = repository.card(args.model, args.version)
        runner = prepared_runner(repository, card, args.backend, options)
        fitted, test = examples(card, runner, args.data, args.seed)
        positional = fit_positional_calibration(
            fitted.logits,
            fitted.labels,
            fitted.buckets,
            card.name,
            card.version,
            args.backend,
            seed=args.seed,
            map_candidates=tuple(args.maps),
        )
        report = (
            {}
            if test is None
            else report_on_test_data(positional, test, not is_language_model(card))
        )
        source = {
            "data": fitted.name,
            "data_sha256": fitted.sha256,
            "n": int(fitted.labels[0].shape[0]),
            "command": getattr(args, "command_line", None) or current_command(),
        }
        json_path, tensor_path = CalibrationStore(repository).save(
            positional, backend_options=options, source=source, report=report
        )
    except (CalibrateError, ModelNotFoundError, ArtifactError, ValueError) as error:
        print(f"neuroserve calibrate: {error}", file=sys.stderr)
        return 2
    print(
        f"calibrated {card.name} version {card.version} on {args.backend} "
        f"{f'{options} ' if options else ''}with {fitted.name}: "
        f"{len(positional.buckets)} positions up to {positional.horizon} (maps fitted on one "
        "half of each position's examples, metrics on the other half)"
    )
    print(format_metrics(positional))
    if report:
        print(format_positions(report))
        if "early_decisions" in report:
            print(format_early_decisions(report["early_decisions"]))
    print(f"wrote {json_path}\nwrote {tensor_path}")
    if args.plot is not None:
        print(f"wrote {plot(positional, fitted, test, args.plot, card, args.backend)}")
    return 0


def plot(
    positional: PositionalCalibration,
    fitted: PositionExamples,
    test: PositionExamples | None,
    path: Path,
    card: ModelCard,
    backend: str,
) -> Path:
    """The reliability diagram of the last position, on the test examples when there are
    some (else on the calibration examples, which the map was half fitted on: said so)."""
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    from calibration.plot import describe_map, plot_reliability_diagram

    artifact = positional.artifacts[-1]
    examples_used, where = (test, "test data") if test is not None else (fitted, "calibration data")
    probs = artifact.calibrate(examples_used.logits[-1])
    position = positional.buckets.describe(len(positional.buckets) - 1)
    return plot_reliability_diagram(
        probs,
        examples_used.labels[-1],
        path,
        title=f"{card.name} v{card.version} on {backend}, position {position}, {where}",
        map_name=describe_map(artifact.calibration_map.to_dict()),
    )


def run_export_onnx(args: argparse.Namespace) -> int:
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    from hardware_backends.onnx_export import export_onnx
    from models.repository import (
        ArtifactError,
        ModelNotFoundError,
        ModelRepository,
        default_repository_root,
    )

    repository = ModelRepository(args.repository or default_repository_root())
    try:
        loaded = repository.load(args.model, args.version)
        spec = export_onnx(loaded.model, args.output)
    except (ModelNotFoundError, ArtifactError, ValueError, OSError) as error:
        print(f"neuroserve export-onnx: {error}", file=sys.stderr)
        return 2
    card = loaded.card
    print(f"exported the step of {card.name} version {card.version} to {args.output}")
    print(
        json.dumps(
            {
                **dataclasses.asdict(spec),
                "inputs": spec.input_names(),
                "outputs": spec.output_names(),
            },
            indent=2,
        )
    )
    return 0


# ---- argparse -------------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model name in the repository")
    parser.add_argument("--version", help="model version (default: the latest)")
    parser.add_argument(
        "--repository",
        type=Path,
        help="model repository root (default: the built-in models/artifacts)",
    )


def register_calibrate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="calibrate a model on a backend and store the artifact beside its weights",
        description=(
            "Run labelled calibration data through MODEL on one backend, fit temperature/"
            "vector scaling and the conformity scores, store them beside the weights and "
            "print the metrics before and after. Data: the digits calibration split for "
            "digits classifiers, held-out text windows for language models, or --data."
        ),
    )
    _add_common(parser)
    parser.add_argument("--backend", default="torch", help="hardware backend (default torch)")
    parser.add_argument(
        "--backend-option",
        dest="backend_option",
        action="append",
        type=parse_key_value,
        metavar="KEY=VALUE",
        help="backend option (repeatable), e.g. --backend-option t_inference=3600",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="labelled calibration data: FILE.npz (classifiers) or FILE.txt (language models)",
    )
    parser.add_argument("--plot", type=Path, help="write a reliability diagram PNG here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and windows")
    parser.add_argument(
        "--maps",
        type=_map_names,
        default=["identity", "temperature", "vector_scaling"],
        metavar="MAP[,MAP...]",
        help="calibration maps to choose from per position, by cross-validated NLL (default "
        "identity,temperature,vector_scaling); identity,temperature keeps every decision "
        "the model itself makes (vector scaling may change some)",
    )
    parser.set_defaults(func=run_calibrate)


def _map_names(text: str) -> list[str]:
    known = ("identity", "temperature", "vector_scaling")
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown maps {unknown or text!r}; choose from {known}")
    return names


def register_export_onnx(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-onnx",
        help="export a model's step to ONNX (state as named inputs and outputs)",
        description="Export one step of a model to an ONNX graph checked with onnx.checker.",
    )
    _add_common(parser)
    parser.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    parser.set_defaults(func=run_export_onnx)
