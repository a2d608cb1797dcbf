"""An Open Inference Protocol inference request, checked: its parameters, its one input
tensor and the outputs it asks for; and the output tensors its predictions are encoded as.
The routes (`service.api.v2`) document the inputs, outputs and parameters."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibration.checks import check_alpha
from service.api.v2_codec import DecodedTensor, V2BadRequestError, decode_tensor, encode_tensor
from service.dataplane.predictions import ClassPrediction, ConformalOptions
from service.errors import NotCalibratedError, value_errors_as

FEATURES_INPUT = "input"
PROMPT_INPUT = "prompt"
OUTPUTS = ("label", "confidence", "probabilities", "prediction_set", "entropy", "prediction_id")
_SEQUENCE_ID_TEXT = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True)
class InferParameters:
    alpha: float | None
    score: str | None
    backend: str | None
    sequence_id: int | str | None  # None: a stateless request
    sequence_start: bool
    sequence_end: bool
    never_empty: bool | None = None  # None: the server's default (never empty)


def parse_parameters(parameters: dict[str, Any] | None) -> InferParameters:
    """The request parameters we use, type-checked; every other parameter is ignored."""
    parameters = parameters or {}
    alpha = parameters.get("alpha")
    if alpha is not None:
        with value_errors_as(V2BadRequestError, prefix="parameters."):
            check_alpha(alpha)
    for key in ("score", "backend"):
        value = parameters.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise V2BadRequestError(f"parameters.{key} must be a non-empty string, got {value!r}")
    sequence_id = parameters.get("sequence_id")
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str | None):
        raise V2BadRequestError(
            f"parameters.sequence_id must be an integer or a string, got {sequence_id!r}"
        )
    if isinstance(sequence_id, int) and sequence_id < 0:
        raise V2BadRequestError(f"parameters.sequence_id must be >= 0, got {sequence_id}")
    if (
        isinstance(sequence_id, str)
        and sequence_id
        and not _SEQUENCE_ID_TEXT.fullmatch(sequence_id)
    ):
        raise V2BadRequestError(
            f"parameters.sequence_id {sequence_id!r} must be 1-128 letters, digits, '.', '_', "
            "':' or '-'"
        )
    never_empty = parameters.get("never_empty")
    if never_empty is not None and not isinstance(never_empty, bool):
        raise V2BadRequestError(
            f"parameters.never_empty must be true or false, got {never_empty!r}"
        )
    flags = {}
    for key in ("sequence_start", "sequence_end"):
        value = parameters.get(key, False)
        if not isinstance(value, bool):
            raise V2BadRequestError(f"parameters.{key} must be true or false, got {value!r}")
        flags[key] = value
    if sequence_id in (0, "", None):  # Triton's convention: 0 / "" is "not a sequence"
        if flags["sequence_start"] or flags["sequence_end"]:
            raise V2BadRequestError(
                "parameters.sequence_start/sequence_end need a non-zero parameters.sequence_id"
            )
        sequence_id = None
    return InferParameters(
        alpha=float(alpha) if alpha is not None else None,
        score=parameters.get("score"),
        backend=parameters.get("backend"),
        sequence_id=sequence_id,
        never_empty=never_empty,
        **flags,
    )


def decoded_input(inputs: Any, expected_name: str) -> DecodedTensor:
    if not isinstance(inputs, list) or not inputs:
        raise V2BadRequestError("inputs must be a non-empty list of tensors")
    decoded = [decode_tensor(tensor, f"inputs[{i}]") for i, tensor in enumerate(inputs)]
    names = [tensor.name for tensor in decoded]
    unknown = [name for name in names if name != expected_name]
    if unknown or len(names) != 1:
        raise V2BadRequestError(
            f"this model takes exactly one input named {expected_name!r}; got {names} "
            "(see GET /v2/models/{name} for its inputs)"
        )
    return decoded[0]


def feature_batch(tensor: DecodedTensor, n_features: int) -> np.ndarray:
    """[N, T, F] float64 values of a numeric input, or 400 naming the problem."""
    if tensor.datatype in ("BYTES", "BOOL"):
        raise V2BadRequestError(
            f"input {tensor.name!r} has datatype {tensor.datatype}; this model takes numbers "
            "(FP32, FP64, FP16 or INT*/UINT*)"
        )
    if len(tensor.shape) != 3 or tensor.shape[2] != n_features:
        raise V2BadRequestError(
            f"input {tensor.name!r} has shape {list(tensor.shape)}; this model takes "
            f"[N, T, {n_features}] (N sequences of T steps of {n_features} features)"
        )
    return np.asarray(tensor.values, dtype=np.float64)  # [N, T, F]


def prompt_batch(tensor: DecodedTensor) -> list[str]:
    if tensor.datatype != "BYTES":
        raise V2BadRequestError(
            f"input {tensor.name!r} has datatype {tensor.datatype}; this language model takes "
            "BYTES prompt strings"
        )
    if not (len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)):
        raise V2BadRequestError(
            f"input {tensor.name!r} has shape {list(tensor.shape)}; prompts are [N] (or [N, 1])"
        )
    return list(tensor.values)


def requested_outputs(outputs: list[Any] | None) -> list[str]:
    if outputs is None:
        return list(OUTPUTS)
    names: list[str] = []
    for output in outputs:
        if output.name not in OUTPUTS:
            raise V2BadRequestError(
                f"unknown output {output.name!r}; this model's outputs are {list(OUTPUTS)}"
            )
        if output.name not in names:
            names.append(output.name)
    return names


def encode_predictions(
    predictions: Sequence[ClassPrediction],
    labels: Sequence[str],
    requested: list[str],
    explicit: bool,
    describe_uncalibrated: Callable[[], str],
) -> list[dict[str, Any]]:
    """The response tensors for `requested` outputs, in that order.

    `prediction_set` needs every prediction to carry a set: when one does not (an
    uncalibrated model served under NEUROSERVE_ALLOW_UNCALIBRATED), it is left out of a
    default response and refused (409) when the request asked for it by name.
    """
    has_sets = all(p.prediction_set is not None for p in predictions)
    if "prediction_set" in requested and not has_sets:
        if explicit:
            notes = [p.note for p in predictions if p.note is not None]
            raise NotCalibratedError(
                f"no prediction_set: {notes[0]}" if notes else describe_uncalibrated()
            )
        requested = [name for name in requested if name != "prediction_set"]
    index = {label: i for i, label in enumerate(labels)}
    tensors = []
    for name in requested:
        if name == "label":
            tensors.append(encode_tensor(name, "BYTES", [p.label for p in predictions]))
        elif name == "confidence":
            tensors.append(encode_tensor(name, "FP32", [p.confidence for p in predictions]))
        elif name == "probabilities":
            tensors.append(encode_tensor(name, "FP32", [p.probabilities for p in predictions]))
        elif name == "entropy":
            tensors.append(encode_tensor(name, "FP32", [p.entropy for p in predictions]))
        elif name == "prediction_id":
            tensors.append(encode_tensor(name, "BYTES", [p.id for p in predictions]))
        else:
            mask = np.zeros((len(predictions), len(labels)), dtype=bool)  # [N, C]
            for row, prediction in enumerate(predictions):
                mask[row, [index[label] for label in prediction.prediction_set or []]] = True
            tensors.append(encode_tensor(name, "BOOL", mask))
    return tensors


def conformal_options(
    params: InferParameters, alpha: float | None, score: str | None
) -> ConformalOptions:
    """The request's conformal options over the given defaults (BadInputError when invalid)."""
    chosen = {
        "alpha": params.alpha if params.alpha is not None else alpha,
        "score": params.score or score,
        "never_empty": params.never_empty,
    }
    return ConformalOptions(**{key: value for key, value in chosen.items() if value is not None})
