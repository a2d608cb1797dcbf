"""`neuroserve train` and `neuroserve evaluate`: argparse sub-commands for the model workflow.

`register(subparsers)` adds both to the CLI's sub-parsers; each sets `func`, a callable that
takes the parsed namespace and returns the exit code. `python -m service.cli.models ...`
runs them without the main CLI.

    neuroserve train --builtin digits-lru                 # reproduce a built-in artifact
    neuroserve train --dataset npz:data.npz --architecture lru --name my-model \\
        --set d_model=32 --epochs 20
    neuroserve evaluate                                   # the built-in models' metrics table
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from service.cli.common import add_repository_flag, parse_key_value

if TYPE_CHECKING:  # torch-heavy; imported in the handlers so `neuroserve --help` stays fast
    from models.repository import ModelRepository
    from models.training import TrainingRecipe

_RECIPE_FLAGS = (
    "epochs",
    "steps",
    "batch_size",
    "seq_len",
    "lr",
    "weight_decay",
    "step_loss",
    "spike_penalty",
    "seed",
)


def _repository(args: argparse.Namespace) -> ModelRepository:
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    from models.repository import ModelRepository, default_repository_root

    return ModelRepository(args.repository or default_repository_root())


def _recipe_from_args(args: argparse.Namespace) -> tuple[str, TrainingRecipe]:
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    from models.builtin import BUILTIN_RECIPES
    from models.training import TrainingRecipe

    overrides = {
        flag: getattr(args, flag) for flag in _RECIPE_FLAGS if getattr(args, flag) is not None
    }
    settings = dict(args.set or [])
    if args.builtin:
        if args.dataset or args.architecture:
            raise ValueError("--builtin takes its dataset and architecture from the recipe")
        if args.builtin not in BUILTIN_RECIPES:
            raise ValueError(f"unknown built-in {args.builtin!r}; known: {sorted(BUILTIN_RECIPES)}")
        base = BUILTIN_RECIPES[args.builtin]
        model_config = {**base.model_config, **settings}
        recipe = replace(base, model_config=model_config, **overrides)
        return args.name or args.builtin, recipe
    missing = [
        f"--{flag}" for flag in ("dataset", "architecture", "name") if not getattr(args, flag)
    ]
    if missing:
        raise ValueError(f"without --builtin, train needs {' '.join(missing)}")
    recipe = TrainingRecipe(
        architecture=args.architecture, dataset=args.dataset, model_config=settings, **overrides
    )
    return args.name, recipe


def run_train(args: argparse.Namespace) -> int:
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    from models.repository import check_model_name
    from models.training import current_command, train_and_publish

    try:
        name, recipe = _recipe_from_args(args)
        check_model_name(name)
        # main(argv) records the argv it was given; under the real CLI sys.argv is the command.
        command = getattr(args, "command_line", None) or current_command()
        card = train_and_publish(
            recipe, _repository(args), name, command=command, progress=not args.quiet
        )
    except ValueError as error:
        print(f"neuroserve train: {error}", file=sys.stderr)
        return 2
    print(f"published {card.name} version {card.version} at {card.path}")
    print(json.dumps(card.config["metrics"], indent=2))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    from models.builtin import builtin_report, format_report

    report = builtin_report(_repository(args), sample_tokens=args.sample_tokens)
    print(format_report(report))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` and `evaluate` sub-commands."""
    train = subparsers.add_parser(
        "train",
        help="train a model and publish it to the repository",
        description="Train with backprop (AdamW) and publish a new version with provenance.",
    )
    source = train.add_argument_group("what to train")
    source.add_argument(
        "--builtin",
        help=(
            "a built-in recipe: digits-lru, digits-snn, digits-snn-lite, charlm-selective or "
            "charlm-moe"
        ),
    )
    source.add_argument(
        "--dataset",
        help="digits-seq:rows, digits-seq:pixels, charcorpus, npz:<path> or text:<path>",
    )
    source.add_argument("--architecture", help="an architecture name from models.architectures")
    source.add_argument("--name", help="model name to publish under (default: the built-in's)")
    source.add_argument(
        "--set",
        action="append",
        type=parse_key_value,
        metavar="KEY=VALUE",
        help="model-config override (repeatable), e.g. --set d_model=64",
    )
    knobs = train.add_argument_group("optimisation (default: the recipe's)")
    knobs.add_argument("--epochs", type=int, help="classification: passes over the train split")
    knobs.add_argument("--steps", type=int, help="language model: optimiser steps")
    knobs.add_argument("--batch-size", dest="batch_size", type=int)
    knobs.add_argument("--seq-len", dest="seq_len", type=int, help="language model window")
    knobs.add_argument("--lr", type=float)
    knobs.add_argument("--weight-decay", dest="weight_decay", type=float)
    knobs.add_argument(
        "--step-loss",
        dest="step_loss",
        help="classification: cross-entropy on the last step only (last) or on every step, "
        "step t weighted by 1, t or t^2 (uniform, linear, quadratic)",
    )
    knobs.add_argument(
        "--spike-penalty",
        dest="spike_penalty",
        type=float,
        help="spiking classifiers: add this times the spike rate to the loss (fewer spikes)",
    )
    knobs.add_argument("--seed", type=int)
    add_repository_flag(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="print the built-in models' held-out metrics",
        description="Evaluate the built-in models (digits-lru, digits-snn, digits-snn-lite, "
        "charlm-selective) on held-out data.",
    )
    add_repository_flag(evaluate)
    evaluate.add_argument(
        "--sample-tokens", type=int, default=200, help="length of the generated text samples"
    )
    evaluate.set_defaults(func=run_evaluate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neuroserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    if argv is not None:
        args.command_line = shlex.join(["neuroserve", *argv])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
