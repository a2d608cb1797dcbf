"""Which job queue a server uses: RQ on Redis when a URL is configured, else the local one.

`JobQueue` (`service.jobs.types`) is what the HTTP routes use; two implementations:

- `RedisJobQueue` (`service.jobs.redis_queue`): jobs go on an RQ queue in Redis and any
  number of `neuroserve worker` processes, on any machines, run them; every replica reads the
  same status. Chosen when a job queue URL (or the state store's Redis URL) is configured.
- `LocalJobQueue` (`service.jobs.local_queue`): the embedded default without Redis, one job
  at a time in a child process of the server.

Both hand the same JSON payload to `service.jobs.worker` and read back the same progress and
outcome dictionaries, so both produce the same `JobRecord`s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.jobs.local_queue import LocalJobQueue
from service.jobs.redis_queue import RedisJobQueue
from service.jobs.types import JobQueue


def open_job_queue(settings: Any) -> JobQueue:
    """The queue `settings` asks for: RQ on Redis when a URL is configured, else local."""
    url = settings.job_queue_redis_url()
    if url is None:
        return LocalJobQueue(
            Path(settings.model_repository),
            max_active=settings.max_active_jobs,
            retries=settings.job_retries,
            timeout_seconds=settings.job_timeout_seconds,
            record_ttl_seconds=settings.job_record_ttl_seconds,
        )
    return RedisJobQueue.from_settings(settings)
