"""Predictions as the server answers them: what a request asks of calibration
(`ConformalOptions`), one answer per sequence (`ClassPrediction`) and per request
(`PredictionBatch`), and the read-out from logits.

Backends return last-step logits [N, C], or [S, N, C] when they sample (stochastic weights).
`calibration_inputs` turns either into the logits calibration works on (and, for samples,
their per-sample log-probabilities); `epistemic_part` splits the entropy of the answered
probabilities into the samples' disagreement, on the same calibrated basis;
`predictions_from_probabilities` reads labels, confidence, entropy and the conformal set out
of calibrated probabilities.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from calibration import SCORE_NAMES
from calibration.checks import check_alpha
from calibration.maps import CalibrationMap
from hardware_backends.base import Runner, Usage
from hardware_backends.noise_streams import NOISE_STREAM, seed_streams_from_inputs
from models.base import StatefulModel
from models.repository import ModelCard
from service.errors import BadInputError, value_errors_as

DEFAULT_ALPHA = 0.1
# Deterministic APS puts 3-5 labels in the sets of confident models and randomised scores
# make a set depend on a coin; RAPS covers on target with single-label sets on the digits
# models (docs/BENCHMARKS.md) and answers the same input with the same set.
DEFAULT_SCORE = "raps"
# A character model's top token is right ~65% of the time, so any APS-family set must reach
# ~99% of the mass (or, for RAPS, always hold its k_reg ~5 first tokens): a 0.997-confident
# step got 5-6 characters. LAC's sets are the top token alone on confident steps.
LANGUAGE_MODEL_SCORE = "lac"
# What an answer says when its request sent a `seed` (accepted for compatibility, not used).
IGNORED_SEED_WARNING = (
    "seed is ignored: the uniform draw of randomised scores is the server's, one per "
    "prediction id, so that no request can steer coverage"
)


def default_score(card: ModelCard) -> str:
    """The score a request gets when it names none: LAC for language models, else RAPS."""
    return LANGUAGE_MODEL_SCORE if card.config["task"] == "language-model" else DEFAULT_SCORE


@dataclass(frozen=True)
class ConformalOptions:
    """What one request asks of calibration; invalid values raise BadInputError."""

    alpha: float = DEFAULT_ALPHA
    score: str | None = None  # None: the model's default (`default_score`)
    class_conditional: bool = False
    # Add the top label to an empty set. None: yes, unless online (an ACI set must stay raw).
    never_empty: bool | None = None
    online: bool = False  # build the set at the ACI level that aims at `alpha`
    max_set_size: int | None = None  # abstain above this set size (server setting when None)

    def __post_init__(self) -> None:
        with value_errors_as(BadInputError):
            check_alpha(self.alpha)
        if self.score is not None and self.score not in SCORE_NAMES:
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
        value = self.max_set_size
        bad = isinstance(value, bool) or not isinstance(value, int) or value < 0
        if value is not None and bad:
            raise BadInputError(f"max_set_size must be a non-negative integer, got {value!r}")

    def for_model(self, card: ModelCard) -> ConformalOptions:
        """These options with the model's default score filled in."""
        return self if self.score is not None else replace(self, score=default_score(card))

    @property
    def fills_empty_sets(self) -> bool:
        return (not self.online) if self.never_empty is None else self.never_empty


@dataclass  # not frozen: built per prediction, where a frozen __init__ costs ~3x
class ClassPrediction:
    id: str  # 128 random bits in hex (uuid4's size), the handle for later feedback
    label: str
    index: int  # position of `label` in the model's labels (or vocabulary)
    confidence: float
    probabilities: list[float]
    entropy: float  # nats, of `probabilities`
    calibrated: bool = False  # probabilities and set come from the calibration of `position`
    position: int | None = None  # steps read (or context length) when it was made
    prediction_set: list[str] | None = None
    set_size: int | None = None
    abstain: bool | None = None
    epistemic: float | None = None  # mutual information (nats), sampling backends only
    set_indices: list[int] | None = None  # `prediction_set` as label indices
    uniform: float | None = None  # the U a randomised score's set was built with
    aci_alpha: float | None = None  # the online level the set was built at (online only)
    note: str | None = None  # why this prediction is not calibrated


