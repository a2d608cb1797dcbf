"""Micro-batching: the gatherer, the batched run against its one-by-one reference, and the
session manager with batching on against batching off."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable

import pytest
import torch

from hardware_backends.registry import prepare_runner
from models.architectures import build_model
from models.repository import ModelRepository, default_repository_root
from service.batching import (
    COMPUTE_COSTS,
    INLINE_BUDGET_SECONDS,
    INLINE_MAX_STEPS,
    MicroBatcher,
    run_chunks,
    run_chunks_one_by_one,
    run_compute,
    split_state,
    stack_states,
    state_rows,
)
from service.dataplane.inputs import InputLimits
from service.dataplane.plane import DataPlane
from service.sessions.plane import SessionManager, SessionSettings
from service.state.memory_store import InMemoryStateStore

# ---- MicroBatcher ---------------------------------------------------------------------------


class RecordingProcessor:
    """A batch processor that doubles numbers and remembers every batch it was given."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[tuple[Hashable, list[int]]] = []
        self.delay = delay

    async def __call__(self, key: Hashable, items: list[int]) -> list[int | BaseException]:
        self.batches.append((key, list(items)))
        await asyncio.sleep(self.delay)
        return [ValueError(f"odd {i}") if i % 2 else 2 * i for i in items]


def test_concurrent_submits_are_gathered_into_one_batch() -> None:
    async def scenario() -> None:
        process = RecordingProcessor()
        batcher = MicroBatcher(process, window_seconds=0.05, max_batch=64)
        results = await asyncio.gather(*(batcher.submit("k", 2 * i) for i in range(20)))
        assert results == [4 * i for i in range(20)]
        assert [len(items) for _, items in process.batches] == [20]
        await batcher.close()

    asyncio.run(scenario())


def test_batches_respect_max_batch_and_keep_keys_apart() -> None:
    async def scenario() -> None:
        process = RecordingProcessor()
        batcher = MicroBatcher(process, window_seconds=0.05, max_batch=8)
        submits = [batcher.submit(key, 2 * i) for key in ("a", "b") for i in range(20)]
        await asyncio.gather(*submits)
        for key in ("a", "b"):
            sizes = [len(items) for k, items in process.batches if k == key]
            assert sizes == [8, 8, 4]
        await batcher.close()

    asyncio.run(scenario())


def test_work_arriving_during_a_batch_forms_the_next_one_without_a_window() -> None:
    async def scenario() -> None:
        process = RecordingProcessor(delay=0.05)
        batcher = MicroBatcher(process, window_seconds=0.0, max_batch=64)
        first = asyncio.ensure_future(batcher.submit("k", 0))
        await asyncio.sleep(0.01)  # the first batch (one item) is running now
        rest = await asyncio.gather(*(batcher.submit("k", 2 * i) for i in range(1, 11)))
        assert await first == 0 and rest == [4 * i for i in range(1, 11)]
        assert [len(items) for _, items in process.batches] == [1, 10]
        await batcher.close()

    asyncio.run(scenario())


def test_a_lone_item_runs_at_once_and_completes_even_if_its_caller_gives_up() -> None:
    async def scenario() -> None:
        process = RecordingProcessor(delay=0.05)
        batcher = MicroBatcher(process, window_seconds=0.0, max_batch=64)
        assert await batcher.submit("k", 4) == 8
        assert batcher._groups == {}  # no worker was needed, nothing left behind
        caller = asyncio.ensure_future(batcher.submit("k", 6))
        await asyncio.sleep(0.01)  # its batch of one is running
        caller.cancel()
        await asyncio.sleep(0.08)
        assert [items for _, items in process.batches] == [[4], [6]]  # it still ran to the end
        await batcher.close()

    asyncio.run(scenario())


