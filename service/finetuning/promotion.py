"""Guarded promotion: when a fine-tuned version may become `latest`.

A job always publishes its checkpoint as a *candidate* version; `latest` (what every request
without a version gets) moves to it only when all three hold:

1. the job asked for it (`FinetuneSpec.promote`, the default);
2. its held-out accuracy beat the base's by more than the noise of that comparison. Both are
   scored on the same test examples, so the difference is paired: with d_i = correct_after_i
   - correct_before_i in {-1, 0, 1}, the improvement is mean(d) and its standard error
   std(d) / sqrt(n) is how much the improvement would move from one test split of n examples
   to another (the binomial noise of the two accuracies, less what they share; McNemar's
   test reads the same discordant pairs). The improvement must exceed `promotion_z` (1.645,
   one-sided 95%) standard errors, and be positive;
3. it is calibrated on every backend its base version was calibrated on, so no unpinned
   request that worked before gets 409 "not calibrated" after. The job fits those
   calibrations itself, on its own calibration split, with the backend options of the base's
   calibration (`calibrate_on_backends`); a backend it cannot fit is named with the reason.

An `output_name` that names a model of another lineage (another architecture, or versions
that do not descend from the job's base model) is refused: `check_output_name`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from calibration.positional import PositionalCalibration, fit_stepwise_calibration
from hardware_backends import registry
from models.base import StatefulModel
from models.datasets import SequenceDataset
from models.repository import ModelCard, ModelRepository, VersionConflictError
from models.trajectory import load_serving
from service.dataplane.calibration_data import readout_logits
from service.dataplane.calibration_store import CalibrationStore
from service.finetuning.spec import PromotionDecision

RUN_BATCH = 256  # sequences per backend call while calibrating


class JobCancelled(Exception):
    """The job was cancelled (or lost its ownership) between two stages of its work."""


# ---- lineage -----------------------------------------------------------------------------------


def lineage_of(card: ModelCard) -> str:
    """The model a version descends from: a tuned version records its base's lineage
    (`lineage` in config.json); anything else is its own."""
    return str(card.config.get("lineage") or card.name)


def check_output_name(repository: ModelRepository, target: str, base: ModelCard) -> None:
    """VersionConflictError when `target` already holds a model that the tuned `base` must
    not join: another architecture, another model configuration or labels, or another
    lineage (a model trained separately). Tuning into a new name or into its own is fine."""
    if not repository.versions(target):
        return
    existing = repository.card(target)
    why = None
    if existing.config["architecture"] != base.config["architecture"]:
        why = (
            f"it is a {existing.config['architecture']} model and {base.name} is a "
            f"{base.config['architecture']} one"
        )
    elif existing.config.get("state_schema_hash") != base.config.get("state_schema_hash") or (
        existing.config.get("labels") != base.config.get("labels")
    ):
        why = "its model configuration or labels differ from the base's"
    elif lineage_of(existing) != lineage_of(base):
        why = f"its versions descend from {lineage_of(existing)!r}, not from {lineage_of(base)!r}"
    if why is not None:
        raise VersionConflictError(
            f"output_name {target!r} names an existing model of another lineage ({why}); "
            f"publishing there would replace it for everyone. Choose a new output_name, or "
            f"leave it out to publish a new version of {base.name}"
        )


# ---- the accuracy margin ----------------------------------------------------------------------


def accuracy_margin(
    correct_before: Tensor, correct_after: Tensor, z: float
) -> tuple[float, float, float]:
    """(improvement, standard error, margin = z * standard error) of the paired accuracy
    difference over the same examples: correct_* are [N] booleans."""
    d = correct_after.double() - correct_before.double()  # [N] in {-1, 0, 1}
    n = d.numel()
    improvement = float(d.mean())
    standard_error = float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf
    return improvement, standard_error, z * standard_error


# ---- calibration on the base's backends -------------------------------------------------------


def base_backends(repository: ModelRepository, base: ModelCard) -> dict[str, dict]:
    """Backend -> the backend options of the base version's calibration for it (the
    backends the server would answer calibrated on: one calibration file each)."""
    backends = CalibrationStore(repository).calibrated_backends(base.name, base.version)
    return {
        backend: dict(load_serving(base, backend).get("backend_options") or {})
        for backend in backends
    }


def backend_step_logits(
    model: StatefulModel, backend: str, options: dict, inputs: Tensor
) -> Tensor:
    """inputs [N, T, F] -> the logits after every step on `backend`, float64 [N, T, C] (the
    log predictive mean for a sampling backend, as the server reads it). A private backend
    instance prepares the model, so no server cache holds the candidate."""
    instance = type(registry.get_backend(backend))()
    runner = instance.prepare(model, model_key=f"finetune-candidate/{backend}", options=options)
    parts = [
        readout_logits(runner.run(inputs[start : start + RUN_BATCH])[0])  # [b, T, C]
        for start in range(0, inputs.shape[0], RUN_BATCH)
    ]
    return torch.cat(parts)  # [N, T, C]


def calibrate_on_backends(
    model: StatefulModel,
    backends: dict[str, dict],
    data: SequenceDataset,
    name: str,
    seed: int,
    should_stop: Callable[[], bool],
) -> tuple[list[PositionalCalibration], dict[str, dict], dict[str, str]]:
    """Fit `model`'s calibration on each backend (with its options) on `data`:
    (calibrations, backend -> options used, backend -> why it failed). JobCancelled when
    `should_stop` turns true between two backends."""
    fitted, used, errors = [], {}, {}
    for backend, options in backends.items():
        if should_stop():
            raise JobCancelled(f"stopped before calibrating on {backend}")
        try:
            logits = backend_step_logits(model, backend, options, data.inputs)
            fitted.append(
                fit_stepwise_calibration(logits, data.labels, name, "0", backend, seed=seed)
            )
            used[backend] = options
        except Exception as error:  # a backend that cannot run here is reported, not fatal
            errors[backend] = f"{type(error).__name__}: {error}"
    return fitted, used, errors


# ---- the decision -----------------------------------------------------------------------------


def decide(
    *,
    requested: bool,
    z: float,
    correct_before: Tensor,
    correct_after: Tensor,
    required: Sequence[str],
    calibrated: Sequence[str],
    calibration_errors: dict[str, str],
    new_model: bool,
) -> PromotionDecision:
    """Whether the candidate becomes latest (see the module docstring), with the figures."""
    improvement, standard_error, margin = accuracy_margin(correct_before, correct_after, z)
    n = int(correct_after.numel())
    missing = [backend for backend in required if backend not in calibrated]
    refusals = []
    if not (improvement > 0 and improvement > margin):
        refusals.append(
            f"held-out accuracy changed by {improvement:+.4f} ({n} test examples), not more "
            f"than the margin {margin:.4f} = {z:g} x its standard error {standard_error:.4f}"
        )
    if missing:
        details = "; ".join(f"{b}: {calibration_errors.get(b, 'not fitted')}" for b in missing)
        refusals.append(
            f"the base is calibrated on {sorted(required)} but the new version could not be "
            f"calibrated on {missing} ({details})"
        )
    if new_model:
        promoted, reason = True, "the first version of a new model is its latest"
    elif not requested:
        promoted, reason = False, "the job did not ask to promote (promote: false)"
    elif refusals:
        promoted, reason = False, "not promoted: " + "; and ".join(refusals)
    else:
        promoted = True
        reason = (
            f"held-out accuracy improved by {improvement:+.4f}, beyond the margin "
            f"{margin:.4f}, and the version is calibrated on every backend its base was"
        )
    return PromotionDecision(
        requested=requested,
        promoted=promoted,
        reason=reason,
        accuracy_before=float(correct_before.double().mean()),
        accuracy_after=float(correct_after.double().mean()),
        improvement=improvement,
        standard_error=standard_error if math.isfinite(standard_error) else None,
        margin=margin if math.isfinite(margin) else None,
        z=z,
        n=n,
        backends_required=sorted(required),
        backends_calibrated=sorted(calibrated),
        calibration_errors=dict(calibration_errors),
    )
