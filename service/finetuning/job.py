"""The fine-tuning job: data -> zeroth-order tuning with early stopping -> recalibration ->
an atomically published trajectory version.

`run_finetune(spec, repository, progress=..., should_cancel=...)` depends only on its
arguments and the repository on disk, so a job worker can run it anywhere. Its spec and
reports (`FinetuneSpec`, `ProgressEvent`, `FinetuneResult`) are in `service.finetuning.spec`.

Data and splits (deterministic):
- built-in `digits-seq` with an optional shift: tune and validation come from the fixed
  digits train split (its last `validation_fraction`, after a seeded shuffle, validates);
  calibration and test are the fixed calibration and test splits, images the base models
  never trained on;
- inline examples or an uploaded `.npz`: one seeded permutation cut into test, calibration,
  validation and tune parts by the spec's fractions.

Tuning runs `steps` ZO steps (`models.zo`) on minibatches of the tune split through the
job's backend (`service.finetuning.forward`). Every `eval_every` steps (and at the start and
the end) the current weights are scored on the validation split; the best evaluation
(accuracy, then lower loss, then fewer steps) names the checkpoint, and the trajectory
truncated there is what gets published. `patience` stops a run after that many evaluations
without improvement, and a run whose loss stops being finite ends there ("diverged") with
its best checkpoint kept.

Recalibration: the chosen weights are rebuilt by replaying the truncated trajectory, their
logits on the calibration split (never seen by tuning) fit a calibration per step for the
job's backend, stored as `calibration/<backend>.json` + `.safetensors` in the new version,
and one for every other backend its base version is calibrated on.

Publishing is guarded (`service.finetuning.promotion`): the version is always published, but
becomes `latest` only when the job asked, its test accuracy beat the base's by more than the
comparison's noise, and it is calibrated on every backend its base was.
For comparison the base model gets the same treatment: its calibration is refitted on the
same split, and both are scored on the test split (accuracy, ECE, NLL, coverage and mean
set size at the spec's alpha and score).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import numpy as np
import torch
from torch import Tensor

from calibration.metrics import expected_calibration_error, negative_log_likelihood
from calibration.positional import PositionalCalibration, fit_stepwise_calibration
from models import digits
from models.base import StatefulModel
from models.datasets import SequenceDataset
from models.finetune import attach_targets, merge_targets
from models.repository import ModelCard, ModelRepository
from models.trajectory import BaseReference, Trajectory, rebuild_weights, tensor_digest
from models.trajectory_publish import publish_trajectory_version
from models.userdata import load_npz_dataset
from models.zo import (
    EstimateNoise,
    ZOOptimizer,
    choose_eps,
    estimate_noise,
    learning_rate,
)
from service.finetuning.forward import BackendForward
from service.finetuning.promotion import (
    JobCancelled,
    base_backends,
    calibrate_on_backends,
    check_output_name,
    decide,
    lineage_of,
)
from service.finetuning.spec import (
    BuiltinData,
    EvaluationPoint,
    FinetuneResult,
    FinetuneSpec,
    HeldOutMetrics,
    InlineData,
    ProgressEvent,
    StopReason,
)

MIN_CALIBRATION_EXAMPLES = 8  # fit_calibration_artifact needs 4 to tune and 1 to score
PROGRESS_UPDATES = 100  # progress reports per run, besides stage changes and evaluations

# ---- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneData:
    tune: SequenceDataset
    validation: SequenceDataset
    calibration: SequenceDataset
    test: SequenceDataset
    description: str

    @property
    def sha256(self) -> str:
        parts = (self.tune, self.validation, self.calibration, self.test)
        return hashlib.sha256("\n".join(d.sha256 for d in parts).encode()).hexdigest()

    @property
    def split_sizes(self) -> dict[str, int]:
        return {
            "tune": len(self.tune),
            "validation": len(self.validation),
            "calibration": len(self.calibration),
            "test": len(self.test),
        }


def load_finetune_data(spec: FinetuneSpec, labels: list[str], d_input: int) -> FinetuneData:
    """The spec's data split four ways; ValueError when it cannot serve this model."""
    source = spec.data
    if isinstance(source, BuiltinData):
        data = _builtin_splits(source, spec)
    else:
        if isinstance(source, InlineData):
            inputs = np.asarray(source.inputs, dtype=np.float32)  # [N, T, F]
            name = f"inline/{len(source.labels)}"
            dataset = SequenceDataset.from_arrays(name, inputs, np.asarray(source.labels), labels)
        else:
            dataset = load_npz_dataset(source.path)
        data = _random_splits(dataset, spec)
    for name, part in (("tune", data.tune), ("test", data.test)):
        if part.n_features != d_input:
            raise ValueError(
                f"the model reads {d_input} features per step, the data has {part.n_features}"
            )
        if part.label_names != labels:
            raise ValueError(
                f"{name} data labels {part.label_names} differ from the model's {labels}"
            )
    sizes = data.split_sizes
    if min(sizes.values()) < 1 or sizes["calibration"] < MIN_CALIBRATION_EXAMPLES:
        raise ValueError(
            f"too little data for tuning, validation, calibration (>= {MIN_CALIBRATION_EXAMPLES}) "
            f"and test: the splits would be {sizes}"
        )
    return data


