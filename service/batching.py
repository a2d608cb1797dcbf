"""Micro-batching of session steps: gather concurrent steps, run them as one batched step.

Two parts, both independent of the state store:

- `MicroBatcher` gathers work per group key (a prepared runner: model, version, backend,
  options). Each group has a queue and one worker task. The worker takes the first waiting
  item, keeps gathering until `window_seconds` have passed since it arrived or `max_batch`
  items are in hand, and hands the batch to `process(key, items)`. A group runs one batch at
  a time, so a runner is never driven from two threads at once (noisy backends keep
  generator state), and whatever arrives while a batch runs forms the next one.

- `run_chunks` is the batched model run. The sessions' states are stacked along the batch
  dimension and the chunks are grouped by length: each length is one `runner.run` over
  [n, T, F], so every row sees exactly its own inputs with no padding and no mask arithmetic,
  and the final state of a row is its state after its own last step. Chunks of different
  lengths in one batch therefore stay exact, at the cost of one runner call per distinct
  length (clients streaming one step at a time all land in one call).
  `run_chunks_one_by_one` is the slow reference: one `runner.run` per session.

Batched and one-by-one runs compute the same arithmetic on the same rows; they can differ
only where a BLAS kernel picks a different blocking for a different number of rows, which
changes float32 rounding (measured: bitwise equal for the LRU models, ≤ 3e-6 in the logits of
the spiking model; see tests/service/test_batching.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from hardware_backends.base import DERIVED_USAGE, Runner, State, Usage, runner_notes

logger = logging.getLogger("neuroserve.batching")

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

IDLE_WORKER_SECONDS = 30.0  # a group's worker exits after this long without work
# Work runs on the event loop when it is short: a model step and the answers after it are
# mostly Python holding the GIL, so a worker thread would only add a hand-off each way and
# contend for the GIL with the loop (measured with wrk: 4% more session steps per second at 64
# sessions, p99 unchanged). A batch of at most INLINE_MAX_STEPS time steps always does; a
# larger one when the same work's measured CPU time per step says it takes at most
# INLINE_BUDGET_SECONDS (64 session steps of digits-lru: ~2.7 ms). Longer work runs in a
# worker thread, so that the loop keeps reading requests meanwhile: at 8 ms, batches of 256
# in-process session steps ran inline and their p99 rose from ~100 to ~440 ms.
INLINE_MAX_STEPS = 8
INLINE_BUDGET_SECONDS = 0.004
READY_WORK_VISITS = 3  # loop iterations a batch waits for requests already read (see _work)
COSTS_KEPT = 1024  # kinds of work whose cost per step is remembered

T = TypeVar("T")


class ComputeCosts:
    """CPU seconds per time step of each kind of work (a runner and its batch shape), the
    latest measurement blended with the earlier ones."""

    def __init__(self) -> None:
        self._per_step: dict[Hashable, float] = {}

    def estimate(self, key: Hashable, steps: int) -> float | None:
        """Predicted seconds for `steps` time steps of `key`'s work; None before any run."""
        per_step = self._per_step.get(key)
        return None if per_step is None else per_step * steps

    def note(self, key: Hashable, seconds: float, steps: int) -> None:
        measured = seconds / max(steps, 1)
        earlier = self._per_step.get(key)
        if earlier is None and len(self._per_step) >= COSTS_KEPT:
            self._per_step.clear()
        self._per_step[key] = measured if earlier is None else 0.5 * (earlier + measured)


COMPUTE_COSTS = ComputeCosts()


async def run_compute(
    function: Callable[..., T], *args: Any, steps: int, cost_key: Hashable | None = None
) -> T:
    """`function(*args)` on the event loop when it is short (`steps` <= INLINE_MAX_STEPS time
    steps, or `cost_key`'s work measured at most INLINE_BUDGET_SECONDS for that many), else
    in a worker thread. With `cost_key`, the call's CPU time is measured for the next one."""
    estimate = None if cost_key is None else COMPUTE_COSTS.estimate(cost_key, steps)
    inline = steps <= INLINE_MAX_STEPS or (
        estimate is not None and estimate <= INLINE_BUDGET_SECONDS
    )
    if cost_key is None:
        return function(*args) if inline else await run_in_threadpool(function, *args)

    def timed() -> T:
        started = time.thread_time()  # this thread's CPU: waiting for the GIL is not cost
        try:
            return function(*args)
        finally:
            COMPUTE_COSTS.note(cost_key, time.thread_time() - started, steps)

    return timed() if inline else await run_in_threadpool(timed)


# ---- the batched model run ------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkResult:
    """One session's share of a batched run."""

    logits: Tensor  # [T, C], or [S, T, C] for sampling backends
    state: State  # this session's rows only
    usage: dict[str, Any]  # Usage.to_dict() of this row (see `run_chunks`) plus batch_size


