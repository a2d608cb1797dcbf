"""Early decisions for sessions: when a streaming classifier may stop reading its input.

A classifier's calibration has one calibration per step (`calibration.positional`), whose
conformity scores are exactly what a SpikeCP-style rule needs: at checkpoint k, the quantile
of step k's scores at level alpha / K. A session that asks for early decisions gets the
`EarlyDecisionRule` of its alpha, score and `max_set_size` (cheap to build, cached per
calibration), and every step within the calibrated horizon is answered with the rule's
decision: stop or read on, and the set at level alpha / K, from the same calibrated
probabilities as the step's prediction. Stopping at the first `stop` (or any other stopping
rule) keeps coverage >= 1 - alpha at the stopping time (`calibration.early_decision`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from calibration import EarlyDecisionRule
from models.repository import ModelCard
from service.dataplane.calibration_store import StoredCalibration
from service.dataplane.predictions import calibration_inputs
from service.errors import BadInputError, ConflictError

_RULE_CACHE_SIZE = 256


def check_max_set_size(value: object, num_classes: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_classes:
        raise BadInputError(
            f"early_decision.max_set_size must be an integer in 1..{num_classes}, got {value!r}"
        )
    return value


class EarlyDecisions:
    """Early-decision rules built from stored calibrations, cached; thread-safe."""

    def __init__(self) -> None:
        self._rules: OrderedDict[tuple, EarlyDecisionRule] = OrderedDict()
        self._lock = threading.Lock()

    def rule(
        self,
        card: ModelCard,
        backend: str,
        stored: StoredCalibration | None,
        *,
        alpha: float,
        score: str,
        max_set_size: int,
        backend_options: Mapping[str, Any] | None = None,
    ) -> EarlyDecisionRule:
        """The session's rule; ConflictError when this backend's calibration cannot give one."""
        if score.endswith("_randomized"):
            raise BadInputError(
                f"early decisions need a deterministic score; {score!r} draws random numbers "
                "(use lac, aps, raps or topk)"
            )
        where = f"model {card.name!r} version {card.version} on backend {backend!r}"
        fit = f"run `neuroserve calibrate {card.name} --version {card.version} --backend {backend}`"
        if card.config["task"] == "language-model":
            raise ConflictError(f"early decisions are for sequence classifiers; {where} is not")
        if stored is None:
            raise ConflictError(f"early decisions need a calibration: {where} has none; {fit}")
        if not stored.fitted_with(backend_options):
            raise ConflictError(
                f"early decisions need a calibration of the session's backend options "
                f"{dict(backend_options or {})}: {where} was calibrated with "
                f"{stored.backend_options}; {fit} --backend-option KEY=VALUE"
            )
        key = (stored.calibration_id, float(alpha), score, int(max_set_size))
        with self._lock:
            rule = self._rules.get(key)
            if rule is not None:
                self._rules.move_to_end(key)
                return rule
        try:
            rule = EarlyDecisionRule.from_calibration(stored.positional, alpha, score, max_set_size)
        except ValueError as error:  # e.g. max_set_size above the number of classes
            raise BadInputError(f"early_decision: {error}") from None
        with self._lock:
            self._rules[key] = rule
            while len(self._rules) > _RULE_CACHE_SIZE:
                self._rules.popitem(last=False)
        return rule


def decide(
    rule: EarlyDecisionRule,
    stored: StoredCalibration,
    logits: Tensor,
    step: int,
    labels: list[str],
) -> dict[str, Any] | None:
    """The decision after the session's `step`-th time step, from its last logits [C] (or
    [S, C]) calibrated by that step's map; None when `step` is no checkpoint."""
    artifact = stored.at(step)
    if step not in rule.checkpoint_steps or artifact is None:
        return None
    checkpoint = rule.checkpoint_steps.index(step)
    row, _ = calibration_inputs(logits.unsqueeze(-2))  # [1, C]
    stop, sets = rule.decide(artifact.calibrate(row), checkpoint)
    members = sets[0].nonzero().flatten().tolist()
    return {
        "stop": bool(stop[0]),
        "checkpoint": step,
        "prediction_set": [labels[i] for i in members],
        "guaranteed_coverage": 1.0 - rule.alpha,
    }
