"""One owner per fine-tuning job on the Redis queue: a fencing token.

A job declared lost (its heartbeat lapsed: `service.jobs.redis_queue.sweep_abandoned`) may
still be running somewhere: a frozen VM, a partitioned machine, a work-horse that the
scheduler starved for a few seconds. RQ then retries or fails it, and without a fence the
original run could still publish a second version, or overwrite the record that says failed.

The token is a counter in Redis, `<prefix>:finetune:fence:<id>`:
- every run takes a new token when it starts (INCR), which revokes any earlier run's;
- declaring the job lost increments it too, revoking the running one at once;
- the run checks that it still holds the token at every tuning step (with the cancel flag,
  `should_cancel`), its heartbeat refreshes the alive key only while it holds it, and just
  before publishing it *claims* publication: an atomic script checks the token and sets
  `<prefix>:finetune:published:<id>` only if no run has set it. So at most one run of a job
  ever publishes, whatever the timing.
A revoked run stops without writing anything (the work-horse exits quietly, so RQ keeps the
record that the sweep or the newer run wrote).
"""

from __future__ import annotations

from typing import Any

# KEYS: fence, published; ARGV: token, ttl seconds. 1: claimed; 0: revoked; -1: claimed before.
_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then return 1 end
return -1
"""
# KEYS: fence, alive; ARGV: token, ttl ms. Refresh the heartbeat only while holding the token.
_BEAT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
"""

# KEYS: alive; ARGV: token. Delete the alive key only if this run wrote it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class JobFencedError(Exception):
    """This run no longer owns its job (a newer run or a lost-job sweep took it over), or
    another run of the job already claimed publishing: it must not publish."""


def revoke(connection: Any, fence_key: str, ttl_seconds: int) -> None:
    """Revoke whatever run holds the job's token now (the job was declared lost)."""
    with connection.pipeline() as pipeline:
        pipeline.incr(fence_key)
        pipeline.expire(fence_key, ttl_seconds)
        pipeline.execute()


class JobFence:
    """The token of one run of one job."""

    def __init__(self, connection: Any, keys: dict[str, str], ttl_seconds: int) -> None:
        self.connection, self.keys, self.ttl_seconds = connection, keys, ttl_seconds
        self._claim = connection.register_script(_CLAIM)
        self._beat = connection.register_script(_BEAT)
        self._release = connection.register_script(_RELEASE)
        with connection.pipeline() as pipeline:
            pipeline.incr(keys["fence"])
            pipeline.expire(keys["fence"], ttl_seconds)
            self.token = str(pipeline.execute()[0])

    def holds(self, fence_value: bytes | None) -> bool:
        """Whether a read of the fence key is still this run's token."""
        return fence_value is not None and fence_value.decode() == self.token

    def owned(self) -> bool:
        return self.holds(self.connection.get(self.keys["fence"]))

    def beat(self, ttl_ms: int) -> bool:
        """Refresh the alive key if this run still owns the job."""
        return bool(
            self._beat(keys=[self.keys["fence"], self.keys["alive"]], args=[self.token, ttl_ms])
        )

    def release(self) -> None:
        """Drop the alive key if it is still this run's (never a newer run's)."""
        self._release(keys=[self.keys["alive"]], args=[self.token])

    def claim_publication(self) -> None:
        """Claim the job's one publication, or JobFencedError saying why not."""
        claimed = int(
            self._claim(
                keys=[self.keys["fence"], self.keys["published"]],
                args=[self.token, self.ttl_seconds],
            )
        )
        if claimed == 0:
            raise JobFencedError(
                "this run no longer owns the job (it was declared lost and taken over); "
                "it publishes nothing"
            )
        if claimed == -1:
            raise JobFencedError(
                "an earlier run of this job already claimed publishing (it may have published "
                "a version); this run publishes nothing, to never publish twice"
            )
