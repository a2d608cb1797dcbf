"""Backprop training of stateful models and publishing the result with provenance.

A `TrainingRecipe` names everything that determines a model: architecture, config overrides,
dataset, optimiser settings and seed. `train_and_publish` seeds torch and numpy, builds the
model (data-dependent sizes come from the dataset), trains it with AdamW under a warmup +
cosine learning-rate schedule with a tqdm bar, evaluates it on the held-out splits and
publishes a new version to a `ModelRepository` with the data hash, seed, command line and
metrics in its config.json.

Datasets are named by a spec string:

    digits-seq:rows | digits-seq:pixels   classification; evaluated on calibration and test
    charcorpus                            language model on the stdlib docstrings
    npz:<path>                            a user's classification data; 20% held out (seeded)
    text:<path>                           a user's text; the last 5% held out
"""

from __future__ import annotations

import hashlib
import math
import random
import shlex
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from models import digits
from models.architectures import ARCHITECTURES, IMPORTED_ARCHITECTURES, build_model, config_to_dict
from models.base import StatefulModel
from models.charcorpus import CharCorpus, load_char_corpus
from models.datasets import SequenceDataset, split_dataset
from models.evaluate import (
    bits_per_character,
    classification_metrics,
    spike_statistics,
    unigram_bits_per_character,
)
from models.repository import ModelCard, ModelRepository
from models.userdata import load_npz_dataset, load_text_corpus