def _builtin_splits(source: BuiltinData, spec: FinetuneSpec) -> FinetuneData:
    def split(name: str) -> SequenceDataset:
        return digits.load_digits_seq(name, source.variant, source.shift, source.shift_seed)

    train = split("train")
    order = np.random.default_rng([spec.seed, 0]).permutation(len(train))
    n_validation = max(1, round(len(train) * spec.validation_fraction))
    return FinetuneData(
        tune=train.subset(np.sort(order[n_validation:]), f"{train.name}/tune"),
        validation=train.subset(np.sort(order[:n_validation]), f"{train.name}/validation"),
        calibration=split("calibration"),
        test=split("test"),
        description=f"{source.name}:{source.variant}/{source.shift or 'unshifted'}",
    )


def _random_splits(dataset: SequenceDataset, spec: FinetuneSpec) -> FinetuneData:
    n = len(dataset)
    order = np.random.default_rng([spec.seed, 0]).permutation(n)
    fractions = (spec.test_fraction, spec.calibration_fraction, spec.validation_fraction)
    sizes = [round(n * fraction) for fraction in fractions]
    bounds = np.cumsum([0, *sizes])
    parts = [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    parts.append(np.sort(order[bounds[-1] :]))
    test, calibration, validation, tune = (
        dataset.subset(idx, f"{dataset.name}/{name}")
        for idx, name in zip(parts, ("test", "calibration", "validation", "tune"), strict=True)
    )
    return FinetuneData(tune, validation, calibration, test, dataset.name)


# ---- tuning with early stopping ------------------------------------------------------------


@dataclass
class TuningOutcome:
    trajectory: Trajectory  # every step run
    history: list[EvaluationPoint]
    best_step: int  # the checkpoint: steps applied at the best evaluation
    stop_reason: StopReason  # all steps ran, no progress for `patience`, non-finite, cancelled
    tuned_parameters: int = 0
    eps: float | None = None
    noise_floor: float | None = None
    eps_signal: float | None = None
    loss_noise: float | None = None


def _evaluate(forward: BackendForward, data: SequenceDataset, step: int) -> EvaluationPoint:
    logits = forward.final_logits(data.inputs)  # [N, C], on the chip the job deploys to
    accuracy = float((logits.argmax(dim=-1) == data.labels).float().mean())
    loss = float(torch.nn.functional.cross_entropy(logits, data.labels))
    if not math.isfinite(loss):
        raise FloatingPointError(f"the validation loss after step {step} is {loss}")
    return EvaluationPoint(step=step, validation_accuracy=accuracy, validation_loss=loss)


def _better(point: EvaluationPoint, best: EvaluationPoint) -> bool:
    """Higher accuracy wins, then lower loss; a tie keeps the earlier (shorter) checkpoint."""
    return (point.validation_accuracy, -point.validation_loss) > (
        best.validation_accuracy,
        -best.validation_loss,
    )


class _Batches:
    """Seeded minibatches of the tune split, reshuffled every epoch."""

    def __init__(self, data: SequenceDataset, batch_size: int, seed: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.rng = np.random.default_rng([seed, 1])
        self.order, self.cursor = self.rng.permutation(len(data)), 0

    def peek(self) -> tuple[Tensor, Tensor]:
        """The first batch of the first epoch, without consuming it."""
        index = torch.from_numpy(self.order[: self.batch_size])
        return self.data.inputs[index], self.data.labels[index]

    def next(self) -> tuple[Tensor, Tensor]:
        if self.cursor + self.batch_size > len(self.order):
            self.order, self.cursor = self.rng.permutation(len(self.data)), 0
        index = torch.from_numpy(self.order[self.cursor : self.cursor + self.batch_size])
        self.cursor += self.batch_size
        return self.data.inputs[index], self.data.labels[index]  # [b, T, F], [b]


NOISE_PROBES = 8  # directions measured for each candidate ε
SECOND_DRAW = 1_000_003  # offset of the noise seeds of the second measurement


@dataclass(frozen=True)
class EpsProbe:
    estimate: EstimateNoise  # the chosen ε, its signal and the estimate's noise floor
    loss_noise: float  # SD of one loss reading repeated at the same weights (fresh noise)


def measure_eps(
    model: StatefulModel, spec: FinetuneSpec, batch: tuple[Tensor, Tensor]
) -> EpsProbe | None:
    """Resolve `spec.eps`: as given (no measurement, None), or the smallest candidate ε whose
    loss difference clears the noise floor of the job's backend (`models.zo.choose_eps`).
    Also measures the spread of one loss reading at the base weights, each reading with its
    own noise draws. Candidates are tried on throw-away copies, so the tuned weights are
    snapped only once."""
    if spec.eps != "auto":
        return None
    inputs, labels = batch

    def loss(forward: BackendForward, offset: int):
        def at(seed: int) -> float:
            noise_seed = seed + offset if spec.common_noise else None
            return forward.loss(inputs, labels, spec.objective, noise_seed=noise_seed)

        return at

    def measure(eps: float) -> EstimateNoise:
        trial = copy.deepcopy(model)
        optimizer = ZOOptimizer(attach_targets(trial, spec.parameters), spec.zo_config(eps))
        forward = BackendForward(trial, spec.backend, spec.backend_options)
        first, second = loss(forward, 0), loss(forward, SECOND_DRAW)
        return estimate_noise(optimizer, first, second, range(NOISE_PROBES))

    forward = BackendForward(model, spec.backend, spec.backend_options)
    readings = [loss(forward, 2 * SECOND_DRAW)(seed) for seed in range(NOISE_PROBES)]
    return EpsProbe(choose_eps(measure), float(np.std(readings, ddof=1)))


def tune(
    model: StatefulModel,
    spec: FinetuneSpec,
    data: FinetuneData,
    base_ref: BaseReference,
    progress: Callable[[ProgressEvent], None],
    should_cancel: Callable[[], bool],
) -> TuningOutcome:
    """Run up to `spec.steps` ZO steps on `model` in place, evaluating as it goes."""
    batches = _Batches(data.tune, spec.batch_size, spec.seed)
    probe = measure_eps(model, spec, batches.peek())
    eps = spec.eps if probe is None else probe.estimate.eps
    optimizer = ZOOptimizer(attach_targets(model, spec.parameters), spec.zo_config(eps))
    trajectory = Trajectory(base_ref, optimizer.config, spec.parameters, optimizer.names)
    forward = BackendForward(model, spec.backend, spec.backend_options)
    done = functools.partial(
        TuningOutcome,
        tuned_parameters=optimizer.n_parameters,
        eps=eps,
        noise_floor=None if probe is None else probe.estimate.noise_floor,
        eps_signal=None if probe is None else probe.estimate.signal,
        loss_noise=None if probe is None else probe.loss_noise,
    )
    message = f"eps {eps:g} (given)"
    if probe is not None:
        message = (
            f"eps {eps:g} (auto): median |L+ - L-| {probe.estimate.signal:.3g}, "
            f"noise floor {probe.estimate.noise_floor:.3g}, "
            f"loss reading SD {probe.loss_noise:.3g}"
        )
    progress(ProgressEvent(stage="tuning", total_steps=spec.steps, message=message))
    seeds = np.random.default_rng([spec.seed, 2])
    history = [_evaluate(forward, data.validation, 0)]
    best, since_best = history[0], 0
    report_every = max(1, math.ceil(spec.steps / PROGRESS_UPDATES))

    def report(step: int, best_step: int, **fields: Any) -> None:
        at = {"step": step, "total_steps": spec.steps, "best_step": best_step}
        progress(ProgressEvent(stage="tuning", **at, **fields))

    for step in range(1, spec.steps + 1):
        if should_cancel():
            return done(trajectory, history, best.step, "cancelled")
        inputs, labels = batches.next()
        lr = learning_rate(step - 1, spec.steps, spec.lr, spec.schedule, spec.min_lr_fraction)
        step_seeds = [int(s) for s in seeds.integers(0, 2**32, size=spec.n_perturbations)]

        def loss(seed: int, inputs: Tensor = inputs, labels: Tensor = labels) -> float:
            noise_seed = seed if spec.common_noise else None  # None: the noise runs on
            return forward.loss(inputs, labels, spec.objective, noise_seed=noise_seed)

        try:
            result = optimizer.step(step_seeds, loss, lr)  # refused before any weight moves
            trajectory.append(step_seeds, result.projected_grads, lr)
            evaluated = step % spec.eval_every == 0 or step == spec.steps
            point = _evaluate(forward, data.validation, step) if evaluated else None
        except FloatingPointError as error:
            report(trajectory.n_steps, best.step, message=f"diverged: {error}")
            return done(trajectory, history, best.step, "diverged")
        if point is not None:
            history.append(point)
            best, since_best = (point, 0) if _better(point, best) else (best, since_best + 1)
        if point is not None or step % report_every == 0:
            accuracy = point.validation_accuracy if point is not None else None
            train_loss = float(np.mean(result.losses))
            report(step, best.step, train_loss=train_loss, validation_accuracy=accuracy)
        if point is not None and spec.patience is not None and since_best >= spec.patience:
            return done(trajectory, history, best.step, "patience")
    return done(trajectory, history, best.step, "steps")


# ---- recalibration and held-out metrics ------------------------------------------------------


def calibrate_and_score(
    forward: BackendForward, data: FinetuneData, spec: FinetuneSpec, name: str, version: str
) -> tuple[PositionalCalibration, HeldOutMetrics, Tensor]:
    """Fit a calibration per step on the calibration split and score its last step (the
    whole sequence) on the test split; also which test examples the model's argmax got
    right ([Nt] bool, for the promotion margin)."""
    calibration_logits = forward.step_logits(data.calibration.inputs)  # [Nc, T, C]
    positional = fit_stepwise_calibration(
        calibration_logits, data.calibration.labels, name, version, spec.backend, seed=spec.seed
    )
    test_logits = forward.final_logits(data.test.inputs)  # [Nt, C]
    labels = data.test.labels
    artifact = positional.at(data.test.inputs.shape[1])
    if artifact is None:
        raise ValueError(
            f"the test sequences ({data.test.inputs.shape[1]} steps) are longer than the "
            f"calibration sequences ({positional.horizon} steps)"
        )
    rng = torch.Generator().manual_seed(spec.seed)  # randomised scores draw from it
    probs, sets = artifact.predict(test_logits, spec.alpha, spec.score, rng=rng)  # [Nt, C] each
    metrics = HeldOutMetrics(
        accuracy=float((test_logits.argmax(dim=1) == labels).double().mean()),
        calibrated_accuracy=float((probs.argmax(dim=1) == labels).double().mean()),
        ece=expected_calibration_error(probs, labels),
        nll=negative_log_likelihood(probs, labels),
        coverage=float(sets[torch.arange(len(labels)), labels].double().mean()),
        mean_set_size=float(sets.sum(dim=1).double().mean()),
        n=len(labels),
    )
    return positional, metrics, test_logits.argmax(dim=1) == labels


# ---- the job -----------------------------------------------------------------------------------


def _version_config(
    spec: FinetuneSpec,
    data: FinetuneData,
    result: FinetuneResult,
    base: ModelCard,
) -> dict[str, Any]:
    """What the new version's config.json says beyond its base's: data, provenance, metrics."""
    try:
        version = metadata.version("neuroserve")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "lineage": lineage_of(base),
        "dataset": {"spec": data.description, "split_sizes": data.split_sizes},
        "provenance": {
            "data_sha256": data.sha256,
            "seed": spec.seed,
            "command": f"run_finetune(FinetuneSpec(**finetune.spec)) on {base.name}/{base.version}",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "neuroserve_version": version,
        },
        "metrics": {f"test_{key}": value for key, value in result.after.model_dump().items()},
        "finetune": {
            "spec": spec.summary(),
            **result.model_dump(
                mode="json", exclude={"status", "version", "model", "wall_seconds"}
            ),
        },
    }


def _check_replay(model: StatefulModel, base: StatefulModel, trajectory: Trajectory) -> None:
    """The published version is rebuilt by replay: make sure replay gives the tuned weights."""
    replayed, _ = rebuild_weights(base, trajectory)
    for (name, tuned), again in zip(model.named_parameters(), replayed.parameters(), strict=True):
        if not torch.equal(tuned, again):
            raise RuntimeError(f"replaying the trajectory did not reproduce {name} bit for bit")


def run_finetune(
    spec: FinetuneSpec,
    repository: ModelRepository,
    *,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    before_publish: Callable[[], None] | None = None,
) -> FinetuneResult:
    """Tune `spec.model` on `spec.data`, recalibrate and publish a trajectory version, made
    `latest` only as `service.finetuning.promotion` allows (the result's `promotion`).

    `progress` receives a `ProgressEvent` at every stage, every evaluation and about every
    1% of the steps; `should_cancel` is polled before every step, between calibrations and
    before publishing, and a cancelled job publishes nothing. `before_publish` runs just
    before the version is written and raises to stop it (a job runner's fencing token).
    Errors propagate; a failure leaves no version behind.
    """
    started = time.monotonic()
    report = progress or (lambda event: None)
    cancelled = should_cancel or (lambda: False)
    report(ProgressEvent(stage="loading", total_steps=spec.steps, message=spec.model))
    base = repository.load(spec.model, spec.version)
    if base.card.config["task"] != "classification":
        raise ValueError(f"{spec.model} is a {base.card.config['task']} model, not a classifier")
    data = load_finetune_data(spec, list(base.card.config["labels"]), base.model.config.d_input)
    base_ref = BaseReference(base.card.name, base.card.version, base.card.config["weights_sha256"])

    report(ProgressEvent(stage="tuning", total_steps=spec.steps, message=data.description))
    model = copy.deepcopy(base.model)  # the repository's cached base stays untouched
    outcome = tune(model, spec, data, base_ref, report, cancelled)
    merge_targets(model)  # adapters folded into plain weights, as replay does
    steps_run = outcome.trajectory.n_steps
    result = FinetuneResult(
        status="cancelled",
        model=spec.target_name,
        version=None,
        base_model=base.card.name,
        base_version=base.card.version,
        backend=spec.backend,
        steps_run=steps_run,
        best_step=outcome.best_step,
        stop_reason=outcome.stop_reason,
        history=outcome.history,
        alpha=spec.alpha,
        score=spec.score,
        split_sizes=data.split_sizes,
        data_sha256=data.sha256,
        tuned_parameters=outcome.tuned_parameters,
        eps=outcome.eps,
        noise_floor=outcome.noise_floor,
        eps_signal=outcome.eps_signal,
        loss_noise=outcome.loss_noise,
        seed=spec.seed,
    )
    at = {"step": steps_run, "total_steps": spec.steps, "best_step": outcome.best_step}
    stopped = outcome.stop_reason == "cancelled"
    if not stopped:
        report(ProgressEvent(stage="calibrating", **at))
        _check_replay(model, base.model, outcome.trajectory)
        checkpoint = outcome.trajectory.truncated(outcome.best_step)
        tuned, tensors = rebuild_weights(base.model, checkpoint)
        forward = functools.partial(
            BackendForward, backend=spec.backend, options=spec.backend_options
        )
        _, result.before, correct_before = calibrate_and_score(
            forward(base.model), data, spec, base.card.name, base.card.version
        )
        stopped = cancelled()
    if not stopped:
        artifact, result.after, correct_after = calibrate_and_score(
            forward(tuned.eval()), data, spec, spec.target_name, "0"
        )
        required = base_backends(repository, base.card)
        try:
            others, used, errors = calibrate_on_backends(
                tuned,
                {b: options for b, options in required.items() if b != spec.backend},
                data.calibration,
                spec.target_name,
                spec.seed,
                cancelled,
            )
        except JobCancelled:
            stopped = True
    if stopped or cancelled():
        report(ProgressEvent(stage="cancelled", **at, message="nothing was published"))
        result.wall_seconds = time.monotonic() - started
        return result

    report(ProgressEvent(stage="publishing", **at))
    check_output_name(repository, spec.target_name, base.card)  # again: names change
    result.promotion = decide(
        requested=spec.promote,
        z=spec.promotion_z,
        correct_before=correct_before,
        correct_after=correct_after,
        required=list(required),
        calibrated=[spec.backend, *used],
        calibration_errors=errors,
        new_model=not repository.versions(spec.target_name),
    )
    source = {"data": data.description, "data_sha256": data.sha256}
    serving = {
        backend: {"backend_options": options, "source": source}
        for backend, options in {spec.backend: dict(spec.backend_options or {}), **used}.items()
    }
    if before_publish is not None:
        before_publish()
    card = publish_trajectory_version(
        repository,
        spec.target_name,
        base.card,
        checkpoint,
        tensor_digest(tensors),
        _version_config(spec, data, result, base.card),
        calibrations=[artifact, *others],
        serving=serving,
        promote=result.promotion.promoted,
    )
    result.status, result.version = "completed", card.version
    result.promotion.latest = repository.latest(card.name)
    result.trajectory_bytes = len(checkpoint.to_json_bytes())
    result.wall_seconds = time.monotonic() - started
    verdict = "promoted to latest" if result.promotion.promoted else "not promoted"
    message = f"published {card.name}/{card.version}, {verdict}: {result.promotion.reason}"
    report(ProgressEvent(stage="done", **at, message=message))
    return result