def test_each_item_gets_its_own_result_or_error() -> None:
    async def scenario() -> None:
        batcher = MicroBatcher(RecordingProcessor(), window_seconds=0.02, max_batch=64)
        outcomes = await asyncio.gather(
            *(batcher.submit("k", i) for i in range(6)), return_exceptions=True
        )
        for i, outcome in enumerate(outcomes):
            if i % 2:
                assert isinstance(outcome, ValueError) and str(outcome) == f"odd {i}"
            else:
                assert outcome == 2 * i
        await batcher.close()

    asyncio.run(scenario())


def test_a_failing_processor_fails_its_batch_and_the_worker_goes_on() -> None:
    calls = 0

    async def process(key: Hashable, items: list[int]) -> list[int | BaseException]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("store down")
        return list(items)

    async def scenario() -> None:
        batcher = MicroBatcher(process, window_seconds=0.02, max_batch=64)
        failed = await asyncio.gather(
            *(batcher.submit("k", i) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(f, RuntimeError) and "store down" in str(f) for f in failed)
        assert await batcher.submit("k", 7) == 7
        await batcher.close()

    asyncio.run(scenario())


def test_an_item_cancelled_before_its_batch_starts_is_dropped() -> None:
    async def scenario() -> None:
        process = RecordingProcessor(delay=0.05)
        batcher = MicroBatcher(process, window_seconds=0.0, max_batch=64)
        running = asyncio.ensure_future(batcher.submit("k", 0))
        await asyncio.sleep(0.01)
        doomed = asyncio.ensure_future(batcher.submit("k", 2))
        kept = asyncio.ensure_future(batcher.submit("k", 4))
        await asyncio.sleep(0)
        doomed.cancel()
        assert await running == 0 and await kept == 8
        assert [items for _, items in process.batches] == [[0], [4]]
        await batcher.close()

    asyncio.run(scenario())


def test_idle_workers_exit_and_come_back_on_demand() -> None:
    async def scenario() -> None:
        batcher = MicroBatcher(
            RecordingProcessor(), window_seconds=0.0, max_batch=4, idle_seconds=0.02
        )
        assert await batcher.submit("k", 2) == 4
        await asyncio.sleep(0.1)
        assert batcher._groups == {}  # the idle worker has gone
        assert await batcher.submit("k", 4) == 8
        await batcher.close()

    asyncio.run(scenario())


def test_bad_batcher_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="window_seconds"):
        MicroBatcher(RecordingProcessor(), window_seconds=-1.0, max_batch=4)
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(RecordingProcessor(), window_seconds=0.0, max_batch=0)


# ---- the batched run ------------------------------------------------------------------------


def builtin_runner(name: str, backend: str = "torch", options: dict | None = None):
    loaded = ModelRepository(default_repository_root()).load(name)
    key = f"{name}/{loaded.card.version}"
    return prepare_runner(backend, loaded.model, model_key=key, options=options)


def selective_token_runner():
    torch.manual_seed(5)
    config = {"vocab_size": 29, "d_output": 29, "d_model": 16, "n_layers": 1, "d_state": 4}
    return prepare_runner("torch", build_model("selective", config), model_key="sel-test/1")


def random_sessions(runner, sessions: int, lengths: list[int], tokens: int = 0, seed: int = 0):
    """Per session: a state warmed up by a few random steps, and a chunk of the given length."""
    generator = torch.Generator().manual_seed(seed)
    states, chunks = [], []
    for i in range(sessions):
        length = lengths[i % len(lengths)]
        if tokens:
            warm = torch.randint(0, tokens, (1, 3), generator=generator)
            chunk = torch.randint(0, tokens, (length,), generator=generator)  # [T]
        else:
            warm = torch.rand(1, 3, 8, generator=generator) * 16
            chunk = torch.rand(length, 8, generator=generator) * 16  # [T, F]
        _, state, _ = runner.run(warm, runner.init_state(1))
        states.append(state)
        chunks.append(chunk)
    return states, chunks


