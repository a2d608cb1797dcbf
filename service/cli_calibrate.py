"""`neuroserve calibrate` and `neuroserve export-onnx`: argparse sub-commands.

    neuroserve calibrate digits-lru --backend analog_imc --backend-option t_inference=3600
    neuroserve calibrate my-model --data holdout.npz --plot reliability.png
    neuroserve export-onnx digits-lru --output digits-lru.onnx

`calibrate` runs labelled calibration data through the model on one backend (exactly as
the server will), fits the calibration artifact (`calibration.fit_calibration_artifact`:
map chosen by cross-validated NLL on one half, conformity scores of the other half), stores
it beside the weights (`service.calibration_store`) and prints NLL, ECE, ... before and after
the map. For classifiers it also stores the calibrated probabilities after every time step of
the examples held out from the map, which sessions' early-decision rules are fitted on
(`service.early_decision`), and prints the rule's coverage at the stopping time and the steps
it saves on the digits test split. The data:

- classifiers trained on digits-seq: the fixed calibration split (400 images, never trained on);
- language models: `LM_WINDOWS` windows of `LM_CONTEXT` characters from the held-out text,
  each labelled with the character that follows (next-token classification);
- `--data FILE.npz` (classifiers: `inputs` [N, T, F], `labels` [N], see `models.userdata`)
  or `--data FILE.txt` (language models) instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch-heavy; imported in the handlers so `neuroserve --help` stays fast
    from torch import Tensor

    from calibration import CalibrationArtifact
    from hardware_backends.base import Runner
    from models.repository import ModelCard, ModelRepository
    from service.early_decision import EarlyDecisionData

LM_CONTEXT = 64  # characters of context per next-token example
LM_WINDOWS = 2000  # next-token examples drawn from the held-out text
RUN_BATCH = 256  # sequences per backend call (bounds memory on sampling backends)
EARLY_REPORT_ALPHAS = (0.05, 0.1, 0.2)  # levels the early-decision report is printed at
EARLY_REPORT_SCORES = ("lac", "raps")  # LAC stops soonest; RAPS is the server's default
METRIC_ORDER = ("accuracy", "nll", "ece", "adaptive_ece", "mce", "brier")


class CalibrateError(ValueError):
    """A problem with what the user asked for; printed without a traceback."""


@dataclass(frozen=True)
class CalibrationData:
    name: str
    sha256: str
    inputs: Tensor  # [N, T, F] float32 features or [N, T] long tokens
    labels: Tensor  # [N] long


# ---- calibration data -----------------------------------------------------------------------


def next_token_windows(ids: Tensor, context: int, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """`count` seeded windows of `context` tokens [N, context] and the token after each [N]."""
    import numpy as np
    import torch

    positions = ids.shape[0] - context  # window starts 0 .. len - context - 1
    if positions < 1:
        raise CalibrateError(
            f"the held-out text has {ids.shape[0]} tokens; next-token calibration needs more "
            f"than the {context}-token context"
        )
    starts = np.sort(np.random.default_rng(seed).choice(positions, min(count, positions), False))
    offsets = torch.arange(context)  # [context]
    windows = ids[torch.from_numpy(starts)[:, None] + offsets]  # [N, context]
    return windows, ids[torch.from_numpy(starts) + context]  # [N]


def dataset_spec(card: ModelCard) -> str:
    """The training data spec a model records ("digits-seq:rows", "charcorpus", ...) or ""."""
    dataset = card.config.get("dataset")
    return str(dataset.get("spec", "")) if isinstance(dataset, dict) else ""


def _encode_text(text: str, vocabulary: list[str]) -> Tensor:
    import torch

    from models import charcorpus

    text = charcorpus.normalize_text(text)
    if tuple(vocabulary) == charcorpus.VOCABULARY:
        return charcorpus.encode(text)
    index = {token: i for i, token in enumerate(vocabulary)}
    unknown = sorted({char for char in text if char not in index})
    if unknown:
        raise CalibrateError(
            f"the text has characters outside the model's vocabulary: {unknown[:10]}"
        )
    return torch.tensor([index[char] for char in text], dtype=torch.long)


def _language_data(card: ModelCard, data: Path | None, seed: int) -> CalibrationData:
    from models.datasets import sha256_of_arrays
    from models.training import LanguageData, load_training_data

    vocabulary = card.config["vocabulary"]
    if data is not None:
        try:
            text = data.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CalibrateError(f"{data}: cannot read it as UTF-8 text ({error})") from None
        ids, name = _encode_text(text, vocabulary), f"text:{data.name}"
    else:
        spec = dataset_spec(card)
        loaded = (
            load_training_data(spec)
            if spec in ("charcorpus",) or spec.startswith("text:")
            else None
        )
        if not isinstance(loaded, LanguageData) or tuple(vocabulary) != loaded.corpus.vocabulary:
            raise CalibrateError(
                f"{card.name} has no held-out text of its own; pass --data FILE.txt"
            )
        ids, name = loaded.corpus.valid_ids, f"{loaded.corpus.name}/valid"
    inputs, labels = next_token_windows(ids, LM_CONTEXT, LM_WINDOWS, seed)
    return CalibrationData(
        name=f"{name} ({inputs.shape[0]} next-token windows of {LM_CONTEXT}, seed {seed})",
        sha256=sha256_of_arrays(inputs.numpy(), labels.numpy()),
        inputs=inputs,
        labels=labels,
    )


def _classifier_data(card: ModelCard, data: Path | None) -> CalibrationData:
    from models.training import ClassificationData, load_training_data
    from models.userdata import load_npz_dataset

    labels = card.config["labels"]
    if data is not None:
        dataset = load_npz_dataset(data)
        if dataset.n_features != int(card.config["input"]["features"]):
            raise CalibrateError(
                f"{data}: inputs have {dataset.n_features} features per step, "
                f"{card.name} expects {card.config['input']['features']}"
            )
        unnamed = dataset.label_names == [str(i) for i in range(dataset.n_classes)]
        if dataset.n_classes > len(labels) or not (unnamed or dataset.label_names == labels):
            raise CalibrateError(
                f"{data}: labels {dataset.label_names[:10]} do not match {card.name}'s {labels}"
            )
    else:
        spec = dataset_spec(card)
        loaded = load_training_data(spec) if spec.startswith("digits-seq") else None
        if not isinstance(loaded, ClassificationData) or "calibration" not in loaded.evaluation:
            raise CalibrateError(
                f"{card.name} was trained on {spec or 'data'} without a calibration split; "
                "pass --data FILE.npz with labelled examples it was not trained on"
            )
        dataset = loaded.evaluation["calibration"]
    return CalibrationData(dataset.name, dataset.sha256, dataset.inputs, dataset.labels)


def test_data(card: ModelCard) -> CalibrationData | None:
    """The test split of a digits classifier (early-decision report), or None."""
    from models.training import ClassificationData, load_training_data

    spec = dataset_spec(card)
    loaded = load_training_data(spec) if spec.startswith("digits-seq") else None
    if not isinstance(loaded, ClassificationData) or "test" not in loaded.evaluation:
        return None
    dataset = loaded.evaluation["test"]
    return CalibrationData(dataset.name, dataset.sha256, dataset.inputs, dataset.labels)


def calibration_data(card: ModelCard, data: Path | None, seed: int) -> CalibrationData:
    """The labelled examples to calibrate `card`'s model with (see the module docstring)."""
    if card.config["task"] == "language-model":
        return _language_data(card, data, seed)
    return _classifier_data(card, data)


