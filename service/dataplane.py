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
   mutual information between label and sample is reported as `epistemic` (nats).
3. calibration: the (model, version, backend) artifact (`service.calibration_store`) maps the
   logits to calibrated probabilities and builds the conformal set at the request's alpha,
   or at the online (ACI) level. A backend without an artifact is refused with 409 unless
   the server allows uncalibrated answers; those carry the raw softmax, `calibrated: false`
   and no set: a conformal set without calibration scores would have no guarantee at all.
4. `publish`: Prometheus series (predictions, set sizes, usage) and the prediction records
   that late labels (`POST /v1/feedback`) are matched against.

`build_predictions` (steps 3 and the read-out) and `publish` are shared with the session,
V2 and generation routes, which run their runners themselves.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from calibration import AdaptiveConformal
from hardware_backends.base import BackendUnavailableError as BackendCannotRunError
from hardware_backends.base import Runner, UnknownBackendError, Usage
from hardware_backends.registry import backend_statuses, freeze_options, prepare_runner
from models.repository import ModelCard, ModelNotFoundError, ModelRepository, check_model_name
from service.calibration_store import CalibrationFileError, CalibrationStore, StoredCalibration
from service.errors import (
    BackendUnavailableError,
    BadInputError,
    NotCalibratedError,
    NotFoundError,
)
from service.feedback import FeedbackLog, FeedbackResult, PredictionRecord
from service.inputs import InputLimits, encode_prompts, feature_tensor
from service.metrics import record_prediction, record_usage
from service.predictions import (
    DEFAULT_ALPHA,
    DEFAULT_SCORE,
    ClassPrediction,
    ConformalOptions,
    PredictionBatch,
    calibration_inputs,
    last_step_logits,
    model_labels,
    predictions_from_logits,
    predictions_from_probabilities,
    prompt_logits,
    run_last_step,
)
from service.state_store import StateStoreError

# Re-exported: the routers and session code import these from here.
__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_SCORE",
    "TORCH_BACKEND",
    "CalibrationPolicy",
    "ClassPrediction",
    "ConformalOptions",
    "DataPlane",
    "InputLimits",
    "PredictionBatch",
    "calibration_inputs",
    "encode_prompts",
    "feature_tensor",
    "last_step_logits",
    "predictions_from_logits",
    "prompt_logits",
    "run_last_step",
    "runner_key",
]

logger = logging.getLogger("neuroserve.dataplane")

TORCH_BACKEND = "torch"
DEFAULT_ABSTAIN_SET_SIZE = 1


@dataclass(frozen=True)
class CalibrationPolicy:
    """Server-wide calibration settings."""

    allow_uncalibrated: bool = False  # answer raw softmax (no sets) where no artifact exists
    abstain_set_size: int = DEFAULT_ABSTAIN_SET_SIZE  # abstain when a set holds more labels


def runner_key(card: ModelCard) -> str:
    """The registry's cache key for a model version: the weights hash is part of it, so two
    repositories that both hold a "name/1" never share a prepared runner."""
    return f"{card.name}/{card.version}@{card.config['weights_sha256'][:16]}"