NPZ_HOLDOUT_FRACTION = 0.2
# How a classifier's cross-entropy is spread over the steps of a sequence: the final step
# only, or step t weighted by t ** power (see `step_loss_weights`).
STEP_LOSS_POWERS = {"uniform": 0, "linear": 1, "quadratic": 2}
STEP_LOSSES = ("last", *STEP_LOSS_POWERS)


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything that determines a trained model. Classification runs `epochs` passes over
    the training split; a language model runs `steps` optimiser steps on random windows of
    `seq_len` tokens."""

    architecture: str
    dataset: str
    model_config: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    steps: int = 1000
    batch_size: int = 64
    seq_len: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    input_noise: float = 0.0  # classification: std of Gaussian noise added to training inputs
    step_loss: str = "last"  # classification: which steps' logits get cross-entropy (STEP_LOSSES)
    # classification with a spiking model: loss += spike_penalty * (spikes / neuron-steps),
    # a firing-rate regulariser that trades accuracy for fewer spike-driven accumulates
    spike_penalty: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture in IMPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is made by `neuroserve import`, not trained "
                f"here; trainable architectures: {sorted(ARCHITECTURES)}"
            )
        for name in ("epochs", "steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not (self.input_noise >= 0.0 and math.isfinite(self.input_noise)):
            raise ValueError(f"input_noise must be finite and >= 0, got {self.input_noise}")
        if not (self.spike_penalty >= 0.0 and math.isfinite(self.spike_penalty)):
            raise ValueError(f"spike_penalty must be finite and >= 0, got {self.spike_penalty}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.step_loss not in STEP_LOSSES:
            raise ValueError(
                f"step_loss must be one of {', '.join(STEP_LOSSES)}, got {self.step_loss!r}"
            )


# ---- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassificationData:
    train: SequenceDataset
    evaluation: dict[str, SequenceDataset]  # split name -> data, e.g. calibration and test

    @property
    def sha256(self) -> str:
        return _combined_hash([self.train.sha256, *(d.sha256 for d in self.evaluation.values())])


@dataclass(frozen=True)
class LanguageData:
    corpus: CharCorpus

    @property
    def sha256(self) -> str:
        return self.corpus.sha256


def _combined_hash(hashes: list[str]) -> str:
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def load_training_data(spec: str, seed: int = 0) -> ClassificationData | LanguageData:
    """Resolve a dataset spec (see the module docstring) into train and held-out data."""
    kind, _, argument = spec.partition(":")
    if kind == "digits-seq":
        variant = argument or "rows"
        return ClassificationData(
            train=digits.load_digits_seq("train", variant),
            evaluation={
                "calibration": digits.load_digits_seq("calibration", variant),
                "test": digits.load_digits_seq("test", variant),
            },
        )
    if kind == "charcorpus" and not argument:
        return LanguageData(load_char_corpus())
    if kind == "npz" and argument:
        train, holdout = split_dataset(load_npz_dataset(argument), NPZ_HOLDOUT_FRACTION, seed)
        return ClassificationData(train=train, evaluation={"test": holdout})
    if kind == "text" and argument:
        return LanguageData(load_text_corpus(argument))
    raise ValueError(
        f"unknown dataset spec {spec!r}; expected digits-seq:rows, digits-seq:pixels, "
        "charcorpus, npz:<path> or text:<path>"
    )


def data_model_config(data: ClassificationData | LanguageData) -> dict[str, Any]:
    """The model-config fields the data decides: input kind and size, output size."""
    if isinstance(data, LanguageData):
        size = data.corpus.vocab_size
        return {"input_kind": "tokens", "vocab_size": size, "d_output": size}
    return {
        "input_kind": "features",
        "d_input": data.train.n_features,
        "d_output": data.train.n_classes,
    }


def build_for_data(
    recipe: TrainingRecipe, data: ClassificationData | LanguageData
) -> StatefulModel:
    """The recipe's architecture with its overrides plus the data's sizes (which must agree)."""
    decided = data_model_config(data)
    clashes = {
        key: (recipe.model_config[key], value)
        for key, value in decided.items()
        if key in recipe.model_config and recipe.model_config[key] != value
    }
    if clashes:
        raise ValueError(f"model_config disagrees with the dataset (recipe, data): {clashes}")
    return build_model(recipe.architecture, {**recipe.model_config, **decided})


# ---- optimisation ---------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, total: int, warmup_fraction: float) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay from 1 to 0.1."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _optimiser(
    model: StatefulModel, recipe: TrainingRecipe, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: warmup_cosine(step, total_steps, recipe.warmup_fraction)
    )
    return optimiser, schedule


def _update(model, optimiser, schedule, loss: Tensor, grad_clip: float) -> None:
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimiser.step()
    schedule.step()


def _add_noise(
    inputs: Tensor, std: float, value_range: tuple[float, float], generator: torch.Generator
) -> Tensor:
    """Gaussian noise augmentation, clipped back into the data's value range."""
    noise = torch.randn(inputs.shape, generator=generator) * std  # [b, T, F]
    return (inputs + noise).clamp(value_range[0], value_range[1])


def step_loss_weights(step_loss: str, n_steps: int) -> Tensor:
    """Weight of each step's cross-entropy in a classifier's loss, summing to 1: [T].

    "last" trains only the answer after the whole sequence, so answers after fewer steps come
    out near chance. The others train the answer after every step t (what a session that
    has read t steps is served) with weight t ** power: "uniform" (1), "linear" (t) or
    "quadratic" (t²; with T = 8 the final step keeps 64/204 of the loss). A later step has
    read more, so it weighs more; the steeper the schedule, the less the final answer gives
    up for the early ones.
    """
    if step_loss == "last":
        weights = torch.zeros(n_steps)  # [T]
        weights[-1] = 1.0
    elif step_loss in STEP_LOSS_POWERS:
        steps = torch.arange(1, n_steps + 1, dtype=torch.float32)  # [T]
        weights = steps ** STEP_LOSS_POWERS[step_loss]  # [T]
    else:
        raise ValueError(f"step_loss must be one of {', '.join(STEP_LOSSES)}, got {step_loss!r}")
    return weights / weights.sum()