# ---- running and fitting --------------------------------------------------------------------


def prepared_runner(
    repository: ModelRepository, card: ModelCard, backend: str, options: dict[str, Any]
) -> Runner:
    """The model on `backend`, prepared as the server prepares it (same cache key)."""
    from hardware_backends.base import BackendUnavailableError, UnknownBackendError
    from hardware_backends.registry import prepare_runner
    from service.dataplane import runner_key

    model = repository.load(card.name, card.version).model
    try:
        return prepare_runner(backend, model, model_key=runner_key(card), options=options)
    except (UnknownBackendError, BackendUnavailableError, ValueError) as error:
        raise CalibrateError(str(error)) from None


def backend_logits(runner: Runner, inputs: Tensor, batch_size: int = RUN_BATCH) -> Tensor:
    """The logits calibration works on [N, C] float64, as the dataplane computes them."""
    import torch

    from service.dataplane import calibration_inputs, run_last_step

    parts = []
    for start in range(0, inputs.shape[0], batch_size):
        last, _ = run_last_step(runner, inputs[start : start + batch_size])  # [n, C]/[S, n, C]
        parts.append(calibration_inputs(last)[0])  # [n, C]
    return torch.cat(parts)  # [N, C]


def backend_step_logits(runner: Runner, inputs: Tensor, batch_size: int = RUN_BATCH) -> Tensor:
    """Logits after every step [N, T, C] (or [S, N, T, C] from a sampling backend)."""
    import torch

    parts = [
        runner.run(inputs[i : i + batch_size])[0] for i in range(0, inputs.shape[0], batch_size)
    ]
    return torch.cat(parts, dim=-3)


