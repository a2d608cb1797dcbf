"""What the `neuroserve` commands share: KEY=VALUE arguments, settings from flags, logging.

Like every command module, this one imports nothing heavy at the top: `neuroserve --help`
must start fast, so torch, uvicorn and the server's modules are imported in the handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch-heavy; imported where it is used so `neuroserve --help` stays fast
    from service.settings import Settings

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_repository_flag(parser: argparse.ArgumentParser) -> None:
    """`--repository`: the model repository a command reads and publishes to."""
    parser.add_argument(
        "--repository",
        type=Path,
        help="model repository root (default: the built-in models/artifacts)",
    )


def parse_key_value(text: str) -> tuple[str, Any]:
    """An argparse `type` for KEY=VALUE with a JSON value: "d_model=64" and
    "t_inference=3600" are numbers, "norm=rmsnorm" stays a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def settings_from_flags(command: str, **flags: Any) -> Settings | None:
    """The server's settings: the flags given on the command line (None: not given) over the
    NEUROSERVE_* environment variables over the defaults. Invalid settings are printed as
    `neuroserve <command>: invalid settings: ...` on stderr and give None (exit code 2)."""
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    from pydantic import ValidationError

    from service.errors import describe_validation_errors
    from service.settings import Settings

    try:
        return Settings(**{key: value for key, value in flags.items() if value is not None})
    except ValidationError as error:
        problems = describe_validation_errors(error.errors())
        print(f"neuroserve {command}: invalid settings: {problems}", file=sys.stderr)
        return None


def configure_logging(level: str) -> None:
    """Log lines with time, level and logger name at `level` and above."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
