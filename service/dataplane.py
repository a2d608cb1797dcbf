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
import math
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from calibration import SCORE_NAMES, AdaptiveConformal
from hardware_backends.base import BackendUnavailableError as BackendCannotRunError
from hardware_backends.base import Runner, UnknownBackendError, Usage
from hardware_backends.registry import backend_statuses, freeze_options, prepare_runner
from models.base import StatefulModel
from models.repository import ModelCard, ModelNotFoundError, ModelRepository, check_model_name
from service.calibration_store import CalibrationFileError, CalibrationStore, StoredCalibration
from service.errors import (
    BackendUnavailableError,
    BadInputError,
    NotCalibratedError,
    NotFoundError,
    describe_validation_errors,
)
from service.feedback import FeedbackLog, FeedbackResult, PredictionRecord
from service.metrics import record_prediction, record_usage
from service.state_store import StateStoreError

logger = logging.getLogger("neuroserve.dataplane")

TORCH_BACKEND = "torch"
DEFAULT_ALPHA = 0.1
# Deterministic APS puts 3-5 labels in the sets of confident models and randomised scores
# make a set depend on a coin; RAPS covers on target with single-label sets on the digits
# models (docs/BENCHMARKS.md) and answers the same input with the same set.
DEFAULT_SCORE = "raps"
DEFAULT_ABSTAIN_SET_SIZE = 1
_MAX_SEED = 2**63 - 1

_FiniteNumber = Annotated[float, Field(allow_inf_nan=False)]
# Strict: a JSON number is a feature, while true/false and "1.5" are type errors.
_FEATURE_SEQUENCES = TypeAdapter(list[list[list[_FiniteNumber]]])
_PROMPTS = TypeAdapter(list[str])


@dataclass(frozen=True)
class InputLimits:
    max_batch_size: int
    max_sequence_length: int


@dataclass(frozen=True)
class CalibrationPolicy:
    """Server-wide calibration settings."""

    allow_uncalibrated: bool = False  # answer raw softmax (no sets) where no artifact exists
    abstain_set_size: int = DEFAULT_ABSTAIN_SET_SIZE  # abstain when a set holds more labels