def _same_options(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    return freeze_options(dict(a or {})) == freeze_options(dict(b or {}))


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
    ) -> None:
        self.repository = repository
        self.limits = limits
        self.policy = policy or CalibrationPolicy()
        self.calibrations = calibrations or CalibrationStore(repository)
        self.feedback = feedback  # None: predictions are not remembered, no online level
        self.ready = False  # set once the start-up preload has finished

    # ---- models -------------------------------------------------------------------------
    def card(self, name: str, version: str | None = None) -> ModelCard:
        """The model card, or NotFoundError naming the unknown model or version."""
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
        self.ready = True

    # ---- backends and calibration -------------------------------------------------------
    def runner(
        self,
        card: ModelCard,
        backend: str,
        backend_options: Mapping[str, Any] | None = None,
    ) -> Runner:
        """The model prepared on `backend` (cached per model version, backend and options)."""
        model = self.repository.load(card.name, card.version).model
        try:
            return prepare_runner(
                backend,
                model,
                model_key=runner_key(card),
                options=dict(backend_options or {}),
            )
        except UnknownBackendError as error:
            raise BadInputError(str(error)) from None
        except BackendCannotRunError as error:
            raise BackendUnavailableError(str(error)) from None
        except ValueError as error:  # the backend's option schema names the key
            raise BadInputError(str(error)) from None

    def calibration(self, card: ModelCard, backend: str) -> StoredCalibration | None:
        """The backend's calibration of this version; NotCalibratedError when there is none
        and the server does not allow uncalibrated answers."""
        stored = self.calibrations.get(card.name, card.version, backend)
        if stored is not None:
            if stored.artifact.num_classes != len(model_labels(card)):
                raise CalibrationFileError(
                    f"calibration of {card.name} version {card.version} on {backend} is for "
                    f"{stored.artifact.num_classes} classes, the model has "
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
        name: str,
        inputs: object,
        *,
        version: str | None = None,
        backend: str = TORCH_BACKEND,
        backend_options: Mapping[str, Any] | None = None,
        conformal: ConformalOptions | None = None,
        session_id: str | None = None,
        owner: str | None = None,
    ) -> PredictionBatch:
        """Predict on whole sequences and remember the predictions for feedback (as `owner`'s).

        Validation and the model run happen in a worker thread, so the event loop never
        waits on torch."""
        conformal = conformal or ConformalOptions()
        aci = None
        if conformal.online:
            card = await run_in_threadpool(self.card, name, version)
            version = card.version  # the ACI level read must match the version run
            aci = await self.online_level(card, backend, session_id)
        batch = await run_in_threadpool(
            self.predict_blocking,
            name,
            inputs,
            version=version,
            backend=backend,
            backend_options=backend_options,
            conformal=conformal,
            aci=aci,
        )
        await self.publish(batch, session_id=session_id, owner=owner)
        return batch

    def predict_blocking(
        self,
        name: str,
        inputs: object,
        *,
        version: str | None = None,
        backend: str = TORCH_BACKEND,
        backend_options: Mapping[str, Any] | None = None,
        conformal: ConformalOptions | None = None,
        aci: AdaptiveConformal | None = None,
    ) -> PredictionBatch:
        card = self.card(name, version)
        config = card.config
        if config["input"]["kind"] == "tokens":
            prompts = encode_prompts(inputs, config["vocabulary"], self.limits)
        else:
            x = feature_tensor(inputs, int(config["input"]["features"]), self.limits)  # [N, T, F]
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
            steps = sum(len(prompt) for prompt in prompts)
        else:
            logits = run(x)  # [N, C] or [S, N, C]
            steps = x.shape[0] * x.shape[1]
        usage = {
            "sequences": int(logits.shape[-2]),
            "steps": int(steps),
            "compute_seconds": time.perf_counter() - started,
            **total.to_dict(),
        }
        return self.build_predictions(
            card,
            backend,
            logits,
            usage,
            conformal=conformal,
            backend_options=backend_options,
            aci=aci,
        )

    def build_predictions(
        self,
        card: ModelCard,
        backend: str,
        last_logits: Tensor,
        usage: dict[str, Any] | None = None,
        *,
        conformal: ConformalOptions | None = None,
        backend_options: Mapping[str, Any] | None = None,
        aci: AdaptiveConformal | None = None,
    ) -> PredictionBatch:
        """The answer for last-step logits [N, C] (or [S, N, C] from a sampling backend).

        Calibrated when the backend has an artifact (else raw softmax if the policy allows,
        NotCalibratedError otherwise). `aci` is required when `conformal.online`: read it
        with `online_level` first. Pure computation, no I/O beyond the cached artifact.
        """
        conformal = conformal or ConformalOptions()
        labels = model_labels(card)
        logits, epistemic = calibration_inputs(last_logits)  # [N, C] float64, [N] or None
        if logits.shape[-1] != len(labels):
            raise ValueError(
                f"{card.name} produced {logits.shape[-1]} logits for {len(labels)} labels"
            )
        stored = self.calibration(card, backend)
        common = {"model": card.name, "version": card.version, "backend": backend}
        if stored is None:
            note = (
                f"backend {backend!r} of {card.name} version {card.version} is not calibrated: "
                "probabilities are the raw softmax and no prediction set is made"
            )
            probs = torch.softmax(logits, dim=-1)  # [N, C]
            return PredictionBatch(
                **common,
                calibrated=False,
                predictions=predictions_from_probabilities(probs, labels, epistemic=epistemic),
                usage=dict(usage or {}),
                warnings=[note],
            )
        artifact = stored.artifact
        seed = None
        generator = None
        if artifact.make_score(conformal.score).randomized:
            seed = conformal.seed if conformal.seed is not None else secrets.randbits(63)
            generator = torch.Generator().manual_seed(seed)
        if conformal.online:
            if aci is None:
                raise ValueError("online sets need the current ACI monitor (online_level)")
            probs, sets = artifact.predict_online(logits, aci, conformal.score, rng=generator)
            level = aci.alpha_t
        else:
            probs, sets = artifact.predict(
                logits,
                conformal.alpha,
                conformal.score,
                conformal.class_conditional,
                conformal.never_empty,
                generator,
            )
            level = conformal.alpha
        warnings = []
        if not _same_options(backend_options, stored.backend_options):
            warnings.append(
                f"the calibration of {backend!r} was fitted with backend options "
                f"{stored.backend_options}, this request used {dict(backend_options or {})}: "
                "the coverage guarantee holds only for the calibrated options"
            )
        limit = (
            conformal.max_set_size
            if conformal.max_set_size is not None
            else self.policy.abstain_set_size
        )
        return PredictionBatch(
            **common,
            calibrated=True,
            predictions=predictions_from_probabilities(
                probs, labels, sets=sets, abstain_above=limit, epistemic=epistemic
            ),
            usage=dict(usage or {}),
            conformal=conformal,
            alpha=level,
            seed=seed,
            warnings=warnings,
        )

    # ---- online level, metrics and feedback records -------------------------------------
    async def online_level(
        self, card: ModelCard, backend: str, session_id: str | None = None
    ) -> AdaptiveConformal:
        """The ACI monitor online sets are built with (the session's own when given)."""
        if self.feedback is None:
            raise BadInputError("online sets need label feedback, which this server does not keep")
        return await self.feedback.aci(card.name, card.version, backend, session_id)

    async def publish(
        self, batch: PredictionBatch, *, session_id: str | None = None, owner: str | None = None
    ) -> None:
        """Record the batch's metrics and remember its predictions for feedback (once per
        answered batch). A state store that is down costs the feedback, not the answer."""
        record_usage(batch.model, batch.backend, batch.usage)
        conformal = batch.conformal
        target = None
        if conformal is not None:
            target = batch.alpha if not conformal.online else self._aci_target()
            for p in batch.predictions:
                record_prediction(
                    batch.model,
                    batch.backend,
                    conformal.score,
                    p.set_size or 0,
                    min(max(p.confidence, 0.0), 1.0),
                    bool(p.abstain),
                    alpha=target,
                )
        if self.feedback is None:
            return
        records = [
            PredictionRecord(
                id=p.id,
                model=batch.model,
                version=batch.version,
                backend=batch.backend,
                top_index=p.index,
                confidence=p.confidence,
                probabilities=p.probabilities,
                set_indices=p.set_indices,
                score=None if conformal is None else conformal.score,
                alpha=batch.alpha,
                target_alpha=target,
                online=conformal is not None and conformal.online,
                session_id=session_id,
                owner=owner,
            )
            for p in batch.predictions
        ]
        try:
            await self.feedback.remember(records)
        except StateStoreError as error:
            logger.error("could not remember %d predictions for feedback: %s", len(records), error)

    def _aci_target(self) -> float | None:
        return None if self.feedback is None else self.feedback.aci_target_alpha

    async def submit_feedback(
        self, prediction_id: str, label: object, owner: str | None = None
    ) -> FeedbackResult:
        """Match a late label to `owner`'s prediction; another key's id is not found."""
        if self.feedback is None:
            raise NotFoundError("this server keeps no predictions for feedback")
        return await self.feedback.submit(prediction_id, label, owner)

    async def calibration_status(
        self, name: str, version: str | None, backend: str
    ) -> dict[str, Any]:
        """The artifact's fit metrics with the live, feedback-driven coverage and ACI level."""
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
            live = (await self.feedback.live(card.name, card.version, backend)).to_dict()
        return {
            "model": card.name,
            "version": card.version,
            "backend": backend,
            "fit": stored.summary(),
            "live": live,
        }
