"""The `neuroserve` command line: argparse with one sub-command per task.

Each command module exposes `register(subparsers)`, which adds its sub-parser and sets
`func=<handler(args) -> exit code>` as the parser default; adding a command is one entry in
`command_registrars()`. Heavy imports (torch, uvicorn) happen inside the handlers, so
`neuroserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from service.cli import calibrate, importing, keys, models, worker
from service.cli.common import LOG_LEVELS, configure_logging, settings_from_flags

Registrar = Callable[[Any], None]  # takes the object add_subparsers() returned


def register_serve(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP and gRPC server",
        description=(
            "Serve the model repository over HTTP (native REST under /v1, Open Inference "
            "Protocol under /v2, OpenAPI docs at /docs) and the Open Inference Protocol over "
            "gRPC (its own port, 8001 by default). Options left out fall back to the "
            "NEUROSERVE_* environment variables, then to the defaults."
        ),
    )
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000)")
    parser.add_argument(
        "--grpc-port", type=int, help="TCP port of the V2 gRPC endpoint (default 8001)"
    )
    parser.add_argument(
        "--no-grpc",
        action="store_true",
        help="serve HTTP only (NEUROSERVE_GRPC_ENABLED=false)",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        help="model repository root (default: the built-in models/artifacts)",
    )
    parser.add_argument("--redis-url", help="Redis URL for session state (default: in-process)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default info)")
    parser.add_argument(
        "--workers",
        type=int,
        help="server processes (default 1); more than one needs --redis-url, about one per core",
    )
    parser.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    import uvicorn

    flags = {
        "host": args.host,
        "port": args.port,
        "grpc_port": args.grpc_port,
        "grpc_enabled": False if args.no_grpc else None,
        "model_repository": args.repository,
        "redis_url": args.redis_url,
        "log_level": args.log_level,
        "workers": args.workers,
    }
    settings = settings_from_flags("serve", **flags)
    if settings is None:
        return 2
    configure_logging(settings.log_level)
    if settings.workers == 1:
        # Imported here: the app pulls in torch and the models, which --help does not need.
        from service.app import create_app

        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
        )
        return 0
    # Worker processes build their own app from the environment: hand them the flags.
    given = {key: value for key, value in flags.items() if value is not None}
    os.environ.update({f"NEUROSERVE_{key.upper()}": str(value) for key, value in given.items()})
    _share_metrics_between_workers()
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        workers=settings.workers,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
    )
    return 0


def _share_metrics_between_workers() -> None:
    """Every worker writes its series to one folder that `/metrics` merges (see
    service.metrics); a fresh folder unless PROMETHEUS_MULTIPROC_DIR names one. Must run
    before service.metrics is first imported in this process."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="neuroserve-metrics-")
    # Imported only now: prometheus_client reads the folder when it is first imported.
    from service.metrics import clear_multiprocess_dir

    clear_multiprocess_dir()


def command_registrars() -> list[Registrar]:
    """Every sub-command, in the order `neuroserve --help` lists them."""
    return [
        register_serve,
        models.register,
        importing.register,
        calibrate.register_calibrate,
        calibrate.register_export_onnx,
        worker.register,
        keys.register,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuroserve",
        description="Uncertainty-aware inference server for stateful neuromorphic models.",
    )
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    subparsers.required = True
    for register in command_registrars():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