def early_decision_report(
    rule_data: EarlyDecisionData, artifact: CalibrationArtifact, probs: Tensor, labels: Tensor
) -> list[dict[str, Any]]:
    """Coverage at the stopping time and steps saved on test streams, per reported level."""
    rows = []
    for score in EARLY_REPORT_SCORES:
        for alpha in EARLY_REPORT_ALPHAS:
            rule = rule_data.rule(artifact, alpha, score, max_set_size=1)
            report = rule.evaluate(probs, labels)
            rows.append(
                {"alpha": alpha, "score": score, "max_set_size": 1, "n": len(labels)}
                | dataclasses.asdict(report)
            )
    return rows


def fit_early_decisions(
    repository: ModelRepository,
    runner: Runner,
    artifact: CalibrationArtifact,
    data: CalibrationData,
    test: CalibrationData | None,
) -> tuple[list[dict[str, Any]], tuple[Path, Path]]:
    """Store the calibrated per-step probabilities of the examples held out from the map fit
    (every time step is a checkpoint) and measure the early-decision rule on `test`."""
    from service.calibration_store import CalibrationStore
    from service.early_decision import (
        EarlyDecisionData,
        EarlyDecisionStore,
        checkpoint_probabilities,
    )

    held = conformal_part(artifact, data.labels.shape[0])
    if not bool((data.labels[held] == artifact.labels).all()):
        raise CalibrateError("the early-decision streams do not match the calibration split")
    probs = checkpoint_probabilities(artifact, backend_step_logits(runner, data.inputs[held]))
    steps = tuple(range(1, probs.shape[1] + 1))
    rule_data = EarlyDecisionData(
        probs, artifact.labels, steps, artifact.created, artifact.data_hash, {}
    )
    report: list[dict[str, Any]] = []
    if test is not None:
        test_probs = checkpoint_probabilities(artifact, backend_step_logits(runner, test.inputs))
        report = early_decision_report(rule_data, artifact, test_probs, test.labels)
    store = EarlyDecisionStore(CalibrationStore(repository))
    paths = store.save(
        artifact,
        probs,
        artifact.labels,
        steps,
        {"test": test.name if test else None, "rows": report},
    )
    return report, paths


def format_early_decisions(report: list[dict[str, Any]], paths: tuple[Path, Path]) -> str:
    lines = ["early decisions (max_set_size 1, stop at the first small set):"]
    if not report:
        lines.append("  no test split to measure them on")
    for row in report:
        lines.append(
            f"  alpha={row['alpha']:g} {row['score']}: coverage at stopping "
            f"{row['coverage']:.4f} (>= {1 - row['alpha']:g} guaranteed), mean stop step "
            f"{row['mean_stop_step']:.2f}, steps saved {row['mean_steps_saved']:.2f} "
            f"({100 * row['fraction_steps_saved']:.1f}%) on {row['n']} test streams"
        )
    lines.append(f"wrote {paths[0]}\nwrote {paths[1]}")
    return "\n".join(lines)


