"""The session plane: create, step, answer, inspect and delete stateful sessions, for every
protocol (v1 REST, V2 sequences, websocket generation) alike.

A session is one sequence that a client feeds chunk by chunk. Its recurrent state lives in
the state store (in-process or Redis) under the session's key, stamped with the model,
version, backend and state-schema hash that wrote it, so any replica can continue it and a
model redeployed with another state shape is refused (409) instead of run on garbage.

Consistency:
- Every write is a compare-and-set on the store's version counter. A step that loses the
  race (another replica wrote first) reloads the fresh state and re-applies its chunk, with a
  jittered back-off, up to `retries` times; then 409.
- Within a replica, steps on one session run one at a time in arrival order (`FifoLocks`).
- A step starts from the state this replica last wrote for its session when it has it
  (`WrittenStates`), without reading it back; its compare-and-set fails if anyone wrote
  since, and the step runs again on the stored state.
- A step either commits completely (state, step count and TTL in one atomic write) or not at
  all. A step whose caller is cancelled before its batch starts never runs; once its batch
  has started it commits, and the caller just does not see the answer.
- Every step is answered before it is written: the batch's predictions (calibration of each
  row's own position, conformal sets, the session's online level) and early decisions are
  built in the batch's worker thread, and a step whose answer is refused (say, its
  calibration became unreadable) is not written. Committed answers are then published
  (metrics, feedback records) in one store round trip per batch. Routers only translate.

Steps for sessions that share a runner (model, version, backend, options) are micro-batched
(`service.batching`): their states are loaded with one `get_many`, run as one batched step in
a worker thread, and stored with one `cas_many`. With `batching=False` every step runs the
same code as a batch of one (the reference path).

Session ids are `secrets.token_urlsafe(24)` (192 random bits) unless the caller brings its
own (V2 sequence ids). Ids live in the caller's `owner` namespace: the store key is
`<owner>/<id>` (just `<id>` without an owner), so a session is reachable only with the owner
it was created with, and two owners' given ids never collide.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Hashable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from torch import Tensor

from calibration import SCORE_NAMES
from calibration.checks import check_alpha
from hardware_backends.noise_streams import seed_streams, stream_of
from models.repository import ModelNotFoundError
from service import metrics
from service.batching import MicroBatcher, run_compute
from service.dataplane.online_levels import OnlineLevel
from service.dataplane.plane import DataPlane
from service.dataplane.predictions import (
    ConformalOptions,
    PredictionBatch,
    default_score,
    model_labels,
)
from service.dataplane.publication import Publication, record_metrics
from service.errors import (
    BadInputError,
    ConflictError,
    NeuroserveError,
    NotFoundError,
    RateLimitedError,
    value_errors_as,
)
from service.sessions.answers import StepPredictions
from service.sessions.early_decision import EarlyDecisions, check_max_set_size, decide
from service.sessions.inputs import (
    check_chunk,
    check_id,
    check_options,
    lookup_key,
    parse_chunk,
    store_key,
)
from service.sessions.runners import SessionRunner, SessionRunners
from service.sessions.steps import (
    Answerer,
    SessionMeta,
    StepJob,
    advance,
    answer_batches,
    attach_answers,
    session_info,
)
from service.sessions.tracking import FifoLocks, LiveSessions
from service.sessions.types import SessionInfo, StepOutcome
from service.sessions.written import WrittenStates
from service.settings import Settings
from service.state.codec import (
    CorruptStateError,
    IncompatibleStateError,
    StateRecord,
    check_compatible,
)
from service.state.memory_store import InMemoryStateStore
from service.state.store import (
    DEFAULT_UPDATE_RETRIES,
    CasWrite,
    LoadOutcome,
    StaleVersionError,
    StateExistsError,
    StateNotFoundError,
    StateStore,
    VersionedState,
)

logger = logging.getLogger("neuroserve.sessions")

SCORES = SCORE_NAMES
GENERATED_ID_BYTES = 24  # token_urlsafe(24): 32 characters, 192 random bits
_META_CACHE_SIZE = 100_000


@dataclass(frozen=True)
class SessionSettings:
    ttl_seconds: float = 3600.0  # default time to live, refreshed on every use
    max_ttl_seconds: float = 7 * 24 * 3600.0
    max_sessions: int = 100_000  # live sessions this replica tracks
    max_steps_per_chunk: int = 4096
    batching: bool = True
    batch_window_seconds: float = 0.0  # continuous batching: no wait beyond the queue
    batch_max_size: int = 256
    written_cache_bytes: int = 64 << 20  # the states this replica last wrote (`written`)
    retries: int = DEFAULT_UPDATE_RETRIES
    # Concurrent store calls; below the Redis client's pool of 64, leaving room for others.
    store_concurrency: int = 32

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionSettings:
        return cls(
            ttl_seconds=settings.session_ttl_seconds,
            max_ttl_seconds=settings.session_max_ttl_seconds,
            max_sessions=settings.max_sessions,
            max_steps_per_chunk=settings.max_sequence_length,
            batching=settings.batching,
            batch_window_seconds=settings.batch_window_ms / 1000,
            batch_max_size=settings.batch_max_size,
            written_cache_bytes=int(settings.session_cache_mb * (1 << 20)),
        )


class _Retry(Exception):
    """Internal: run the step again (lost a compare-and-set, or the cached header is stale)."""

    def __init__(self, stale_meta: bool) -> None:
        super().__init__("retry")
        self.stale_meta = stale_meta


# ---- the manager ----------------------------------------------------------------------------


class SessionManager:
    """Sessions of one app (`app.state.sessions`), over one state store."""

    def __init__(
        self,
        store: StateStore,
        dataplane: DataPlane,
        settings: SessionSettings | None = None,
        answers: Answerer | None = None,
    ) -> None:
        self.store = store
        self.dataplane = dataplane
        self.settings = settings or SessionSettings()
        self._answers = answers or StepPredictions(dataplane)
        self.store_name = "memory" if isinstance(store, InMemoryStateStore) else "redis"
        self._locks = FifoLocks()
        self._live = LiveSessions()
        self._meta: OrderedDict[str, SessionMeta] = OrderedDict()
        self._written = WrittenStates(self.settings.written_cache_bytes)
        self._runners = SessionRunners(dataplane)
        self.early_decisions = EarlyDecisions()
        self._backoff = random.Random(0)  # jitter of the retry back-off
        self.conflicts = 0  # steps that lost a compare-and-set and were re-applied
        self._store_slots = asyncio.Semaphore(self.settings.store_concurrency)
        self._batcher: MicroBatcher[StepJob, StepOutcome] = MicroBatcher(
            self._process_batch,
            window_seconds=self.settings.batch_window_seconds,
            max_batch=self.settings.batch_max_size,
        )

    async def close(self) -> None:
        await self._batcher.close()

    # ---- public API ---------------------------------------------------------------------
    async def create(
        self,
        *,
        model: str,
        version: str | None = None,
        backend: str = "torch",
        alpha: float = 0.1,
        score: str | None = None,
        ttl_seconds: float | None = None,
        options: dict | None = None,
        owner: str | None = None,
        session_id: str | None = None,
        early_decision: Mapping[str, Any] | None = None,
        online: bool = False,
        never_empty: bool | None = None,
    ) -> SessionInfo:
        """Start a session at step 0. A given `session_id` that exists → ConflictError.

        `early_decision` ({"max_set_size": k}) asks for a stop/continue decision at every
        calibrated step; a backend whose calibration cannot give one → ConflictError.
        `online` answers at the session's own ACI level (labels of its predictions move it)."""
        with value_errors_as(BadInputError):
            check_alpha(alpha)
        if score is not None and score not in SCORES:
            raise BadInputError(f"score must be one of {list(SCORES)}, got {score!r}")
        # Refuse combinations no step could answer (online with never_empty) before creating.
        ConformalOptions(alpha=alpha, score=score, online=online, never_empty=never_empty)
        if online and self.dataplane.levels is None:
            raise BadInputError("online sets need label feedback, which this server does not keep")
        ttl = self._check_ttl(ttl_seconds)
        options = check_options(options)
        owner = check_id(owner, "owner") if owner is not None else None
        if session_id is None:
            session_id = secrets.token_urlsafe(GENERATED_ID_BYTES)
        else:
            session_id = check_id(session_id, "session_id")
        now = time.time()
        if self._live.count(now) >= self.settings.max_sessions:
            raise RateLimitedError(
                f"this server holds its limit of {self.settings.max_sessions} live sessions "
                "(NEUROSERVE_MAX_SESSIONS); delete sessions or wait for them to expire"
            )
        card = await run_in_threadpool(self.dataplane.card, model, version)
        score = score or default_score(card)
        group = await self._runners.get(card.name, card.version, backend, options)
        # Fail fast: steps of a session whose backend has no calibration (and a server that
        # does not allow raw answers) could never be answered.
        stored = await run_in_threadpool(self.dataplane.calibration, card, backend)
        metadata = {
            "alpha": float(alpha),
            "score": score,
            "options": options,
            "owner": owner,
            "ttl_seconds": ttl,
        }
        if online:
            metadata["online"] = True
        if never_empty is not None:
            metadata["never_empty"] = bool(never_empty)
        if early_decision is not None:
            size = check_max_set_size(early_decision.get("max_set_size"), len(model_labels(card)))
            await run_in_threadpool(  # build (and cache) the rule now: 409 when there is none
                self.early_decisions.rule,
                card,
                backend,
                stored,
                alpha=alpha,
                score=score,
                max_set_size=size,
                backend_options=options,
            )
            metadata["early_decision"] = {"max_set_size": size}
        key = store_key(session_id, owner)
        # A backend with per-sequence noise streams draws this session's noise from its own
        # stream, so its answers never depend on the sessions batched with its steps.
        initial = seed_streams(group.runner.init_state(1), [stream_of(key)])
        record = StateRecord.new(
            initial,
            model=card.name,
            version=card.version,
            backend=backend,
            metadata=metadata,
            now=now,
        )
        try:
            async with self._store_op("create", expected=(StateExistsError,)):
                version = await self.store.create(key, record, ttl)
        except StateExistsError:
            raise ConflictError(f"session {session_id!r} already exists") from None
        self._remember(key, SessionMeta.of(record))
        self._written.put(key, record, version)
        self._live.seen(key, card.name, now + ttl, card.version)
        return session_info(session_id, record, now + ttl)

    def live_sessions_on(self, model: str, version: str) -> int:
        """Live sessions of one model version that this replica served (deleting a version
        is refused while it has any)."""
        return self._live.on_version(model, version, time.time())

    async def get(self, session_id: str, *, owner: str | None = None) -> SessionInfo:
        """The session's info; counts as use (restarts its TTL). Unknown → NotFoundError."""
        key = lookup_key(session_id, owner)
        loaded = await self._load(key, session_id)
        meta = SessionMeta.of(loaded.record)
        async with self._store_op("touch"):
            touched = await self.store.touch(key, meta.ttl)
        if not touched:
            raise self._not_found(key, session_id)
        expires_at = time.time() + meta.ttl
        self._live.seen(key, meta.model, expires_at, meta.version)
        return session_info(session_id, loaded.record, expires_at)

    async def delete(self, session_id: str, *, owner: str | None = None) -> bool:
        """Remove the session. Unknown → NotFoundError."""
        key = lookup_key(session_id, owner)
        async with self._store_op("delete"):
            existed = await self.store.delete(key)
        self._forget(key)
        if not existed:
            raise NotFoundError(f"no session {session_id!r} (never created, deleted or expired)")
        return True

    async def step(
        self,
        session_id: str,
        inputs: Tensor | object,
        *,
        per_step: bool = False,
        owner: str | None = None,
        conformal: ConformalOptions | None = None,
    ) -> StepOutcome:
        """Advance the session by a chunk and answer it. The chunk is a tensor (float [T, F]
        features or long [T] token ids) or its JSON form ([[f, ...], ...], a string, token
        ids; `parse_chunk`), checked against the session's model (BadInputError).

        `StepOutcome.answer` holds the prediction after the chunk (and, with `per_step`,
        after every row), `StepOutcome.decision` the early decision when the session asked
        for one. `conformal` overrides the session's own options for this
        step's answer (V2 and generation requests may ask another alpha). A session that
        asked for online sets is answered at its own level.
        """
        key = lookup_key(session_id, owner)
        async with self._locks.hold(key):
            for attempt in range(self.settings.retries + 1):
                meta, preloaded = await self._session_meta(key, session_id)
                group = await self._session_group(meta, session_id)
                limit = self.settings.max_steps_per_chunk
                if not isinstance(inputs, Tensor):
                    inputs = parse_chunk(inputs, group.spec, limit)
                chunk = check_chunk(inputs, group.spec, limit)
                options = conformal or meta.conformal
                level = await self._online_level(options, meta, group, key)
                job = StepJob(
                    key, session_id, meta, group, chunk, per_step, options, preloaded, level
                )
                try:
                    if self.settings.batching:
                        return await self._batcher.submit(group.key, job)
                    (outcome,) = await self._process_batch(group.key, [job])
                    if isinstance(outcome, BaseException):
                        raise outcome
                    return outcome
                except _Retry as retry:
                    self._written.drop(key)  # run again on the stored state
                    if retry.stale_meta:
                        self._meta.pop(key, None)
                    else:
                        await asyncio.sleep(self._backoff_seconds(attempt))
        raise ConflictError(
            f"session {session_id!r} kept changing under concurrent writers: gave up after "
            f"{self.settings.retries + 1} attempts; retry the step"
        )

    def _early_decision(self, outcome: StepOutcome) -> dict[str, Any] | None:
        """The early decision after a step (see `service.sessions.early_decision`), or None when the
        session did not ask for one or its step is no checkpoint. Blocking: in the batch's
        worker thread."""
        info = outcome.info
        if info.early_decision is None:
            return None
        stored = self.dataplane.calibration(outcome.card, info.backend)
        if stored is None or not stored.fitted_with(info.options):
            return None  # recalibrated mid-session with other options: no guarantee to give
        rule = self.early_decisions.rule(
            outcome.card,
            info.backend,
            stored,
            alpha=info.alpha,
            score=info.score,
            max_set_size=int(info.early_decision["max_set_size"]),
            backend_options=info.options,
        )
        return decide(rule, stored, outcome.logits, info.step, model_labels(outcome.card))

    async def _online_level(
        self, conformal: ConformalOptions, meta: SessionMeta, group: SessionRunner, key: str
    ) -> OnlineLevel | None:
        """The session's own online level, when its answers are online sets."""
        if not conformal.online:
            return None
        # Any calibrated position names the level: a session has one level for all steps.
        levels = await self.dataplane.online_levels(
            group.card,
            meta.backend,
            [1],
            conformal,
            owner=meta.metadata.get("owner"),
            session_key=key,
        )
        return levels.get(0)

    # ---- one batch --------------------------------------------------------------------------
    async def _process_batch(
        self, group_key: Hashable, jobs: list[StepJob]
    ) -> list[StepOutcome | BaseException]:
        """Load, run and store the states of `jobs` (sessions of one group) together."""
        group = jobs[0].group  # every job of a batch has the same group key
        outcomes: list[StepOutcome | BaseException | None] = [None] * len(jobs)
        loaded = await self._load_batch(group, jobs, outcomes)
        if not loaded:
            return [outcome for outcome in outcomes if outcome is not None]
        runnable = [jobs[i] for i, _ in loaded]
        states = [state for _, state in loaded]
        steps = sum(int(job.inputs.shape[0]) for job in runnable)
        advanced = await run_compute(
            self._advance_and_answer, group, runnable, states, steps=steps, cost_key=group.key
        )
        metrics.record_batch(group.card.name, group.signature.backend, len(loaded))
        writes = [
            CasWrite(job.key, record, state.version, job.meta.ttl)
            for job, state, (record, outcome) in zip(runnable, states, advanced, strict=True)
            if not isinstance(outcome, BaseException)
        ]
        # Feedback records go out beside the compare-and-set, saving a round trip: a record
        # of a step that then loses the race has an id nobody was answered with, and expires.
        answered = [
            (job, outcome)
            for job, (_, outcome) in zip(runnable, advanced, strict=True)
            if isinstance(outcome, StepOutcome)
        ]
        remembering = asyncio.ensure_future(self._remember_answers(answered))
        try:
            async with self._store_op("cas_many"):
                written = iter(await self.store.cas_many(writes))
        finally:
            await remembering
        committed: list[PredictionBatch] = []
        for (i, _), (record, outcome) in zip(loaded, advanced, strict=True):
            job = jobs[i]
            if isinstance(outcome, BaseException):  # its answer was refused: nothing written
                outcomes[i] = outcome
                continue
            result = next(written)
            if isinstance(result, CorruptStateError):
                outcomes[i] = await self._state_error(job.key, job.session_id, result)
            elif isinstance(result, StaleVersionError):
                self.conflicts += 1
                outcomes[i] = _Retry(stale_meta=False)
            elif isinstance(result, StateNotFoundError):
                outcomes[i] = self._not_found(job.key, job.session_id)
            else:
                self._written.put(job.key, record, result)
                self._live.seen(job.key, record.model, outcome.info.expires_at, record.version)
                outcomes[i] = outcome
                committed += answer_batches(outcome)
        record_metrics(committed)  # committed answers only
        return [outcome for outcome in outcomes if outcome is not None]

    async def _remember_answers(self, answered: list[tuple[StepJob, StepOutcome]]) -> None:
        """The answers' feedback records, one store call per batch."""
        publications = [
            Publication(batch, job.session_id, job.owner)
            for job, outcome in answered
            for batch in answer_batches(outcome)
        ]
        async with self.store_slot():
            await self.dataplane.remember(publications)

    def _advance_and_answer(
        self, group: SessionRunner, jobs: list[StepJob], states: list[VersionedState]
    ) -> list[tuple[StateRecord, StepOutcome | BaseException]]:
        """Run the batch, then answer its steps and decide early where asked (worker thread)."""
        advanced = advance(group, jobs, states)
        attach_answers(self._answers, advanced)
        for i, (record, outcome) in enumerate(advanced):
            if isinstance(outcome, StepOutcome) and outcome.info.early_decision is not None:
                try:
                    decision = self._early_decision(outcome)
                except Exception as error:  # that step fails, unwritten
                    advanced[i] = (record, error)
                else:
                    outcome.decision = decision
        return advanced

    async def _load_batch(
        self,
        group: SessionRunner,
        jobs: list[StepJob],
        outcomes: list[StepOutcome | BaseException | None],
    ) -> list[tuple[int, VersionedState]]:
        """(job index, state) for the jobs that can run; failures go into `outcomes`."""
        to_load = [i for i, job in enumerate(jobs) if job.preloaded is None]
        fetched: dict[int, LoadOutcome] = {}
        if to_load:
            async with self._store_op("get_many"):
                found = await self.store.get_many([jobs[i].key for i in to_load])
            fetched = dict(zip(to_load, found, strict=True))
        loaded = []
        for i, job in enumerate(jobs):
            state = job.preloaded if job.preloaded is not None else fetched[i]
            try:
                if state is None:
                    raise self._not_found(job.key, job.session_id)
                if not isinstance(state, VersionedState):
                    raise state  # the decode error of this one session
                if not job.meta.matches(state.record):
                    raise _Retry(stale_meta=True)
                check_compatible(state.record, group.signature)
            except (CorruptStateError, IncompatibleStateError) as error:
                outcomes[i] = await self._state_error(job.key, job.session_id, error)
            except (NeuroserveError, _Retry) as error:
                outcomes[i] = error
            else:
                loaded.append((i, state))
        return loaded

    # ---- sessions' headers and groups -------------------------------------------------------
    async def _load(self, key: str, session_id: str) -> VersionedState:
        """The stored state (any schema) or NotFoundError / ConflictError."""
        try:
            async with self._store_op("get", expected=(CorruptStateError, IncompatibleStateError)):
                loaded = await self.store.get(key)
        except (CorruptStateError, IncompatibleStateError) as error:
            raise await self._state_error(key, session_id, error) from None
        if loaded is None:
            raise self._not_found(key, session_id)
        return loaded

    async def _session_meta(
        self, key: str, session_id: str
    ) -> tuple[SessionMeta, VersionedState | None]:
        """The session's header from the cache, with the state this replica last wrote when it
        has it; else both from the store."""
        meta = self._meta.get(key)
        if meta is not None:
            self._meta.move_to_end(key)
            return meta, self._written.get(key)
        loaded = await self._load(key, session_id)
        meta = SessionMeta.of(loaded.record)
        self._remember(key, meta)
        return meta, loaded

    async def _session_group(self, meta: SessionMeta, session_id: str) -> SessionRunner:
        try:
            return await self._runners.get(meta.model, meta.version, meta.backend, meta.options)
        except (NotFoundError, ModelNotFoundError):
            raise ConflictError(
                f"session {session_id!r} runs model {meta.model!r} version {meta.version!r}, "
                "which this server no longer serves; create a new session"
            ) from None

    # ---- helpers ----------------------------------------------------------------------------
    def _remember(self, key: str, meta: SessionMeta) -> None:
        self._meta[key] = meta
        self._meta.move_to_end(key)
        while len(self._meta) > _META_CACHE_SIZE:
            self._meta.popitem(last=False)

    def _forget(self, key: str) -> None:
        self._meta.pop(key, None)
        self._written.drop(key)
        self._live.gone(key)

    def _not_found(self, key: str, session_id: str) -> NotFoundError:
        self._forget(key)
        return NotFoundError(f"no session {session_id!r} (never created, deleted or expired)")

    async def _state_error(
        self, key: str, session_id: str, error: CorruptStateError | IncompatibleStateError
    ) -> ConflictError:
        if isinstance(error, CorruptStateError):
            # Damaged bytes can never be stepped again: drop them so the id can be reused.
            logger.error("session %r has corrupt state, deleting it: %s", session_id, error)
            async with self._store_op("delete"):
                await self.store.delete(key)
            self._forget(key)
            return ConflictError(
                f"session {session_id!r} had damaged stored state ({error}); it has been "
                "deleted: create a new session"
            )
        return ConflictError(
            f"session {session_id!r} cannot continue: {error}. The model was probably "
            "redeployed with another state shape; create a new session"
        )

    def _check_ttl(self, ttl_seconds: float | None) -> float:
        if ttl_seconds is None:
            return self.settings.ttl_seconds
        limit = self.settings.max_ttl_seconds
        if (
            isinstance(ttl_seconds, bool)
            or not isinstance(ttl_seconds, (int, float))
            or not math.isfinite(ttl_seconds)
            or not 0 < ttl_seconds <= limit
        ):
            raise BadInputError(f"ttl_seconds must be > 0 and <= {limit:g}, got {ttl_seconds!r}")
        return float(ttl_seconds)

    def _backoff_seconds(self, attempt: int) -> float:
        # Full jitter in [0, min(50 ms, 1 ms * 2**attempt)], as the store's own `update`.
        return self._backoff.uniform(0.0, min(0.05, 0.001 * 2**attempt))

    @asynccontextmanager
    async def store_slot(self) -> AsyncIterator[None]:
        """Hold one of the `store_concurrency` slots for store work done on behalf of a
        session request (such as recording its predictions for feedback): a burst of
        requests then queues here instead of exhausting the Redis client's connection pool,
        which fails the calls that find it empty."""
        async with self._store_slots:
            yield

    @asynccontextmanager
    async def _store_op(
        self, operation: str, expected: tuple[type[BaseException], ...] = ()
    ) -> AsyncIterator[None]:
        """A timed store call, in a store slot."""
        async with self.store_slot():
            with metrics.record_store_op(self.store_name, operation, expected=expected):
                yield