def step_cross_entropy(logits: Tensor, labels: Tensor, step_loss: str) -> Tensor:
    """sum_t w_t * mean_b CE(logits[b, t], labels[b]) for logits [B, T, C], labels [B], with
    w = step_loss_weights(step_loss, T)."""
    if step_loss == "last":
        # Not the weighted sum with zeros: that rounds differently, and the recipes trained
        # before step_loss existed must reproduce bit for bit.
        return F.cross_entropy(logits[:, -1], labels)
    weights = step_loss_weights(step_loss, logits.shape[1]).to(logits.dtype)  # [T]
    targets = labels[:, None].expand(logits.shape[:2])  # [B, T]
    per_step = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, T]
    return (per_step.mean(dim=0) * weights).sum()


def spiking_forward(model: StatefulModel):
    """The model's `forward_with_activity`; a recipe's spike_penalty needs one."""
    forward = getattr(model, "forward_with_activity", None)
    if forward is None:
        raise ValueError(f"spike_penalty needs a spiking model, got {type(model).__name__}")
    return forward


def fit_classifier(
    model: StatefulModel, train: SequenceDataset, recipe: TrainingRecipe, progress: bool = True
) -> list[float]:
    """Minimise cross-entropy of the logits after each step, weighted by the recipe's
    `step_loss` (default: the last step only); returns the per-batch losses."""
    batches_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total = recipe.epochs * batches_per_epoch
    optimiser, schedule = _optimiser(model, recipe, total)
    generator = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    model.train()
    with tqdm(total=total, desc="train", disable=not progress, leave=False) as bar:
        for epoch in range(recipe.epochs):
            order = torch.randperm(len(train), generator=generator)
            correct = seen = 0
            for start in range(0, len(train), recipe.batch_size):
                batch = order[start : start + recipe.batch_size]
                inputs = train.inputs[batch]  # [b, T, F]
                if recipe.input_noise > 0:
                    inputs = _add_noise(inputs, recipe.input_noise, train.value_range, generator)
                labels = train.labels[batch]  # [b]
                if recipe.spike_penalty > 0:
                    logits, _, activity = spiking_forward(model)(inputs)  # [b, T, C]
                    rate = activity["spikes"].sum() / activity["neurons"].sum()
                    loss = step_cross_entropy(logits, labels, recipe.step_loss)
                    loss = loss + recipe.spike_penalty * rate
                else:
                    logits = model(inputs)[0]  # [b, T, C]
                    loss = step_cross_entropy(logits, labels, recipe.step_loss)
                _update(model, optimiser, schedule, loss, recipe.grad_clip)
                losses.append(loss.item())
                correct += int((logits[:, -1].argmax(-1) == labels).sum())
                seen += len(batch)
                bar.update(1)
                bar.set_postfix(
                    epoch=epoch + 1, loss=f"{losses[-1]:.3f}", acc=f"{correct / seen:.3f}"
                )
    model.eval()
    return losses