@dataclass  # not frozen: built per request and per session step (see ClassPrediction)
class PredictionBatch:
    model: str
    version: str
    backend: str
    calibrated: bool  # every prediction is calibrated
    predictions: list[ClassPrediction]
    usage: dict[str, Any] = field(default_factory=dict)
    conformal: ConformalOptions | None = None  # what was asked (None: plain softmax)
    alpha: float | None = None  # the requested level (the online levels' target when online)
    calibration_id: str | None = None  # the calibration the sets came from
    level_keys: dict[int, Any] = field(default_factory=dict)  # prediction row -> LevelKey
    warnings: list[str] = field(default_factory=list)

    def part(
        self,
        predictions: list[ClassPrediction],
        usage: dict[str, Any],
        request_warnings: Sequence[str],
        level_keys: dict[int, Any] | None = None,
    ) -> PredictionBatch:
        """Some of this batch's predictions as a batch of their own, with their own usage and
        warnings (level keys: this batch's unless given). Built directly, not with
        `dataclasses.replace`: it runs per request and per session step."""
        return PredictionBatch(
            model=self.model,
            version=self.version,
            backend=self.backend,
            calibrated=all(p.calibrated for p in predictions),
            predictions=predictions,
            usage=usage,
            conformal=self.conformal,
            alpha=self.alpha,
            calibration_id=self.calibration_id,
            level_keys=self.level_keys if level_keys is None else level_keys,
            warnings=batch_warnings(request_warnings, predictions),
        )


def batch_warnings(
    request_warnings: Sequence[str], predictions: Sequence[ClassPrediction]
) -> list[str]:
    """A request's own warnings, then why any of its predictions is not calibrated (once)."""
    notes = (p.note for p in predictions if p.note is not None)
    return list(dict.fromkeys([*request_warnings, *notes]))


def split_batch(
    batch: PredictionBatch,
    sizes: Sequence[int],
    usages: Sequence[dict[str, Any]],
    request_warnings: Sequence[Sequence[str]],
) -> list[PredictionBatch]:
    """`batch` (answered for several requests at once; at online levels, for one) cut into one
    answer per request: `sizes[i]` consecutive rows, with its own usage and warnings."""
    if sum(sizes) != len(batch.predictions):
        raise ValueError(f"{len(batch.predictions)} predictions cannot be cut into {list(sizes)}")
    if batch.level_keys and len(sizes) > 1:
        raise ValueError("a batch answered at online levels belongs to one request")
    parts, start = [], 0
    for size, usage, warnings in zip(sizes, usages, request_warnings, strict=True):
        predictions = batch.predictions[start : start + size]
        start += size
        parts.append(batch.part(predictions, dict(usage), warnings))
    return parts


def last_step_logits(model: StatefulModel, x: Tensor) -> Tensor:
    """Logits after the last step of each sequence, running the model itself (the reference
    for the torch backend): x [N, T, F] or [N, T] -> [N, C]."""
    with torch.inference_mode():
        logits, _ = model(x)  # [N, T, C]
    return logits[:, -1]  # [N, C]


def run_stateless(runner: Runner, x: Tensor) -> tuple[Tensor, Usage]:
    """A backend run of whole sequences from a fresh state: logits [N, T, C] (or [S, N, T, C]).
    A backend with per-sequence noise streams draws each row's noise from its own inputs,
    so a sequence's answer does not depend on the sequences batched with it."""
    state = runner.init_state(x.shape[0])
    if NOISE_STREAM not in state:
        logits, _, usage = runner.run(x)  # what the runner does for a fresh state
        return logits, usage
    logits, _, usage = runner.run(x, seed_streams_from_inputs(state, x))
    return logits, usage


def run_last_step(runner: Runner, x: Tensor) -> tuple[Tensor, Usage]:
    """Last-step logits of a backend run: [N, C], or [S, N, C] from a sampling backend."""
    logits, usage = run_stateless(runner, x)  # [N, T, C] or [S, N, T, C]
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
    """The logits calibration works on [N, C] (float64), and the samples' log-probabilities
    [S, N, C] (float64) or None.

    Sampled logits [S, N, C] become the log of the predictive mean of the S softmaxes, whose
    softmax is that mean, so every calibration map and score sees the predictive
    distribution.
    """
    if last_logits.dim() == 2:
        return last_logits.double(), None
    if last_logits.dim() != 3:
        raise ValueError(f"expected logits [N, C] or [S, N, C], got {list(last_logits.shape)}")
    log_probs = torch.log_softmax(last_logits.double(), dim=-1)  # [S, N, C]
    samples = log_probs.shape[0]
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(samples)  # [N, C]
    return log_mean, log_probs


