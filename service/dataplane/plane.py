"""Protocol-independent serving logic: what a request means, whatever route it came in on.

The REST, V2, session and websocket routers are thin adapters over `DataPlane`: it lists
and describes models, validates inputs against a model's input spec, runs the model on the
requested hardware backend off the event loop, and turns the logits into calibrated
predictions with conformal prediction sets.

The path of one prediction:

1. backend: `DataPlane.runner` prepares (and caches) the model on the backend named by the
   request, through the registry in `hardware_backends` (torch, onnxruntime, analog_imc,
   stochastic, or any installed plugin). Unknown backend or bad `backend_options` -> 422,
   a registered backend that cannot run here -> 503.
2. logits: the last step of every sequence, [N, C]. Sampling backends return [S, N, C];
   calibration then works on the log of the predictive mean of the S softmaxes, and the
   part of the answer's entropy that the samples' disagreement accounts for is reported as
   `epistemic` (nats; each sample through the same calibration map as the answer, so
   0 <= epistemic <= entropy; the mutual information when the map is the identity).
3. calibration: the (model, version, backend) calibration
   (`service.dataplane.calibration_store`) has one calibration per position (steps read, or
   context length); each row's logits are mapped to calibrated probabilities and a conformal
   set at the request's alpha (or at the request's online level) by its own position's
   calibration (`service.dataplane.conformal_answer`).
   A row no calibration covers (past the horizon, other backend options) answers the raw
   softmax, `calibrated: false` and no set, with a warning. A backend without any
   calibration is refused with 409 unless the server allows uncalibrated answers.
4. `publish`: Prometheus series (predictions, set sizes, usage) and the prediction records
   that late labels (`POST /v1/feedback`) are matched against.

`build_predictions` (steps 3 and the read-out) and `publish` are shared with the session,
V2 and generation routes, which run their runners themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from hardware_backends.base import (
    BackendUnavailableError,
    Runner,
    UnknownBackendError,
    Usage,
    backend_defaults,
    runner_notes,
)
from hardware_backends.registry import backend_statuses, get_backend, prepare_runner
from models.repository import ModelCard, ModelNotFoundError, ModelRepository, check_model_name
from service.batching import run_compute
from service.dataplane.calibration_store import (
    CalibrationFileError,
    CalibrationStore,
    StoredCalibration,
)
from service.dataplane.conformal_answer import conformal_answer
from service.dataplane.conformal_draws import ConformalDraws
from service.dataplane.feedback import FeedbackLog, FeedbackResult
from service.dataplane.inference_stats import InferenceStatistics
from service.dataplane.inputs import (
    InputLimits,
    encode_prompts,
    feature_tensor,
    out_of_range_warning,
)
from service.dataplane.loop_memo import LoopPassMemo
from service.dataplane.online_levels import SESSION_SCOPE, LevelKey, OnlineLevel
from service.dataplane.predictions import (
    ConformalOptions,
    PredictionBatch,
    batch_warnings,
    calibration_inputs,
    epistemic_part,
    model_labels,
    new_prediction_ids,
    predictions_from_probabilities,
    prompt_logits,
    run_last_step,
)
from service.dataplane.publication import Publication, feedback_records, record_metrics
from service.dataplane.stateless_batches import FeatureBatches, FeatureJob, rough_steps
from service.errors import (
    BadInputError,
    ConflictError,
    NotCalibratedError,
    NotFoundError,
    ServiceUnavailableError,
)
from service.state.store import StateStoreError

logger = logging.getLogger("neuroserve.dataplane")

TORCH_BACKEND = "torch"
DEFAULT_ABSTAIN_SET_SIZE = 1


@dataclass(frozen=True)
class CalibrationPolicy:
    """Server-wide calibration settings."""

    allow_uncalibrated: bool = False  # answer raw softmax (no sets) where no artifact exists
    abstain_set_size: int = DEFAULT_ABSTAIN_SET_SIZE  # abstain when a set holds more labels


PLAIN_RUNNERS_KEPT = 256  # model versions x backends whose option-less runner is kept at hand


def runner_key(card: ModelCard) -> str:
    """The registry's cache key for a model version: the weights hash is part of it, so two
    repositories that both hold a "name/1" never share a prepared runner."""
    return f"{card.name}/{card.version}@{card.config['weights_sha256'][:16]}"


@dataclass(frozen=True)
class ModelRun:
    """A stateless run of whole sequences, before calibration."""

    card: ModelCard
    logits: Tensor  # [N, C] last-step logits, or [S, N, C] from a sampling backend
    positions: list[int]  # steps read (or prompt length) per row
    usage: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


# ---- the data plane -------------------------------------------------------------------------


class DataPlane:
    """Serving logic over one model repository; safe to call from many threads."""

    def __init__(
        self,
        repository: ModelRepository,
        limits: InputLimits,
        *,
        policy: CalibrationPolicy | None = None,
        calibrations: CalibrationStore | None = None,
        feedback: FeedbackLog | None = None,
        draws: ConformalDraws | None = None,
        stateless_batch_max: int = 64,
    ) -> None:
        self.repository = repository
        self.limits = limits
        self.policy = policy or CalibrationPolicy()
        self.calibrations = calibrations or CalibrationStore(repository)
        self.feedback = feedback  # None: predictions are not remembered, no online level
        self.levels = None if feedback is None else feedback.levels
        self.draws = draws or ConformalDraws()
        self.ready = False  # set once the start-up preload has finished
        self.statistics = InferenceStatistics()  # V2 inference counts and durations
        # Concurrent stateless requests for one runner and sequence length run as one
        # forward pass: continuous batching, as session steps (see `predict`).
        self._batches = FeatureBatches(
            self.build_predictions, self.publish_many, max_batch=stateless_batch_max
        )
        # (name, version, backend) -> (card, runner) for requests without backend options:
        # the registry's lookup (option freezing, locks) is per request otherwise.
        self._plain_runners: dict[tuple[str, str, str], tuple[ModelCard, Runner]] = {}
        self._cards: LoopPassMemo[ModelCard] = LoopPassMemo()

    async def close(self) -> None:
        await self._batches.close()

    # ---- models -------------------------------------------------------------------------
    def card(self, name: str, version: str | None = None) -> ModelCard:
        """The model card, or NotFoundError naming the unknown model or version. Looked up
        on disk once per pass of the event loop (`LoopPassMemo`), for all of its requests."""
        return self._cards.get((name, version), lambda: self._card_on_disk(name, version))

    def _card_on_disk(self, name: str, version: str | None) -> ModelCard:
        try:
            check_model_name(name)
        except ValueError as error:
            raise NotFoundError(f"no model named {name!r}: {error}") from None
        return self.repository.card(name, version)

    def list_models(self) -> list[ModelCard]:
        """Cards of the latest version of every model; broken artifacts are logged and skipped."""
        cards = []
        for name in self.repository.list_models():
            try:
                cards.append(self.repository.card(name))
            except (ModelNotFoundError, ValueError) as error:
                logger.warning("skipping model %r in the listing: %s", name, error)
        return cards

    def versions(self, name: str) -> list[str]:
        return self.repository.versions(check_model_name(name))

    def preload(self) -> None:
        """Load the latest version of every model so first requests do not pay for it."""
        for name in self.repository.list_models():
            try:
                loaded = self.repository.load(name)
                logger.info("loaded model %s version %s", name, loaded.card.version)
            except Exception as error:  # one broken artifact must not stop the server
                logger.error("could not load model %r: %s", name, error)
                continue
            try:  # compile what a fused step compiles on first use now, not on a request
                loaded.model.warm_up()
            except Exception as error:  # requests then meet the error with their own inputs
                logger.warning("could not warm up model %r: %s", name, error)
        self.ready = True

    # ---- backends and calibration -------------------------------------------------------
    def runner(
        self,
        card: ModelCard,
        backend: str,
        backend_options: Mapping[str, Any] | None = None,
    ) -> Runner:
        """The model prepared on `backend` (cached per model version, backend and options)."""
        plain_key = (card.name, card.version, backend)
        if not backend_options:
            known = self._plain_runners.get(plain_key)
            if known is not None and known[0] is card:  # the same files as when prepared
                return known[1]
        model = self.repository.load_resolved(card).model
        try:
            runner = prepare_runner(
                backend,
                model,
                model_key=runner_key(card),
                options=dict(backend_options or {}),
            )
        except UnknownBackendError as error:
            raise BadInputError(str(error)) from None
        except BackendUnavailableError as error:
            raise ServiceUnavailableError(str(error)) from None
        except ValueError as error:  # the backend's option schema names the key
            raise BadInputError(str(error)) from None
        if not backend_options:
            if len(self._plain_runners) >= PLAIN_RUNNERS_KEPT:
                self._plain_runners.clear()
            self._plain_runners[plain_key] = (card, runner)
        return runner

    def calibration(self, card: ModelCard, backend: str) -> StoredCalibration | None:
        """The backend's calibration of this version; NotCalibratedError when there is none
        and the server does not allow uncalibrated answers."""
        stored = self.calibrations.get(card.name, card.version, backend)
        if stored is not None:
            if stored.positional.num_classes != len(model_labels(card)):
                raise CalibrationFileError(
                    f"calibration of {card.name} version {card.version} on {backend} is for "
                    f"{stored.positional.num_classes} classes, the model has "
                    f"{len(model_labels(card))}; run `neuroserve calibrate` again"
                )
            return stored
        if self.policy.allow_uncalibrated:
            return None
        raise NotCalibratedError(
            f"model {card.name!r} version {card.version} is not calibrated on backend "
            f"{backend!r}; run `neuroserve calibrate {card.name} --version {card.version} "
            f"--backend {backend}` (or start the server with NEUROSERVE_ALLOW_UNCALIBRATED=true "
            "for raw softmax answers without prediction sets)"
        )

    def backend_infos(self, card: ModelCard) -> list[dict[str, Any]]:
        """Every registered backend: usable here?, calibrated for this version?, fit metrics."""
        infos = []
        for name, status in backend_statuses().items():
            info: dict[str, Any] = {
                "name": name,
                "available": status.reason is None,
                "reason": status.reason,
                "calibrated": False,
                "calibration": None,
                "defaults": backend_defaults(get_backend(name)) if status.reason is None else {},
            }
            try:
                stored = self.calibrations.get(card.name, card.version, name)
            except (CalibrationFileError, ValueError) as error:
                info["calibration_error"] = str(error)
                stored = None
            if stored is not None:
                info["calibrated"] = True
                info["calibration"] = stored.summary()
            infos.append(info)
        return infos

    # ---- predict ------------------------------------------------------------------------
    async def predict(
        self,
        card: ModelCard,
        inputs: object,
        *,
        backend: str = TORCH_BACKEND,
        backend_options: Mapping[str, Any] | None = None,
        conformal: ConformalOptions | None = None,
        owner: str | None = None,
    ) -> PredictionBatch:
        """Predict on whole sequences of the model version `card` (`DataPlane.card`, once per
        request) and remember the predictions for feedback (as `owner`'s).

        Feature sequences join the requests for the same runner and length that arrive
        meanwhile: one forward pass, then each request's answer with its own options
        (`FeatureBatches`). Token prompts run on their own. Work measured to be short runs
        on the event loop, longer work in worker threads (`service.batching.run_compute`)."""
        conformal = conformal or ConformalOptions()
        if card.config["input"]["kind"] == "tokens":
            return await self._predict_prompts(
                card, inputs, backend, backend_options, conformal, owner
            )
        job = await run_compute(
            self._feature_job,
            card,
            inputs,
            backend,
            backend_options,
            conformal,
            owner,
            steps=rough_steps(inputs),
        )
        if conformal.online:
            positions = [int(job.x.shape[1])] * int(job.x.shape[0])
            job.levels = await self.online_levels(card, backend, positions, conformal, owner=owner)
        answer = await self._batches.submit(job)
        return answer  # published with its batch

    def _feature_job(
        self,
        card: ModelCard,
        inputs: object,
        backend: str,
        backend_options: Mapping[str, Any] | None,
        conformal: ConformalOptions,
        owner: str | None,
    ) -> FeatureJob:
        """Validated inputs [N, T, F] with the runner to run them on. (An uncalibrated backend
        is refused when the batch is answered, with the same error a check here would give.)"""
        x = feature_tensor(inputs, int(card.config["input"]["features"]), self.limits)
        runner = self.runner(card, backend, backend_options)
        options = dict(backend_options or {})
        # Its warnings (inputs far outside the training range) come with its batch.
        return FeatureJob(card, backend, options, runner, x, conformal, owner, [])

    async def _predict_prompts(
        self,
        card: ModelCard,
        inputs: object,
        backend: str,
        backend_options: Mapping[str, Any] | None,
        conformal: ConformalOptions,
        owner: str | None,
    ) -> PredictionBatch:
        """Next-token answers for prompts of any lengths (one run per distinct length)."""
        run = await run_in_threadpool(
            self.run_model,
            card.name,
            inputs,
            version=card.version,
            backend=backend,
            backend_options=backend_options,
        )
        levels = None
        if conformal.online:
            levels = await self.online_levels(
                run.card, backend, run.positions, conformal, owner=owner
            )
        batch = await run_in_threadpool(
            self.build_predictions,
            run.card,
            backend,
            run.logits,
            run.usage,
            positions=run.positions,
            conformal=conformal,
            backend_options=backend_options,
            levels=levels,
            warnings=run.warnings,
        )
        await self.publish(batch, owner=owner)
        return batch

    def run_model(
        self,
        name: str,
        inputs: object,
        *,
        version: str | None = None,
        backend: str = TORCH_BACKEND,
        backend_options: Mapping[str, Any] | None = None,
    ) -> ModelRun:
        """Validate the inputs and run whole sequences: last-step logits and their positions."""
        card = self.card(name, version)
        config = card.config
        warnings = []
        if config["input"]["kind"] == "tokens":
            prompts = encode_prompts(inputs, config["vocabulary"], self.limits)
        else:
            x = feature_tensor(inputs, int(config["input"]["features"]), self.limits)  # [N, T, F]
            note = out_of_range_warning(x, config["input"].get("value_range"))
            warnings += [note] if note else []
        runner = self.runner(card, backend, backend_options)
        self.calibration(card, backend)  # refuse an uncalibrated backend before running
        total = Usage()

        def run(tokens_or_features: Tensor) -> Tensor:
            nonlocal total
            logits, usage = run_last_step(runner, tokens_or_features)  # [n, C] / [S, n, C]
            total = total + usage
            return logits

        started = time.perf_counter()
        if config["input"]["kind"] == "tokens":
            logits = prompt_logits(run, prompts)  # [N, V] or [S, N, V]
            positions = [len(prompt) for prompt in prompts]
        else:
            logits = run(x)  # [N, C] or [S, N, C]
            positions = [x.shape[1]] * x.shape[0]
        usage = {
            "sequences": int(logits.shape[-2]),
            "steps": int(sum(positions)),
            "compute_seconds": time.perf_counter() - started,
            **total.to_dict(),
            **runner_notes(runner),
        }
        return ModelRun(card, logits, positions, usage, warnings)

    def build_predictions(
        self,
        card: ModelCard,
        backend: str,
        last_logits: Tensor,
        usage: dict[str, Any] | None = None,
        *,
        positions: int | Sequence[int],
        conformal: ConformalOptions | None = None,
        backend_options: Mapping[str, Any] | None = None,
        levels: Mapping[int, OnlineLevel] | None = None,
        warnings: Sequence[str] = (),
    ) -> PredictionBatch:
        """The answer for last-step logits [N, C] (or [S, N, C] from a sampling backend)
        whose rows sit at `positions` (steps read, or context length; one for all rows or
        one per row).

        Each row is calibrated with its own position's calibration, or says it is not
        (`service.dataplane.conformal_answer`); a backend without any calibration raises
        NotCalibratedError unless the policy allows raw answers. Online requests need
        `levels` from `online_levels`. Pure computation, no I/O beyond the cached artifact.
        """
        conformal = (conformal or ConformalOptions()).for_model(card)
        labels = model_labels(card)
        logits, samples = calibration_inputs(last_logits)  # [N, C], [S, N, C] or None
        if logits.shape[-1] != len(labels):
            raise ValueError(
                f"{card.name} produced {logits.shape[-1]} logits for {len(labels)} labels"
            )
        n = logits.shape[0]
        positions = [positions] * n if isinstance(positions, int) else list(positions)
        if len(positions) != n:
            raise ValueError(f"{n} rows of logits need {n} positions, got {len(positions)}")
        stored = self.calibration(card, backend)
        common = {"model": card.name, "version": card.version, "backend": backend}
        ids = new_prediction_ids(n)
        if stored is None:
            note = (
                f"backend {backend!r} of {card.name} version {card.version} is not calibrated: "
                "probabilities are the raw softmax and no prediction set is made (run "
                f"`neuroserve calibrate {card.name} --version {card.version} --backend {backend}`)"
            )
            raw = torch.softmax(logits, dim=-1)  # [N, C]
            predictions = predictions_from_probabilities(
                raw,
                labels,
                epistemic=None if samples is None else epistemic_part(raw, samples, [None] * n),
                ids=ids,
                positions=positions,
                notes=[note] * n,
            )
            return PredictionBatch(
                **common,
                calibrated=False,
                predictions=predictions,
                usage=dict(usage or {}),
                warnings=batch_warnings(warnings, predictions),
            )
        if levels and any(lv.key.calibration_id != stored.calibration_id for lv in levels.values()):
            raise ConflictError(
                f"the calibration of {card.name} version {card.version} on {backend} was "
                "replaced while this request was answered; send it again"
            )
        answer = conformal_answer(
            stored,
            logits,
            positions,
            conformal,
            ids=ids,
            draws=self.draws,
            backend_options=backend_options,
            levels=None if levels is None else {row: lv.level for row, lv in levels.items()},
        )
        limit = (
            conformal.max_set_size
            if conformal.max_set_size is not None
            else self.policy.abstain_set_size
        )
        epistemic = None if samples is None else epistemic_part(answer.probs, samples, answer.maps)
        predictions = predictions_from_probabilities(
            answer.probs,
            labels,
            sets=answer.sets,
            abstain_above=limit,
            epistemic=epistemic,
            ids=ids,
            calibrated=answer.calibrated,
            positions=positions,
            uniforms=answer.uniforms,
            aci_alphas=answer.aci_alphas,
            has_set=answer.calibrated,
            notes=answer.notes,
        )
        served_online = {} if levels is None else levels
        return PredictionBatch(
            **common,
            calibrated=all(answer.calibrated),
            predictions=predictions,
            usage=dict(usage or {}),
            conformal=conformal,
            alpha=conformal.alpha,
            calibration_id=stored.calibration_id,
            level_keys={row: lv.key for row, lv in served_online.items() if answer.calibrated[row]},
            warnings=batch_warnings(warnings, predictions),
        )

    # ---- online levels, metrics and feedback records ------------------------------------
    async def online_levels(
        self,
        card: ModelCard,
        backend: str,
        positions: Sequence[int],
        conformal: ConformalOptions,
        *,
        owner: str | None = None,
        session_key: str | None = None,
    ) -> dict[int, OnlineLevel]:
        """The online level each calibrated row is served at: the key's level for the row's
        position bucket, or the session's own level (`session_key`)."""
        if self.levels is None:
            raise BadInputError("online sets need label feedback, which this server does not keep")
        conformal = conformal.for_model(card)
        stored = await run_in_threadpool(self.calibration, card, backend)
        if stored is None:
            return {}
        buckets = stored.positional.buckets
        keys: dict[int, LevelKey] = {}
        for row, position in enumerate(positions):
            bucket = buckets.index(position)
            if bucket is None:
                continue  # past the horizon: answered uncalibrated, no level
            keys[row] = LevelKey(
                model=card.name,
                version=card.version,
                backend=backend,
                calibration_id=stored.calibration_id,
                score=conformal.score,
                alpha=float(conformal.alpha),
                scope=SESSION_SCOPE if session_key is not None else buckets.describe(bucket),
                owner=owner,
                session_key=session_key,
            )
        distinct = list(dict.fromkeys(keys.values()))
        read = await asyncio.gather(*(self.levels.read(key) for key in distinct))
        level_of = dict(zip(distinct, read, strict=True))
        return {row: OnlineLevel(key, level_of[key]) for row, key in keys.items()}

    async def publish(
        self, batch: PredictionBatch, *, session_id: str | None = None, owner: str | None = None
    ) -> None:
        """Record the batch's metrics and remember its predictions for feedback (once per
        answered batch). A state store that is down costs the feedback, not the answer."""
        await self.publish_many([Publication(batch, session_id, owner)])

    async def publish_many(self, publications: Sequence[Publication]) -> None:
        """`publish` for the answers of a whole micro-batch: one store round trip."""
        record_metrics([publication.batch for publication in publications])
        await self.remember(publications)

    async def remember(self, publications: Sequence[Publication]) -> None:
        """Keep the predictions for feedback, in one store round trip. A state store that is
        down costs the feedback, not the answer (logged)."""
        if self.feedback is None:
            return
        records = [
            record
            for batch, session_id, owner in publications
            for record in feedback_records(batch, session_id, owner)
        ]
        if not records:
            return
        try:
            await self.feedback.remember(records)
        except StateStoreError as error:
            logger.error("could not remember %d predictions for feedback: %s", len(records), error)

    async def submit_feedback(
        self, prediction_id: str, label: object, owner: str | None = None
    ) -> FeedbackResult:
        """Match a late label to `owner`'s prediction; another key's id is not found."""
        if self.feedback is None:
            raise NotFoundError("this server keeps no predictions for feedback")
        return await self.feedback.submit(prediction_id, label, owner)

    async def calibration_status(
        self, name: str, version: str | None, backend: str, owner: str | None = None
    ) -> dict[str, Any]:
        """The calibration's fit with the live, feedback-driven coverage and `owner`'s online
        levels."""
        card = await run_in_threadpool(self.card, name, version)
        known = backend_statuses()
        if backend not in known:
            raise BadInputError(
                f"unknown backend {backend!r}; registered backends: {', '.join(known)}"
            )
        stored = await run_in_threadpool(self.calibrations.get, card.name, card.version, backend)
        if stored is None:
            raise NotCalibratedError(
                f"model {card.name!r} version {card.version} is not calibrated on backend "
                f"{backend!r}; run `neuroserve calibrate {card.name} --version {card.version} "
                f"--backend {backend}`"
            )
        live = None
        if self.feedback is not None:
            live = await self.feedback.live(
                card.name, card.version, backend, stored.calibration_id, owner
            )
        return {
            "model": card.name,
            "version": card.version,
            "backend": backend,
            "fit": stored.summary(),
            "live": live,
        }