def fit_language_model(
    model: StatefulModel, corpus: CharCorpus, recipe: TrainingRecipe, progress: bool = True
) -> list[float]:
    """Minimise next-token cross-entropy (plus the model's auxiliary loss, if it has one) on
    random windows; returns the per-step cross-entropies (nats)."""
    ids = corpus.train_ids
    if len(ids) < recipe.seq_len + 2:
        raise ValueError(f"{corpus.name}: {len(ids)} training tokens, need > seq_len + 1")
    optimiser, schedule = _optimiser(model, recipe, recipe.steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    offsets = torch.arange(recipe.seq_len + 1)  # [L+1]
    losses: list[float] = []
    model.train()
    with tqdm(total=recipe.steps, desc="train", disable=not progress, leave=False) as bar:
        for _ in range(recipe.steps):
            starts = torch.randint(
                0, len(ids) - recipe.seq_len - 1, (recipe.batch_size,), generator=generator
            )
            windows = ids[starts[:, None] + offsets]  # [B, L+1]
            logits = model(windows[:, :-1])[0]  # [B, L, V]
            loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
            auxiliary = model.pop_auxiliary_loss()  # e.g. routed experts' load balance
            total = loss if auxiliary is None else loss + auxiliary
            _update(model, optimiser, schedule, total, recipe.grad_clip)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", bpc=f"{losses[-1] / math.log(2):.3f}")
    model.eval()
    return losses


# ---- evaluation and publishing --------------------------------------------------------------


def evaluate_trained(
    model: StatefulModel, data: ClassificationData | LanguageData
) -> dict[str, Any]:
    """Held-out metrics stored in config.json."""
    if isinstance(data, LanguageData):
        corpus = data.corpus
        return {
            "valid_bpc": bits_per_character(model, corpus.valid_ids),
            "unigram_valid_bpc": unigram_bits_per_character(
                corpus.train_ids, corpus.valid_ids, corpus.vocab_size
            ),
            "valid_tokens": corpus.valid_ids.numel(),
        }
    metrics: dict[str, Any] = {}
    for split, dataset in data.evaluation.items():
        for key, value in classification_metrics(model, dataset).items():
            metrics[f"{split}_{key}"] = value
    if "test" in data.evaluation:
        try:
            spikes = spike_statistics(model, data.evaluation["test"])
        except ValueError:  # not a spiking model
            spikes = {}
        metrics.update({f"test_{key}": value for key, value in spikes.items()})
    return metrics


def neuroserve_version() -> str:
    try:
        return metadata.version("neuroserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def artifact_config(
    recipe: TrainingRecipe,
    model: StatefulModel,
    data: ClassificationData | LanguageData,
    metrics: dict[str, Any],
    command: str,
) -> dict[str, Any]:
    """config.json content (publish adds name, version and the hashes)."""
    config: dict[str, Any] = {
        "architecture": recipe.architecture,
        "model_config": config_to_dict(model.config),
    }
    if isinstance(data, LanguageData):
        corpus = data.corpus
        config["task"] = "language-model"
        config["vocabulary"] = list(corpus.vocabulary)
        config["input"] = {"kind": "tokens", "vocab_size": corpus.vocab_size}
        splits = {"train": corpus.train_ids.numel(), "valid": corpus.valid_ids.numel()}
        dataset_name = corpus.name
    else:
        train = data.train
        config["task"] = "classification"
        config["labels"] = list(train.label_names)
        config["input"] = {
            "kind": "features",
            "features": train.n_features,
            "steps": train.n_steps,
            "dtype": "float32",
            "value_range": list(train.value_range),
        }
        splits = {"train": len(train), **{k: len(v) for k, v in data.evaluation.items()}}
        dataset_name = train.name
    config["dataset"] = {"spec": recipe.dataset, "name": dataset_name, "split_sizes": splits}
    config["training"] = asdict(recipe)
    config["provenance"] = {
        "data_sha256": data.sha256,
        "seed": recipe.seed,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "neuroserve_version": neuroserve_version(),
    }
    config["metrics"] = metrics
    return config


def current_command() -> str:
    """This process's command line, shell-quoted, with the program named by its basename
    (".venv/bin/neuroserve train ..." is recorded as "neuroserve train ...", and so is
    "python -m service.cli train ...", the same command)."""
    program = Path(sys.argv[0]).name
    if program == "__main__.py":
        program = "neuroserve"
    return shlex.join([program, *sys.argv[1:]])


def train_and_publish(
    recipe: TrainingRecipe,
    repository: ModelRepository,
    name: str,
    command: str | None = None,
    progress: bool = True,
) -> ModelCard:
    """Train `recipe` from scratch, evaluate it and publish it as the next version of `name`."""
    seed_everything(recipe.seed)
    data = load_training_data(recipe.dataset, recipe.seed)
    model = build_for_data(recipe, data)
    if isinstance(data, LanguageData):
        fit_language_model(model, data.corpus, recipe, progress)
    else:
        fit_classifier(model, data.train, recipe, progress)
    metrics = evaluate_trained(model, data)
    config = artifact_config(recipe, model, data, metrics, command or current_command())
    return repository.publish(name, config, model.state_dict())