def state_rows(state: State) -> int:
    """Rows a state occupies on the batch dimension (1, or S chains for sampling backends)."""
    sizes = {int(tensor.shape[0]) for tensor in state.values()}
    if len(sizes) != 1:
        raise ValueError(f"state tensors disagree on the batch dimension: {sorted(sizes)}")
    return sizes.pop()


def stack_states(states: Sequence[State]) -> State:
    """Concatenate per-session states along the batch dimension, in order."""
    names = list(states[0])
    for state in states[1:]:
        if set(state) != set(names):
            raise ValueError(f"states have different names: {sorted(names)} vs {sorted(state)}")
    return {name: torch.cat([state[name] for state in states]) for name in names}


def split_state(state: State, rows: int) -> list[State]:
    """The inverse of `stack_states` for sessions of `rows` rows each.

    The parts are views of `state` (no copies): a step's output is fresh, nothing writes to
    it in place, and each session's part is serialised straight after."""
    total = state_rows(state)
    if total % rows:
        raise ValueError(f"a state of {total} rows does not split into sessions of {rows}")
    return [
        {name: tensor[start : start + rows] for name, tensor in state.items()}
        for start in range(0, total, rows)
    ]


def usage_share(usage: Usage, rows: int, total_rows: int, batch_size: int) -> dict[str, Any]:
    """The share of `rows` in a run over `total_rows` equal-length rows.

    Dense work (routed experts' too: every token runs top_k of them) is the same for every
    row, so the share is exact; the ratios are the run's own; spike counts (and the
    energy they drive) are the mean over the rows, since runners report totals.
    """
    share = usage.to_dict()
    for name, value in share.items():
        if name in DERIVED_USAGE or value is None:
            continue
        part = value * rows / total_rows
        share[name] = round(part) if isinstance(value, int) else part
    share["batch_size"] = batch_size
    return share


def _split_logits(logits: Tensor, sessions: int) -> list[Tensor]:
    """[n, T, C] -> n x [T, C]; sampling backends' [S, n, T, C] -> n x [S, T, C] (views)."""
    if logits.dim() == 4:
        return list(logits.unbind(1))
    if logits.dim() == 3:
        return list(logits.unbind(0))
    raise ValueError(f"a runner returned logits of shape {list(logits.shape)}")


def run_chunks(
    runner: Runner, states: Sequence[State], chunks: Sequence[Tensor]
) -> list[ChunkResult]:
    """Advance every session by its chunk in as few runner calls as possible.

    `states[i]` is session i's state (its own rows), `chunks[i]` its inputs, float [T_i, F] or
    long [T_i]. Sessions are grouped by T_i; each group is one `runner.run` over the stacked
    states. Results come back in the order given.
    """
    if len(states) != len(chunks):
        raise ValueError(f"{len(states)} states for {len(chunks)} chunks")
    rows = state_rows(states[0]) if states else 1
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, chunk in enumerate(chunks):
        by_length[int(chunk.shape[0])].append(i)
    results: list[ChunkResult | None] = [None] * len(chunks)
    for positions in by_length.values():
        x = torch.stack([chunks[i] for i in positions])  # [n, T, F] or [n, T]
        stacked = stack_states([states[i] for i in positions])  # [n·rows, ...] per tensor
        if x.shape[1] == 1:  # one time step, the usual session step: skip the sequence path
            logits, new_state, usage = runner.step(x[:, 0], stacked)  # [n, C] or [S, n, C]
            logits = logits.unsqueeze(-2)  # [n, 1, C] or [S, n, 1, C]
        else:
            logits, new_state, usage = runner.run(x, stacked)  # [n, T, C] or [S, n, T, C]
        share = usage_share(usage, 1, len(positions), len(chunks)) | runner_notes(runner)
        pieces = zip(
            _split_logits(logits, len(positions)), split_state(new_state, rows), strict=True
        )
        for i, (session_logits, session_state) in zip(positions, pieces, strict=True):
            results[i] = ChunkResult(session_logits, session_state, dict(share))
    return [result for result in results if result is not None]


def run_chunks_one_by_one(
    runner: Runner, states: Sequence[State], chunks: Sequence[Tensor]
) -> list[ChunkResult]:
    """The reference path: one `runner.run` per session (batch size 1)."""
    return [
        run_chunks(runner, [state], [chunk])[0] for state, chunk in zip(states, chunks, strict=True)
    ]


# ---- gathering concurrent work --------------------------------------------------------------


@dataclass
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    future: asyncio.Future[ResultT]


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


@dataclass
class _Group(Generic[ItemT, ResultT]):
    queue: asyncio.Queue[_Pending[ItemT, ResultT]] = field(default_factory=asyncio.Queue)
    worker: asyncio.Task[None] | None = None
    idle: asyncio.Event = field(default_factory=_set_event)  # clear while a batch runs


BatchProcessor = Callable[[Hashable, list[ItemT]], Awaitable[list[ResultT | BaseException]]]


