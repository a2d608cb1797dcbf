"""Protocol-independent serving logic: what a request means, whatever route it came in on.

The REST and V2 routers are thin adapters over `DataPlane`: it lists and describes models,
validates inputs against a model's input spec, runs the model off the event loop, and turns
logits into predictions (label, softmax probabilities, confidence, entropy).

Two seams are left open on purpose:
- backends: `DataPlane._run_last_step` is the one place a model runs; only "torch" exists
  until the hardware backends are wired in, and any other name is refused.
- calibration: `ClassPrediction` already carries `prediction_set`, `set_size` and `abstain`
  (None for now) and `PredictionBatch.calibrated` says whether confidence was calibrated.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from models.base import StatefulModel
from models.repository import ModelCard, ModelNotFoundError, ModelRepository, check_model_name
from service.errors import BadInputError, NotFoundError, describe_validation_errors

logger = logging.getLogger("neuroserve.dataplane")

TORCH_BACKEND = "torch"
AVAILABLE_BACKENDS = (TORCH_BACKEND,)

_FiniteNumber = Annotated[float, Field(allow_inf_nan=False)]
# Strict: a JSON number is a feature, while true/false and "1.5" are type errors.
_FEATURE_SEQUENCES = TypeAdapter(list[list[list[_FiniteNumber]]])
_PROMPTS = TypeAdapter(list[str])


@dataclass(frozen=True)
class InputLimits:
    max_batch_size: int
    max_sequence_length: int


@dataclass(frozen=True)
class ClassPrediction:
    id: str  # uuid4 hex, the handle for later feedback
    label: str
    index: int  # position of `label` in the model's labels (or vocabulary)
    confidence: float
    probabilities: list[float]
    entropy: float  # nats
    prediction_set: list[str] | None = None
    set_size: int | None = None
    abstain: bool | None = None


@dataclass(frozen=True)
class PredictionBatch:
    model: str
    version: str
    backend: str
    calibrated: bool
    predictions: list[ClassPrediction]
    usage: dict[str, Any] = field(default_factory=dict)


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
    """Logits after the last step of each sequence: x [N, T, F] or [N, T] -> [N, C]."""
    with torch.inference_mode():
        logits, _ = model(x)  # [N, T, C]
    return logits[:, -1]  # [N, C]


def prompt_logits(run: Callable[[Tensor], Tensor], prompts: Sequence[Tensor]) -> Tensor:
    """Next-token logits for prompts of any lengths: one batched `run` per distinct length.

    `run` maps tokens [n, T] to last-step logits [n, C]; the result is [N, C] in prompt order.
    """
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    rows: list[Tensor | None] = [None] * len(prompts)
    for positions in by_length.values():
        tokens = torch.stack([prompts[i] for i in positions])  # [n, T]
        for i, row in zip(positions, run(tokens), strict=True):
            rows[i] = row  # [C]
    return torch.stack(rows)  # [N, C]


def predictions_from_logits(logits: Tensor, labels: Sequence[str]) -> list[ClassPrediction]:
    """Softmax, arg-max label, its probability and the entropy in nats, per row of [N, C]."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)  # [N, C], float64 for stable sums
    probs = log_probs.exp()  # [N, C]
    entropy = -(probs * log_probs).sum(dim=-1)  # [N]; log_probs is finite, so 0·log 0 -> 0
    confidence, index = probs.max(dim=-1)  # [N], [N]
    return [
        ClassPrediction(
            id=uuid.uuid4().hex,
            label=labels[int(index[n])],
            index=int(index[n]),
            confidence=float(confidence[n]),
            probabilities=probs[n].tolist(),
            entropy=float(entropy[n].clamp_min(0.0)),
        )
        for n in range(logits.shape[0])
    ]


# ---- the data plane -------------------------------------------------------------------------


class DataPlane:
    """Serving logic over one model repository; safe to call from many threads."""

    def __init__(self, repository: ModelRepository, limits: InputLimits) -> None:
        self.repository = repository
        self.limits = limits
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

    # ---- predict ------------------------------------------------------------------------
    async def predict(
        self, name: str, inputs: object, *, version: str | None = None, backend: str = TORCH_BACKEND
    ) -> PredictionBatch:
        """Predict on whole sequences. Validation and the model run happen in a worker thread,
        so the event loop never waits on torch."""
        return await run_in_threadpool(
            self.predict_blocking, name, inputs, version=version, backend=backend
        )

    def predict_blocking(
        self, name: str, inputs: object, *, version: str | None = None, backend: str = TORCH_BACKEND
    ) -> PredictionBatch:
        card = self.card(name, version)
        if backend not in AVAILABLE_BACKENDS:
            raise BadInputError(
                f"backend {backend!r} not available; available backends: {list(AVAILABLE_BACKENDS)}"
            )
        model = self.repository.load(card.name, card.version).model
        config = card.config

        def run(x: Tensor) -> Tensor:
            return self._run_last_step(model, x, backend)

        if config["input"]["kind"] == "tokens":
            labels = config["vocabulary"]
            prompts = encode_prompts(inputs, labels, self.limits)
            started = time.perf_counter()
            logits = prompt_logits(run, prompts)  # [N, V]
            steps = sum(len(prompt) for prompt in prompts)
        else:
            labels = config["labels"]
            x = feature_tensor(inputs, int(config["input"]["features"]), self.limits)  # [N, T, F]
            started = time.perf_counter()
            logits = run(x)  # [N, C]
            steps = x.shape[0] * x.shape[1]
        elapsed = time.perf_counter() - started
        usage = {"sequences": int(logits.shape[0]), "steps": int(steps), "compute_seconds": elapsed}
        return PredictionBatch(
            model=card.name,
            version=card.version,
            backend=backend,
            calibrated=False,
            predictions=predictions_from_logits(logits, labels),
            usage=usage,
        )

    def _run_last_step(self, model: StatefulModel, x: Tensor, backend: str) -> Tensor:
        """The one place a model runs: x [N, T, F] or [N, T] -> logits [N, C].

        This is the seam for hardware backends; "torch" runs the model directly.
        """
        return last_step_logits(model, x)  # [N, C]
