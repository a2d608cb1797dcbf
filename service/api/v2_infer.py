"""Open Inference Protocol inference, whatever the protocol: a checked request
(`InferCall`: decoded input tensors, parsed parameters, the outputs asked for) runs on the
data plane, or as one step of a Triton sequence on the session plane, and answers output
tensors (`InferAnswer`). HTTP (`service.api.v2`) and gRPC build the call from their wire
format and encode the answer back into it; `run_infer` is all they share.

Outputs, all returned unless the request names a subset:
- `label` BYTES [N] (the label text), `confidence` FP32 [N], `probabilities` FP32 [N, C]
  (in the order of the model's labels), `entropy` FP32 [N] (nats),
- `prediction_set` BOOL [N, C] (membership of each label), `set_size` INT32 [N] and
  `abstain` BOOL [N] (the set does not single out one label): calibrated answers only,
- `prediction_id` BYTES [N] (quote it in `POST /v1/feedback`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from models.repository import ModelCard
from service.api.v2_codec import DecodedTensor, OutputTensor, V2BadRequestError, listed_tensor
from service.api.v2_inputs import feature_batch, input_name, prompt_batch, single_input
from service.api.v2_parameters import InferParameters
from service.api.v2_sequences import run_sequence_step
from service.dataplane.plane import TORCH_BACKEND, DataPlane
from service.dataplane.predictions import (
    IGNORED_SEED_WARNING,
    ClassPrediction,
    ConformalOptions,
)
from service.errors import NotCalibratedError

# Output -> (datatype, whether it has one value per label): shape [N] or [N, C].
OUTPUT_TYPES: dict[str, tuple[str, bool]] = {
    "label": ("BYTES", False),
    "confidence": ("FP32", False),
    "probabilities": ("FP32", True),
    "prediction_set": ("BOOL", True),
    "set_size": ("INT32", False),
    "abstain": ("BOOL", False),
    "entropy": ("FP32", False),
    "prediction_id": ("BYTES", False),
}
OUTPUTS = tuple(OUTPUT_TYPES)
# Outputs only a calibrated answer has (an uncalibrated one carries no set).
SET_OUTPUTS = ("prediction_set", "set_size", "abstain")
_DEFAULT_CONFORMAL = ConformalOptions()


@dataclass  # not frozen: one per request, and a frozen __init__ costs ~3x
class InferCall:
    """One inference request, decoded from its protocol."""

    model: str
    version: str | None  # from the URL (HTTP) or `model_version` (gRPC); None: the latest
    inputs: Sequence[DecodedTensor]
    parameters: InferParameters
    outputs: Sequence[str] | None = None  # the outputs asked for, in order; None: all
    owner: str | None = None  # the API key's owner: sequences and feedback belong to it


@dataclass  # not frozen: one per request
class InferAnswer:
    model: str
    version: str
    backend: str
    outputs: list[OutputTensor]
    parameters: dict[str, Any] = field(default_factory=dict)  # sequence_id / _step, warnings


async def run_infer(dataplane: DataPlane, sessions: Any, call: InferCall) -> InferAnswer:
    """Answer one inference request (`sessions`: the session manager, for sequences; None
    refuses them). Counted in the model's inference statistics, success or failure."""
    card = dataplane.card(call.model, call.version)
    started = time.perf_counter_ns()
    try:
        answer = await _answer(dataplane, sessions, card, call)
    except Exception:
        dataplane.statistics.record(
            card.name, card.version, ok=False, nanoseconds=time.perf_counter_ns() - started
        )
        raise
    rows = answer.outputs[0].shape[0] if answer.outputs else 0
    dataplane.statistics.record(
        card.name,
        card.version,
        ok=True,
        nanoseconds=time.perf_counter_ns() - started,
        inferences=rows,
    )
    return answer