class MicroBatcher(Generic[ItemT, ResultT]):
    """Gather items submitted concurrently under the same key into batches.

    `process(key, items)` returns one result or exception per item, in order; each
    submitter gets its own. If `process` itself raises, every item of that batch gets the
    exception. An item whose submitter was cancelled before its batch started is dropped.

    Without a window, an item that finds its group idle (no batch running, none queued) runs
    at once as a batch of one, without the hand-off to the group's worker: a lone client pays
    nothing for batching. It runs in a task of its own, so it completes even if its
    submitter is cancelled, and whatever arrives meanwhile forms the next batch as usual.
    """

    def __init__(
        self,
        process: BatchProcessor[ItemT, ResultT],
        *,
        window_seconds: float,
        max_batch: int,
        idle_seconds: float = IDLE_WORKER_SECONDS,
    ) -> None:
        if not window_seconds >= 0:
            raise ValueError(f"window_seconds must be >= 0, got {window_seconds!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        self._process = process
        self.window_seconds = float(window_seconds)
        self.max_batch = max_batch
        self.idle_seconds = idle_seconds
        self._groups: dict[Hashable, _Group[ItemT, ResultT]] = {}
        self._closed = False

    async def submit(self, key: Hashable, item: ItemT) -> ResultT:
        """Queue `item` under `key` and wait for its result (or raise its exception)."""
        if self._closed:
            raise RuntimeError("the micro-batcher is closed")
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        # Alone only while no worker exists: a worker holding a taken item waits for `idle`,
        # and must not find another lone batch started in its place.
        if self.window_seconds == 0 and group.worker is None and group.idle.is_set():
            return await self._run_alone(key, group, item)
        loop = asyncio.get_running_loop()
        pending = _Pending(item, loop.create_future())
        group.queue.put_nowait(pending)
        if group.worker is None:
            group.worker = loop.create_task(self._work(key, group), name=f"batcher:{key!r}")
        return await pending.future

    async def close(self) -> None:
        """Stop the workers; items still queued get a RuntimeError."""
        self._closed = True
        groups, self._groups = list(self._groups.values()), {}
        for group in groups:
            if group.worker is not None:
                group.worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await group.worker
            while not group.queue.empty():
                pending = group.queue.get_nowait()
                if not pending.future.done():
                    pending.future.set_exception(RuntimeError("the server is shutting down"))

    async def _run_alone(
        self, key: Hashable, group: _Group[ItemT, ResultT], item: ItemT
    ) -> ResultT:
        group.idle.clear()
        task = asyncio.ensure_future(self._process(key, [item]))
        task.add_done_callback(lambda _: self._after_alone(key, group))
        results = await asyncio.shield(task)
        if len(results) != 1:
            raise RuntimeError(f"batch processor returned {len(results)} results for 1 item")
        (result,) = results
        if isinstance(result, BaseException):
            raise result
        return result

    def _after_alone(self, key: Hashable, group: _Group[ItemT, ResultT]) -> None:
        group.idle.set()
        if group.worker is None and group.queue.empty() and self._groups.get(key) is group:
            del self._groups[key]  # nothing waits and no worker serves it: forget the group

    async def _work(self, key: Hashable, group: _Group[ItemT, ResultT]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                first = await asyncio.wait_for(group.queue.get(), self.idle_seconds)
            except asyncio.TimeoutError:
                # No await between the emptiness check and the removal, so no submit can
                # slip an item into a queue that nobody serves.
                if group.queue.empty() and group.idle.is_set():
                    if self._groups.get(key) is group:
                        del self._groups[key]
                    return
                continue
            while not group.idle.is_set():  # a lone item may be running
                await group.idle.wait()
            # Let the loop run what is ready first: requests that arrived while the last batch
            # ran on the loop are then read and queued, and join this batch rather than
            # trailing it as a batch of their own (a passing visit for each of: the sockets'
            # callbacks, the request tasks, their hand-off here).
            for _ in range(READY_WORK_VISITS):
                await asyncio.sleep(0)
            group.idle.clear()
            batch = [first]
            deadline = loop.time() + self.window_seconds
            while len(batch) < self.max_batch:
                if not group.queue.empty():
                    batch.append(group.queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(group.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            try:
                await self._run(key, batch)
            finally:
                group.idle.set()

    async def _run(self, key: Hashable, batch: list[_Pending[ItemT, ResultT]]) -> None:
        live = [pending for pending in batch if not pending.future.done()]
        if not live:
            return
        try:
            results = await self._process(key, [pending.item for pending in live])
            if len(results) != len(live):
                raise RuntimeError(
                    f"batch processor returned {len(results)} results for {len(live)} items"
                )
        except asyncio.CancelledError:
            for pending in live:
                if not pending.future.done():
                    pending.future.set_exception(RuntimeError("the server is shutting down"))
            raise
        except Exception as error:  # one failed batch must not stop the group's worker
            results = [error] * len(live)
        for pending, result in zip(live, results, strict=True):
            if pending.future.done():
                continue  # the submitter gave up meanwhile; the work is done regardless
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)
