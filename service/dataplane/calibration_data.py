"""Labelled examples at every position of a sequence, run through a backend as the server
runs it: what `neuroserve calibrate` fits a calibration per position on, and what the
benchmarks and coverage tests measure it with.

- Sequence classifiers: the logits after every step t = 1..T of each labelled sequence
  [N, T, F]; position t's examples are (logits after t steps, the sequence's label). The data
  is the digits calibration split for digits models, or the user's `--data FILE.npz`; the
  test split (digits) is what the report measures.
- Language models: a position is a context length, in buckets 1, 2-3, 4-7, 8-15 and
  16-1024 (`LM_BUCKET_EDGES`). A character model's accuracy climbs steeply over its first
  ~15 characters of context and is flat after (0.64-0.70 out to 1023 on the stdlib corpus),
  so the short contexts get buckets of their own and one calibration serves 16-1024;
  contexts longer than 1024 are past the horizon (uncalibrated). Each example is a window of
  held-out text starting at a uniformly random place, read for a random length within the
  bucket (log-uniform, so long contexts do not crowd out the bucket's short end) and
  labelled with the token that follows. One pass over a window gives the logits at every
  length, so each window gives one example per bucket. Random starts make the examples
  i.i.d. draws of (context, next token) from the text, hence exchangeable with test draws
  made the same way; within a bucket the guarantee is marginal over its lengths. The held-out
  text is split in two halves: the first calibrates, the second is the report's test text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from calibration import PositionBuckets
from hardware_backends.base import BackendUnavailableError, Runner, UnknownBackendError
from hardware_backends.registry import prepare_runner
from models import charcorpus
from models.datasets import sha256_of_arrays
from models.repository import ModelCard, ModelRepository
from models.training import ClassificationData, LanguageData, load_training_data
from models.userdata import load_npz_dataset
from service.dataplane.plane import runner_key
from service.dataplane.predictions import calibration_inputs, run_stateless

LM_BUCKET_EDGES = (1, 2, 4, 8, 16, 1025)  # context lengths 1, 2-3, 4-7, 8-15, 16-1024
LM_WINDOWS = 2000  # examples per context-length bucket (half fit the map, half score)
LM_CALIBRATION_FRACTION = 0.5  # of the held-out text; the rest is the report's test text
RUN_BATCH = 256  # sequences per backend call (bounds memory on sampling backends)
LM_RUN_TOKENS = 16_384  # tokens per backend call when windows are long (memory)


class CalibrateError(ValueError):
    """A problem with what the user asked for; printed without a traceback."""


@dataclass(frozen=True)
class LabelledSequences:
    """Classifier data: sequences and their labels."""

    name: str
    sha256: str
    inputs: Tensor  # [N, T, F] float32
    labels: Tensor  # [N] long


@dataclass(frozen=True)
class HeldOutText:
    name: str
    ids: Tensor  # [L] long token ids


@dataclass(frozen=True)
class PositionExamples:
    """Labelled logits per position bucket, ready to fit or measure a calibration."""

    buckets: PositionBuckets
    logits: list[Tensor]  # per bucket [N_k, C] float64 (a sampling backend's predictive mean)
    labels: list[Tensor]  # per bucket [N_k] long
    name: str  # where the examples came from
    sha256: str  # of the inputs and labels behind them


# ---- data -----------------------------------------------------------------------------------


def dataset_spec(card: ModelCard) -> str:
    """The training data spec a model records ("digits-seq:rows", "charcorpus", ...) or ""."""
    dataset = card.config.get("dataset")
    return str(dataset.get("spec", "")) if isinstance(dataset, dict) else ""


def is_language_model(card: ModelCard) -> bool:
    return card.config["task"] == "language-model"


def classifier_data(
    card: ModelCard, data: Path | None, split: str = "calibration"
) -> LabelledSequences:
    """The labelled sequences of a classifier: `data` (an .npz) or its digits split."""
    labels = card.config["labels"]
    if data is not None:
        dataset = load_npz_dataset(data)
        if dataset.n_features != int(card.config["input"]["features"]):
            raise CalibrateError(
                f"{data}: inputs have {dataset.n_features} features per step, "
                f"{card.name} expects {card.config['input']['features']}"
            )
        unnamed = dataset.label_names == [str(i) for i in range(dataset.n_classes)]
        if dataset.n_classes > len(labels) or not (unnamed or dataset.label_names == labels):
            raise CalibrateError(
                f"{data}: labels {dataset.label_names[:10]} do not match {card.name}'s {labels}"
            )
    else:
        spec = dataset_spec(card)
        loaded = load_training_data(spec) if spec.startswith("digits-seq") else None
        if not isinstance(loaded, ClassificationData) or split not in loaded.evaluation:
            raise CalibrateError(
                f"{card.name} was trained on {spec or 'data'} without a {split} split; "
                "pass --data FILE.npz with labelled examples it was not trained on"
            )
        dataset = loaded.evaluation[split]
    return LabelledSequences(dataset.name, dataset.sha256, dataset.inputs, dataset.labels)


def digits_test_split(card: ModelCard) -> LabelledSequences | None:
    """The test split of a digits classifier (the report's data), or None."""
    try:
        return classifier_data(card, None, split="test")
    except CalibrateError:
        return None


def encode_text(text: str, vocabulary: list[str]) -> Tensor:
    text = charcorpus.normalize_text(text)
    if tuple(vocabulary) == charcorpus.VOCABULARY:
        return charcorpus.encode(text)
    index = {token: i for i, token in enumerate(vocabulary)}
    unknown = sorted({char for char in text if char not in index})
    if unknown:
        raise CalibrateError(
            f"the text has characters outside the model's vocabulary: {unknown[:10]}"
        )
    return torch.tensor([index[char] for char in text], dtype=torch.long)


def held_out_text(card: ModelCard, data: Path | None) -> HeldOutText:
    """A language model's held-out text: `data` (UTF-8 text) or its corpus's validation text."""
    vocabulary = card.config["vocabulary"]
    if data is not None:
        try:
            text = data.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CalibrateError(f"{data}: cannot read it as UTF-8 text ({error})") from None
        return HeldOutText(f"text:{data.name}", encode_text(text, vocabulary))
    spec = dataset_spec(card)
    loaded = (
        load_training_data(spec) if spec in ("charcorpus",) or spec.startswith("text:") else None
    )
    if not isinstance(loaded, LanguageData) or tuple(vocabulary) != loaded.corpus.vocabulary:
        raise CalibrateError(f"{card.name} has no held-out text of its own; pass --data FILE.txt")
    return HeldOutText(f"{loaded.corpus.name}/valid", loaded.corpus.valid_ids)


def split_text(text: HeldOutText) -> tuple[HeldOutText, HeldOutText]:
    """(calibration text, test text): the first LM_CALIBRATION_FRACTION and the rest."""
    cut = int(LM_CALIBRATION_FRACTION * text.ids.shape[0])
    share = f"{LM_CALIBRATION_FRACTION:.0%}"
    return (
        HeldOutText(f"{text.name} (first {share})", text.ids[:cut]),
        HeldOutText(f"{text.name} (after the first {share})", text.ids[cut:]),
    )


# ---- running --------------------------------------------------------------------------------


def prepared_runner(
    repository: ModelRepository, card: ModelCard, backend: str, options: dict[str, Any]
) -> Runner:
    """The model on `backend`, prepared as the server prepares it (same cache key)."""
    model = repository.load(card.name, card.version).model
    try:
        return prepare_runner(backend, model, model_key=runner_key(card), options=options)
    except (UnknownBackendError, BackendUnavailableError, ValueError) as error:
        raise CalibrateError(str(error)) from None


def readout_logits(step_logits: Tensor) -> Tensor:
    """Per-step logits [n, T, C] (or [S, n, T, C] from a sampling backend) as calibration reads
    them: float64 [n, T, C], the log predictive mean for samples (as the dataplane reads a
    last step)."""
    if step_logits.dim() == 3:
        return step_logits.double()
    samples, n, steps, classes = step_logits.shape
    flat, _ = calibration_inputs(step_logits.reshape(samples, n * steps, classes))  # [n*T, C]
    return flat.reshape(n, steps, classes)


def stepwise_logits(runner: Runner, inputs: Tensor, batch_size: int = RUN_BATCH) -> Tensor:
    """The logits after every step, [N, T, C] float64, in batches of sequences."""
    parts = [
        readout_logits(run_stateless(runner, inputs[i : i + batch_size])[0])
        for i in range(0, inputs.shape[0], batch_size)
    ]
    return torch.cat(parts)


def classifier_examples(runner: Runner, data: LabelledSequences) -> PositionExamples:
    """One bucket per step: the logits after t steps of every sequence, with its label."""
    logits = stepwise_logits(runner, data.inputs)  # [N, T, C]
    steps = logits.shape[1]
    return PositionExamples(
        buckets=PositionBuckets.every_step(steps),
        logits=[logits[:, t] for t in range(steps)],
        labels=[data.labels] * steps,
        name=data.name,
        sha256=data.sha256,
    )


def language_examples(
    runner: Runner,
    text: HeldOutText,
    seed: int,
    buckets: PositionBuckets | None = None,
    windows: int = LM_WINDOWS,
) -> PositionExamples:
    """One example per window and context-length bucket (see the module docstring)."""
    buckets = buckets or PositionBuckets(LM_BUCKET_EDGES)
    ids = text.ids
    horizon = buckets.horizon
    if ids.shape[0] <= horizon + 1:
        raise CalibrateError(
            f"{text.name} has {ids.shape[0]} tokens; calibrating contexts up to {horizon} "
            f"tokens needs more than {horizon + 1}"
        )
    rng = np.random.default_rng(seed)
    bounds = [buckets.bounds(k) for k in range(len(buckets))]
    lengths = np.stack(  # [K, N] context length per bucket and window, log-uniform in bucket
        [np.floor(np.exp(rng.uniform(np.log(lo), np.log(hi + 1), windows))) for lo, hi in bounds]
    ).astype(np.int64)
    lengths = np.clip(lengths, [[lo] for lo, _ in bounds], [[hi] for _, hi in bounds])
    longest = lengths.max(axis=0)  # [N] each window is read this far
    # Any start leaves room for the horizon, so a window read as far as the longest of its
    # backend call stays inside the text.
    starts = (rng.uniform(size=windows) * (ids.shape[0] - horizon - 1)).astype(np.int64)  # [N]
    picked: list[dict[int, Tensor]] = [{} for _ in range(len(buckets))]
    labels: list[dict[int, int]] = [{} for _ in range(len(buckets))]
    order = np.argsort(longest, kind="stable")  # similar lengths share a backend call
    position = 0
    while position < windows:
        candidates = order[position : position + RUN_BATCH]  # ascending lengths
        size = max(1, min(RUN_BATCH, LM_RUN_TOKENS // int(longest[candidates[-1]])))
        batch = order[position : position + size]
        length = int(longest[batch].max())
        position += len(batch)
        tokens = ids[torch.from_numpy(starts[batch])[:, None] + torch.arange(length + 1)]
        logits = readout_logits(run_stateless(runner, tokens[:, :length])[0])  # [n, L, V]
        for k in range(len(buckets)):
            at = torch.from_numpy(lengths[k, batch])  # [n] context lengths
            rows = torch.arange(len(batch))
            chosen = logits[rows, at - 1]  # [n, V] after `at` tokens
            following = tokens[rows, at]  # [n] the token after them
            for j, window in enumerate(batch.tolist()):
                picked[k][window] = chosen[j]
                labels[k][window] = int(following[j])
    return PositionExamples(
        buckets=buckets,
        logits=[torch.stack([picked[k][w] for w in range(windows)]) for k in range(len(buckets))],
        labels=[
            torch.tensor([labels[k][w] for w in range(windows)], dtype=torch.long)
            for k in range(len(buckets))
        ],
        name=f"{text.name} ({windows} windows per context bucket, seed {seed})",
        sha256=sha256_of_arrays(text.ids.numpy(), starts, lengths),
    )