async def _answer(
    dataplane: DataPlane, sessions: Any, card: ModelCard, call: InferCall
) -> InferAnswer:
    params = call.parameters
    tokens = card.config["input"]["kind"] == "tokens"
    labels = card.config["vocabulary"] if tokens else card.config["labels"]
    tensor = single_input(call.inputs, input_name(card))
    requested = requested_outputs(call.outputs)
    warnings: list[str] = [IGNORED_SEED_WARNING] if params.seed is not None else []
    parameters: dict[str, Any] = {}
    if params.sequence_id is not None:
        step = await run_sequence_step(
            dataplane,
            sessions,
            card,
            tensor,
            params,
            url_version=call.version,
            owner=call.owner,
        )
        predictions, backend, parameters = step.predictions, step.backend, step.parameters
        warnings += step.warnings
    else:
        backend = params.backend or TORCH_BACKEND
        inputs: Any = (
            prompt_batch(tensor)
            if tokens
            else feature_batch(tensor, int(card.config["input"]["features"]))
        )
        batch = await dataplane.predict(
            card,
            inputs,
            backend=backend,
            backend_options=params.backend_options,
            conformal=stateless_conformal(params),
            owner=call.owner,
        )
        predictions = batch.predictions
        warnings += batch.warnings

    def describe_uncalibrated() -> str:
        return (
            f"no prediction_set: model {card.name!r} version {card.version} has no calibration "
            f"for backend {backend!r}; run `neuroserve calibrate {card.name} --backend {backend}`"
        )

    outputs = prediction_outputs(
        predictions, labels, requested, call.outputs is not None, describe_uncalibrated
    )
    if warnings:
        parameters["warnings"] = "; ".join(dict.fromkeys(warnings))
    return InferAnswer(card.name, card.version, backend, outputs, parameters)


# ---- the request ----------------------------------------------------------------------------


def requested_outputs(names: Sequence[str] | None) -> list[str]:
    """The outputs to answer, in request order without repeats; all when `names` is None."""
    if names is None:
        return list(OUTPUTS)
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown:
        raise V2BadRequestError(
            f"unknown output {unknown[0]!r}; this model's outputs are {list(OUTPUTS)}"
        )
    return list(dict.fromkeys(names))


def stateless_conformal(params: InferParameters) -> ConformalOptions:
    """What a stateless request asks of calibration (BadInputError when invalid)."""
    chosen = {
        "alpha": params.alpha,
        "score": params.score,
        "class_conditional": params.class_conditional,
        "never_empty": params.never_empty,
        "online": params.online,
        "max_set_size": params.max_set_size,
    }
    given = {key: value for key, value in chosen.items() if value is not None}
    return ConformalOptions(**given) if given else _DEFAULT_CONFORMAL  # frozen: one serves all


# ---- the answer -----------------------------------------------------------------------------


def prediction_outputs(
    predictions: Sequence[ClassPrediction],
    labels: Sequence[str],
    requested: list[str],
    explicit: bool,
    describe_uncalibrated: Callable[[], str],
) -> list[OutputTensor]:
    """The output tensors for `requested` outputs, in that order.

    The set outputs need every prediction to carry a set: when one does not (an uncalibrated
    model served under NEUROSERVE_ALLOW_UNCALIBRATED, a position past the calibration), they
    are left out of a default response and refused (409) when the request named one.
    """
    has_sets = all(p.prediction_set is not None for p in predictions)
    if not has_sets and any(name in SET_OUTPUTS for name in requested):
        if explicit:
            notes = [p.note for p in predictions if p.note is not None]
            raise NotCalibratedError(
                f"no prediction_set: {notes[0]}" if notes else describe_uncalibrated()
            )
        requested = [name for name in requested if name not in SET_OUTPUTS]
    # Plain lists, row-major: a JSON answer is written from them without numpy.
    per_label = (len(predictions), len(labels))  # [N, C]
    return [
        listed_tensor(
            name,
            OUTPUT_TYPES[name][0],
            _OUTPUT_VALUES[name](predictions, labels),
            per_label if OUTPUT_TYPES[name][1] else None,
        )
        for name in requested
    ]


def _set_mask(predictions: Sequence[ClassPrediction], labels: Sequence[str]) -> list[bool]:
    """[N, C] row-major: whether each label is in each prediction's set."""
    members = [set(p.prediction_set or ()) for p in predictions]
    return [label in chosen for chosen in members for label in labels]


# Output -> its values over the predictions, row-major (module level: no closures per call).
_OUTPUT_VALUES: dict[str, Callable[[Sequence[ClassPrediction], Sequence[str]], list[Any]]] = {
    "label": lambda predictions, _: [p.label for p in predictions],
    "confidence": lambda predictions, _: [p.confidence for p in predictions],
    "probabilities": lambda predictions, _: [x for p in predictions for x in p.probabilities],
    "prediction_set": _set_mask,
    "set_size": lambda predictions, _: [p.set_size or 0 for p in predictions],
    "abstain": lambda predictions, _: [bool(p.abstain) for p in predictions],
    "entropy": lambda predictions, _: [p.entropy for p in predictions],
    "prediction_id": lambda predictions, _: [p.id for p in predictions],
}