def epistemic_part(
    probs: Tensor, sample_log_probs: Tensor, maps: Sequence[CalibrationMap | None]
) -> Tensor:
    """The epistemic part [N] (nats) of the entropy of the answered probabilities [N, C].

    Every row's samples [S, C] go through the calibration map that made the row's answer
    (None: the raw softmax), so both terms live on the same calibrated basis: epistemic =
    H(answer) - mean_s H(calibrated sample s). With the raw softmax (or an identity map) the
    answer is the samples' mean and this is their mutual information with the label; a
    non-linear map can leave the calibrated samples more uncertain than their calibrated mean,
    and then no part of the entropy is put down to disagreement (0). Always
    0 <= epistemic <= entropy.
    """
    total = _entropy(probs)  # [N]
    aleatoric = torch.zeros_like(total)  # [N]
    rows_by_map: dict[int, list[int]] = defaultdict(list)
    for row, calibration_map in enumerate(maps):
        rows_by_map[id(calibration_map)].append(row)
    for rows in rows_by_map.values():
        calibration_map = maps[rows[0]]
        samples = sample_log_probs[:, rows]  # [S, n, C]
        if calibration_map is not None:
            flat = samples.reshape(-1, samples.shape[-1])  # [S·n, C]
            samples = calibration_map.calibrated_logits(flat).double().view_as(samples)
        sample_probs = torch.softmax(samples, dim=-1)  # [S, n, C]
        aleatoric[rows] = (
            _entropy(sample_probs.reshape(-1, samples.shape[-1]))
            .view(samples.shape[0], -1)
            .mean(dim=0)
        )
    return (total - aleatoric).clamp(min=0.0).minimum(total)


def _entropy(probs: Tensor) -> Tensor:
    """Entropy in nats of rows [N, C]; 0 log 0 counts as 0."""
    return (-torch.special.xlogy(probs, probs).sum(dim=-1)).clamp_min(0.0)  # [N]


def abstains(set_size: int | None, max_set_size: int | None) -> bool | None:
    """Abstain when the set does not single out one label: empty, or above the limit."""
    if set_size is None or max_set_size is None:
        return None
    return set_size == 0 or set_size > max_set_size


def predictions_from_probabilities(
    probs: Tensor,
    labels: Sequence[str],
    *,
    sets: Tensor | None = None,
    abstain_above: int | None = None,
    epistemic: Tensor | None = None,
    ids: Sequence[str] | None = None,
    calibrated: Sequence[bool] | None = None,
    positions: Sequence[int | None] | None = None,
    uniforms: Sequence[float | None] | None = None,
    aci_alphas: Sequence[float | None] | None = None,
    has_set: Sequence[bool] | None = None,
    notes: Sequence[str | None] | None = None,
) -> list[ClassPrediction]:
    """One prediction per row of probs [N, C] (float64), with its set [N, C] bool if given
    (rows whose `has_set` is False carry none)."""
    confidence, index = probs.max(dim=-1)  # [N], [N]
    # Python values of whole tensors at once: indexing a tensor per row costs more than the rest.
    confidences, indices = confidence.tolist(), index.tolist()
    entropies, rows = _entropy(probs).tolist(), probs.tolist()
    set_rows = sets.tolist() if sets is not None else None  # [N][C] bool
    epistemics = epistemic.tolist() if epistemic is not None else None
    predictions = []
    for n in range(len(rows)):
        members = None
        if set_rows is not None and (has_set is None or has_set[n]):
            members = [i for i, member in enumerate(set_rows[n]) if member]
        predictions.append(
            ClassPrediction(
                id=os.urandom(16).hex() if ids is None else ids[n],
                label=labels[indices[n]],
                index=indices[n],
                confidence=confidences[n],
                probabilities=rows[n],
                entropy=entropies[n],
                calibrated=bool(calibrated[n]) if calibrated is not None else False,
                position=None if positions is None else positions[n],
                prediction_set=None if members is None else [labels[i] for i in members],
                set_size=None if members is None else len(members),
                abstain=abstains(None if members is None else len(members), abstain_above),
                epistemic=None if epistemics is None else epistemics[n],
                set_indices=members,
                uniform=None if uniforms is None else uniforms[n],
                aci_alpha=None if aci_alphas is None else aci_alphas[n],
                note=None if notes is None else notes[n],
            )
        )
    return predictions


def new_prediction_ids(count: int) -> list[str]:
    """Prediction ids: 128 random bits in hex each, drawn before the sets (randomised scores'
    U derive from them). os.urandom: a uuid4 object costs five times as much for the same bits."""
    return [os.urandom(16).hex() for _ in range(count)]


def predictions_from_logits(logits: Tensor, labels: Sequence[str]) -> list[ClassPrediction]:
    """Uncalibrated: softmax, arg-max label, its probability and the entropy, per row of [N, C]."""
    return predictions_from_probabilities(torch.softmax(logits.double(), dim=-1), labels)


def model_labels(card: ModelCard) -> list[str]:
    """Class labels of a classifier, or the vocabulary of a language model."""
    return list(card.config.get("labels") or card.config.get("vocabulary") or [])