# Batched and one-by-one runs do the same arithmetic on the same rows, but a BLAS kernel may
# block an [n, K] @ [K, D] product differently for n = 1 than for n = 12, which re-orders the
# float32 sums. That moves a result by a few units in the last place of its magnitude
# (measured: at most 4 ulps over these models and seeds), so agreement is asserted to 16 ulps
# of the largest reference value; a real mistake (a wrong row, state or step) is O(1).
ULPS = 16


def assert_agree(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = max(1.0, float(want.abs().max()))
    tolerance = ULPS * torch.finfo(torch.float32).eps * scale
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance)


CASES = [
    ("digits-lru", "torch", None),
    ("digits-snn", "torch", None),
    ("digits-lru", "stochastic", {"samples": 3}),
]


@pytest.mark.parametrize(("model", "backend", "options"), CASES)
def test_batched_run_matches_one_by_one_with_mixed_lengths(model, backend, options) -> None:
    runner = builtin_runner(model, backend, options)
    states, chunks = random_sessions(runner, 12, lengths=[1, 3, 1, 5, 2])
    batched = run_chunks(runner, states, chunks)
    reference = run_chunks_one_by_one(runner, states, chunks)
    for chunk, got, want in zip(chunks, batched, reference, strict=True):
        assert got.logits.shape == want.logits.shape
        assert got.logits.shape[-2] == chunk.shape[0]  # one row of logits per time step
        assert_agree(got.logits, want.logits)
        assert set(got.state) == set(want.state)
        for name in want.state:
            assert_agree(got.state[name], want.state[name])
        assert got.usage["batch_size"] == 12 and want.usage["batch_size"] == 1


def test_batched_run_matches_one_by_one_for_token_models() -> None:
    runner = selective_token_runner()
    states, chunks = random_sessions(runner, 9, lengths=[2, 1, 4], tokens=29)
    batched = run_chunks(runner, states, chunks)
    reference = run_chunks_one_by_one(runner, states, chunks)
    for got, want in zip(batched, reference, strict=True):
        assert_agree(got.logits, want.logits)


@pytest.mark.parametrize(("model", "backend", "options"), CASES[:2])
def test_one_step_chunks_through_the_step_path_match_the_sequence_path(
    model, backend, options
) -> None:
    runner = builtin_runner(model, backend, options)
    states, chunks = random_sessions(runner, 6, lengths=[1])
    fast = run_chunks(runner, states, chunks)  # T = 1: runner.step
    x = torch.stack(chunks)  # [n, 1, F]
    logits, new_state, usage = runner.run(x, stack_states(states))  # the sequence path
    for i, got in enumerate(fast):
        assert_agree(got.logits, logits[i])
        for name in new_state:
            assert_agree(got.state[name], new_state[name][i : i + 1])
        assert got.usage["macs"] * len(chunks) == usage.to_dict()["macs"]


def test_a_chunk_continues_exactly_where_the_state_left_off() -> None:
    # Advancing a session by chunks [3] then [2] equals running the 5 steps as one sequence.
    runner = builtin_runner("digits-lru")
    x = torch.rand(1, 5, 8, generator=torch.Generator().manual_seed(3)) * 16  # [1, T, F]
    full, _, _ = runner.run_by_steps(x, runner.init_state(1))  # [1, 5, C]
    (first,) = run_chunks(runner, [runner.init_state(1)], [x[0, :3]])
    (second,) = run_chunks(runner, [first.state], [x[0, 3:]])
    stitched = torch.cat([first.logits, second.logits])  # [5, C]
    assert_agree(stitched, full[0])


def test_dense_usage_is_shared_exactly_per_session() -> None:
    runner = builtin_runner("digits-lru")
    states, chunks = random_sessions(runner, 4, lengths=[2])
    batched = run_chunks(runner, states, chunks)
    (alone,) = run_chunks(runner, states[:1], chunks[:1])
    assert all(result.usage["macs"] == alone.usage["macs"] > 0 for result in batched)