@dataclass(frozen=True)
class ConformalOptions:
    """What one request asks of calibration; invalid values raise BadInputError."""

    alpha: float = DEFAULT_ALPHA
    score: str = DEFAULT_SCORE
    class_conditional: bool = False
    never_empty: bool = False
    online: bool = False  # build the set at the ACI level instead of `alpha`
    max_set_size: int | None = None  # abstain above this set size (server setting when None)
    seed: int | None = None  # randomised scores; the server draws and reports one when None

    def __post_init__(self) -> None:
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
            raise BadInputError(
                f"alpha must be a number in the open interval (0, 1), got {alpha!r}"
            )
        if self.score not in SCORE_NAMES:
            raise BadInputError(
                f"unknown conformal score {self.score!r}; expected one of {list(SCORE_NAMES)}"
            )
        if self.online and self.never_empty:
            raise BadInputError(
                "never_empty cannot be combined with online: adding a label to an empty ACI "
                "set voids its long-run miscoverage bound"
            )
        if self.online and self.class_conditional:
            raise BadInputError(
                "class_conditional cannot be combined with online: the ACI level is marginal"
            )
        for name in ("max_set_size", "seed"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_SEED
            ):
                raise BadInputError(f"{name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class ClassPrediction:
    id: str  # uuid4 hex, the handle for later feedback
    label: str
    index: int  # position of `label` in the model's labels (or vocabulary)
    confidence: float
    probabilities: list[float]
    entropy: float  # nats, of `probabilities`
    prediction_set: list[str] | None = None
    set_size: int | None = None
    abstain: bool | None = None
    epistemic: float | None = None  # mutual information (nats), sampling backends only
    set_indices: list[int] | None = None  # `prediction_set` as label indices


@dataclass(frozen=True)
class PredictionBatch:
    model: str
    version: str
    backend: str
    calibrated: bool
    predictions: list[ClassPrediction]
    usage: dict[str, Any] = field(default_factory=dict)
    conformal: ConformalOptions | None = None  # what was asked (None: plain softmax)
    alpha: float | None = None  # the level the sets were built at (ACI's when online)
    seed: int | None = None  # the seed of a randomised score
    warnings: list[str] = field(default_factory=list)


# ---- input validation -----------------------------------------------------------------------


def _check_batch(inputs: object, limits: InputLimits, expected: str) -> list[Any]:
    """Cheap checks first, so an oversized request is refused before its values are parsed."""
    if not isinstance(inputs, list):
        raise BadInputError(f"inputs must be {expected}, got {type(inputs).__name__}")
    if not inputs:
        raise BadInputError("inputs is empty: send at least one sequence")
    if len(inputs) > limits.max_batch_size:
        raise BadInputError(
            f"inputs has {len(inputs)} sequences; the limit is {limits.max_batch_size} per request"
        )
    for i, sequence in enumerate(inputs):
        if isinstance(sequence, list | str) and len(sequence) > limits.max_sequence_length:
            raise BadInputError(
                f"inputs[{i}] has {len(sequence)} steps; the limit is "
                f"{limits.max_sequence_length} per sequence"
            )
    return inputs


def _validated(adapter: TypeAdapter, inputs: list[Any]) -> Any:
    try:
        return adapter.validate_python(inputs, strict=True)
    except ValidationError as error:
        located = [dict(e, loc=("inputs", *e["loc"])) for e in error.errors()]
        raise BadInputError(describe_validation_errors(located)) from None


def feature_tensor(inputs: object, n_features: int, limits: InputLimits) -> Tensor:
    """A batch of equal-length feature sequences as float32 [N, T, F], or BadInputError."""
    batch = _check_batch(inputs, limits, "a list of sequences of shape [N, T, F]")
    values = _validated(_FEATURE_SEQUENCES, batch)
    try:
        with np.errstate(over="ignore"):  # overflow to inf is reported below, by position
            array = np.asarray(values, dtype=np.float32)  # [N, T, F] when rectangular
    except ValueError:
        array = None  # ragged; _describe_shape_problem says where
    if array is None or array.ndim != 3 or array.shape[1] == 0 or array.shape[2] != n_features:
        raise BadInputError(_describe_shape_problem(values, n_features))
    if not np.isfinite(array).all():
        # Finite as JSON doubles but beyond float32 (|x| > 3.4e38).
        n, t, f = (int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise BadInputError(
            f"inputs[{n}][{t}][{f}] = {values[n][t][f]!r} is outside the float32 range"
        )
    return torch.from_numpy(array)


def _describe_shape_problem(values: list[list[list[float]]], n_features: int) -> str:
    """The first place where `values` is not [N, T, F] with equal T and F = n_features."""
    first_length = len(values[0])
    for i, sequence in enumerate(values):
        if not sequence:
            return f"inputs[{i}] is empty: every sequence needs at least one time step"
        if len(sequence) != first_length:
            return (
                f"sequences must all have the same number of steps: inputs[0] has "
                f"{first_length}, inputs[{i}] has {len(sequence)}; send sequences of "
                "different lengths in separate requests"
            )
        for t, step in enumerate(sequence):
            if len(step) != n_features:
                return (
                    f"inputs[{i}][{t}] has {len(step)} features; the model expects "
                    f"{n_features} per time step (shape [N, T, {n_features}])"
                )
    return f"inputs must have shape [N, T, {n_features}]"


def encode_prompts(inputs: object, vocabulary: Sequence[str], limits: InputLimits) -> list[Tensor]:
    """Prompt strings as token ids, one long [T] tensor each, or BadInputError."""
    batch = _check_batch(inputs, limits, "a list of prompt strings")
    prompts: list[str] = _validated(_PROMPTS, batch)
    index = {token: i for i, token in enumerate(vocabulary)}
    encoded = []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise BadInputError(f"inputs[{i}] is an empty prompt: send at least one character")
        unknown = sorted({char for char in prompt if char not in index})
        if unknown:
            shown = ", ".join(repr(char) for char in unknown[:10])
            raise BadInputError(
                f"inputs[{i}] has characters outside the model's vocabulary: {shown}"
            )
        encoded.append(torch.tensor([index[char] for char in prompt], dtype=torch.long))  # [T]
    return encoded


# ---- running and reading out ----------------------------------------------------------------


def last_step_logits(model: StatefulModel, x: Tensor) -> Tensor:
    """Logits after the last step of each sequence, running the model itself (the reference
    for the torch backend): x [N, T, F] or [N, T] -> [N, C]."""
    with torch.inference_mode():
        logits, _ = model(x)  # [N, T, C]
    return logits[:, -1]  # [N, C]


def run_last_step(runner: Runner, x: Tensor) -> tuple[Tensor, Usage]:
    """Last-step logits of a backend run: [N, C], or [S, N, C] from a sampling backend."""
    logits, _, usage = runner.run(x)  # [N, T, C] or [S, N, T, C]
    return logits[..., -1, :], usage


def prompt_logits(run: Callable[[Tensor], Tensor], prompts: Sequence[Tensor]) -> Tensor:
    """Next-token logits for prompts of any lengths: one batched `run` per distinct length.

    `run` maps tokens [n, T] to last-step logits [n, C] (or [S, n, C]); the result is [N, C]
    (or [S, N, C]) in prompt order.
    """
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    rows: list[Tensor | None] = [None] * len(prompts)
    for positions in by_length.values():
        tokens = torch.stack([prompts[i] for i in positions])  # [n, T]
        logits = run(tokens)  # [n, C] or [S, n, C]
        for j, i in enumerate(positions):
            rows[i] = logits[..., j, :]  # [C] or [S, C]
    return torch.stack(rows, dim=-2)  # [N, C] or [S, N, C]


def calibration_inputs(last_logits: Tensor) -> tuple[Tensor, Tensor | None]:
    """The logits calibration works on [N, C] (float64), and the epistemic part [N] or None.

    Sampled logits [S, N, C] become the log of the predictive mean of the S softmaxes, whose
    softmax is that mean, so every calibration map and score sees the predictive
    distribution. Epistemic = H(mean) - mean H (mutual information, nats, >= 0).
    """
    if last_logits.dim() == 2:
        return last_logits.double(), None
    if last_logits.dim() != 3:
        raise ValueError(f"expected logits [N, C] or [S, N, C], got {list(last_logits.shape)}")
    log_probs = torch.log_softmax(last_logits.double(), dim=-1)  # [S, N, C]
    samples = log_probs.shape[0]
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(samples)  # [N, C]
    total = -(log_mean.exp() * log_mean).sum(dim=-1)  # [N] entropy of the mean
    aleatoric = -(log_probs.exp() * log_probs).sum(dim=-1).mean(dim=0)  # [N] mean entropy
    return log_mean, (total - aleatoric).clamp_min(0.0)


def _entropy(probs: Tensor) -> Tensor:
    """Entropy in nats of rows [N, C]; 0 log 0 counts as 0."""
    return (-torch.special.xlogy(probs, probs).sum(dim=-1)).clamp_min(0.0)  # [N]


def predictions_from_probabilities(
    probs: Tensor,
    labels: Sequence[str],
    *,
    sets: Tensor | None = None,
    abstain_above: int | None = None,
    epistemic: Tensor | None = None,
) -> list[ClassPrediction]:
    """One prediction per row of probs [N, C] (float64), with its set [N, C] bool if given."""
    confidence, index = probs.max(dim=-1)  # [N], [N]
    entropy = _entropy(probs)  # [N]
    predictions = []
    for n in range(probs.shape[0]):
        members = None if sets is None else sets[n].nonzero().flatten().tolist()
        predictions.append(
            ClassPrediction(
                id=uuid.uuid4().hex,
                label=labels[int(index[n])],
                index=int(index[n]),
                confidence=float(confidence[n]),
                probabilities=probs[n].tolist(),
                entropy=float(entropy[n]),
                prediction_set=None if members is None else [labels[i] for i in members],
                set_size=None if members is None else len(members),
                abstain=(
                    None
                    if members is None or abstain_above is None
                    else len(members) > abstain_above
                ),
                epistemic=None if epistemic is None else float(epistemic[n]),
                set_indices=members,
            )
        )
    return predictions


def predictions_from_logits(logits: Tensor, labels: Sequence[str]) -> list[ClassPrediction]:
    """Uncalibrated: softmax, arg-max label, its probability and the entropy, per row of [N, C]."""
    return predictions_from_probabilities(torch.softmax(logits.double(), dim=-1), labels)


def model_labels(card: ModelCard) -> list[str]:
    """Class labels of a classifier, or the vocabulary of a language model."""
    return list(card.config.get("labels") or card.config.get("vocabulary") or [])


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
    ) -> PredictionBatch:
        """Predict on whole sequences and remember the predictions for feedback.

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
        await self.publish(batch, session_id=session_id)
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

    async def publish(self, batch: PredictionBatch, *, session_id: str | None = None) -> None:
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
            )
            for p in batch.predictions
        ]
        try:
            await self.feedback.remember(records)
        except StateStoreError as error:
            logger.error("could not remember %d predictions for feedback: %s", len(records), error)

    def _aci_target(self) -> float | None:
        return None if self.feedback is None else self.feedback.aci_target_alpha

    async def submit_feedback(self, prediction_id: str, label: object) -> FeedbackResult:
        if self.feedback is None:
            raise NotFoundError("this server keeps no predictions for feedback")
        return await self.feedback.submit(prediction_id, label)

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