def conformal_part(artifact: CalibrationArtifact, n: int) -> Tensor:
    """Indices of the examples behind the artifact's conformity scores (held out from the map
    fit), re-drawn as `fit_calibration_artifact` draws them (the caller checks the labels)."""
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(artifact.seed))
    return order[artifact.n_tune :]


def format_metrics(artifact: CalibrationArtifact) -> str:
    rows = [("metric", "before", "after")]
    for key in METRIC_ORDER:
        before, after = artifact.metrics[f"{key}_before"], artifact.metrics[f"{key}_after"]
        rows.append((key, f"{before:.4f}", f"{after:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def run_calibrate(args: argparse.Namespace) -> int:
    from calibration import fit_calibration_artifact
    from models.repository import (
        ArtifactError,
        ModelNotFoundError,
        ModelRepository,
        default_repository_root,
    )
    from models.training import current_command
    from service.calibration_store import CalibrationStore

    repository = ModelRepository(args.repository or default_repository_root())
    options = dict(args.backend_option or [])
    try:
        card = repository.card(args.model, args.version)
        data = calibration_data(card, args.data, args.seed)
        runner = prepared_runner(repository, card, args.backend, options)
        logits = backend_logits(runner, data.inputs)  # [N, C]
        artifact = fit_calibration_artifact(
            logits, data.labels, card.name, card.version, args.backend, seed=args.seed
        )
        source = {
            "data": data.name,
            "data_sha256": data.sha256,
            "n": int(data.labels.shape[0]),
            "command": getattr(args, "command_line", None) or current_command(),
        }
        json_path, tensor_path = CalibrationStore(repository).save(
            artifact, backend_options=options, source=source
        )
        early = None
        if card.config["task"] != "language-model":
            test = test_data(card) if args.data is None else None
            early = fit_early_decisions(repository, runner, artifact, data, test)
    except (CalibrateError, ModelNotFoundError, ArtifactError, ValueError) as error:
        print(f"neuroserve calibrate: {error}", file=sys.stderr)
        return 2
    print(
        f"calibrated {card.name} version {card.version} on {args.backend} "
        f"{options or ''}with {data.name}"
    )
    print(
        f"map: {artifact.calibration_map.to_dict()}  (fitted on {artifact.n_tune} examples; "
        f"metrics on the other {artifact.n}, held out from the map)"
    )
    print(f"raps: lam={artifact.raps_lam:g} k_reg={artifact.raps_k_reg}")
    print(format_metrics(artifact))
    print(f"wrote {json_path}\nwrote {tensor_path}")
    if early is not None:
        print(format_early_decisions(*early))
    if args.plot is not None:
        from calibration.plot import plot_reliability_diagram

        held = conformal_part(artifact, logits.shape[0])
        title = f"{card.name} v{card.version} on {args.backend}, calibrated"
        if not bool((data.labels[held] == artifact.labels).all()):
            held, title = slice(None), title + " (all calibration data)"
        probs = artifact.calibrate(logits[held])
        path = plot_reliability_diagram(probs, data.labels[held], args.plot, title=title)
        print(f"wrote {path}")
    return 0


def run_export_onnx(args: argparse.Namespace) -> int:
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


def _parse_option(text: str) -> tuple[str, Any]:
    """KEY=VALUE with a JSON value ("t_inference=3600" is a number, "noise=pcm" a string)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


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
        type=_parse_option,
        metavar="KEY=VALUE",
        help="backend option (repeatable), e.g. --backend-option t_inference=3600",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="labelled calibration data: FILE.npz (classifiers) or FILE.txt (language models)",
    )
    parser.add_argument("--plot", type=Path, help="write a reliability diagram PNG here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and windows")
    parser.set_defaults(func=run_calibrate)


def register_export_onnx(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-onnx",
        help="export a model's step to ONNX (state as named inputs and outputs)",
        description="Export one step of a model to an ONNX graph checked with onnx.checker.",
    )
    _add_common(parser)
    parser.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    parser.set_defaults(func=run_export_onnx)
