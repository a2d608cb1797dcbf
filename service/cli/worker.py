"""`neuroserve worker`: run fine-tuning jobs from the Redis queue (RQ).

Start as many workers as there are cores or machines to spare, all on the same Redis: each
takes one job at a time, runs it in a forked work-horse process and publishes the new
version into the model repository it shares with the servers. Without Redis there is
nothing to do here: the server then runs jobs itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service.cli.common import LOG_LEVELS, configure_logging, settings_from_flags


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run fine-tuning jobs from the Redis job queue",
        description=(
            "Take fine-tuning jobs from the Redis job queue and run them, one at a time, each "
            "in its own work-horse process; any number of workers may share one Redis. "
            "Options left out fall back to the NEUROSERVE_* environment variables."
        ),
    )
    parser.add_argument(
        "--redis-url",
        help="Redis URL of the job queue (default: NEUROSERVE_JOB_QUEUE_URL, then "
        "NEUROSERVE_REDIS_URL)",
    )
    parser.add_argument(
        "--queues",
        nargs="+",
        metavar="QUEUE",
        help="queues to take jobs from, in priority order; commas also separate "
        "(default: NEUROSERVE_JOB_QUEUE_NAME, neuroserve-finetune)",
    )
    parser.add_argument(
        "--burst", action="store_true", help="exit once the queues are empty instead of waiting"
    )
    parser.add_argument(
        "--repository", type=Path, help="model repository root the new versions go to"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="port of the worker's Prometheus /metrics (default 9100; 0 turns it off)",
    )
    parser.add_argument("--name", help="worker name in RQ (default: a random id)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default info)")
    parser.set_defaults(func=worker)


def worker(args: argparse.Namespace) -> int:
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    from redis import RedisError

    from service.jobs.worker import run_worker
    from service.metrics import WORKER_METRICS_PORT

    settings = settings_from_flags(
        "worker",
        job_queue_url=args.redis_url,
        model_repository=args.repository,
        log_level=args.log_level,
    )
    if settings is None:
        return 2
    if settings.job_queue_redis_url() is None:
        print(
            "neuroserve worker: no Redis to take jobs from: pass --redis-url or set "
            "NEUROSERVE_JOB_QUEUE_URL or NEUROSERVE_REDIS_URL (without Redis the server runs "
            "fine-tuning jobs itself)",
            file=sys.stderr,
        )
        return 2
    queues = [name for item in args.queues or [] for name in item.split(",") if name.strip()]
    metrics_port = WORKER_METRICS_PORT if args.metrics_port is None else args.metrics_port
    if not 0 <= metrics_port <= 65535:
        print(f"neuroserve worker: --metrics-port {metrics_port} is not a port", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        return run_worker(
            settings,
            queue_names=[q.strip() for q in queues] or [settings.job_queue_name],
            burst=args.burst,
            metrics_port=metrics_port,
            name=args.name,
        )
    except (ValueError, OSError, RedisError) as error:  # a bad URL, Redis down, port taken
        print(f"neuroserve worker: {error}", file=sys.stderr)
        return 1