def test_states_stack_and_split_back() -> None:
    runner = builtin_runner("digits-lru", "stochastic", {"samples": 3})
    states = [runner.init_state(1) for _ in range(4)]
    assert state_rows(states[0]) == 3
    stacked = stack_states(states)
    assert state_rows(stacked) == 12
    parts = split_state(stacked, 3)
    assert len(parts) == 4 and all(state_rows(part) == 3 for part in parts)
    with pytest.raises(ValueError, match="does not split"):
        split_state(stacked, 5)


# ---- batching on vs off in the session manager ----------------------------------------------


def test_batched_and_per_request_steps_give_the_same_outputs() -> None:
    """The same sessions stepped concurrently with batching on (window 20 ms, so batches of
    many sessions) and with batching off (one run per step) agree to float32 rounding of the
    batched matrix products (see ULPS)."""
    repository = ModelRepository(default_repository_root())
    dataplane = DataPlane(repository, InputLimits(64, 4096))
    generator = torch.Generator().manual_seed(11)
    sessions, chunks_per_session = 24, 3
    chunks = [
        [
            torch.rand(1 + (i + c) % 3, 8, generator=generator) * 16
            for c in range(chunks_per_session)
        ]
        for i in range(sessions)
    ]

    async def run(batching: bool) -> tuple[list[list[torch.Tensor]], list[int]]:
        settings = SessionSettings(batching=batching, batch_window_seconds=0.02)
        manager = SessionManager(InMemoryStateStore(), dataplane, settings)
        ids = [(await manager.create(model="digits-lru")).session_id for _ in range(sessions)]
        batch_sizes: list[int] = []

        async def feed(i: int) -> list[torch.Tensor]:
            outputs = []
            for chunk in chunks[i]:
                outcome = await manager.step(ids[i], chunk, per_step=True)
                batch_sizes.append(outcome.usage["batch_size"])
                outputs.append(outcome.step_logits)
            return outputs

        outputs = await asyncio.gather(*(feed(i) for i in range(sessions)))
        steps = [(await manager.get(session_id)).step for session_id in ids]
        expected_steps = [sum(int(c.shape[0]) for c in chunks[i]) for i in range(sessions)]
        assert steps == expected_steps
        await manager.close()
        return list(outputs), batch_sizes

    batched, sizes_on = asyncio.run(run(batching=True))
    single, sizes_off = asyncio.run(run(batching=False))
    assert max(sizes_on) > 1 and set(sizes_off) == {1}
    for got_session, want_session in zip(batched, single, strict=True):
        for got, want in zip(got_session, want_session, strict=True):
            assert_agree(got, want)


# ---- where batched work runs -------------------------------------------------------------------


def _where(spin_seconds: float = 0.0) -> bool:
    """Whether this runs on the event loop's (main) thread, after `spin_seconds` of CPU."""
    started = time.thread_time()
    while time.thread_time() - started < spin_seconds:
        pass
    return threading.current_thread() is threading.main_thread()


def test_short_work_runs_on_the_loop_and_long_work_in_a_thread() -> None:
    async def scenario() -> list[bool]:
        steps = INLINE_MAX_STEPS + 1
        cheap, costly = object(), object()  # two kinds of work, by their cost keys
        spent = INLINE_BUDGET_SECONDS * 2
        return [
            await run_compute(_where, steps=INLINE_MAX_STEPS),  # few steps: on the loop
            await run_compute(_where, steps=steps),  # more, cost unknown: a thread
            await run_compute(_where, steps=steps, cost_key=cheap),  # first run: a thread
            await run_compute(_where, steps=steps, cost_key=cheap),  # measured cheap: the loop
            await run_compute(_where, spent, steps=steps, cost_key=costly),  # a thread
            await run_compute(_where, spent, steps=steps, cost_key=costly),  # measured: a thread
        ]

    assert asyncio.run(scenario()) == [True, False, False, True, False, False]
    assert COMPUTE_COSTS.estimate(object(), 10) is None
