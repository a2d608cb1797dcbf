"""The one input tensor of an Open Inference Protocol request, checked against the model it
is for: feature models take `input` [N, T, F] numbers, language models `prompt` [N] BYTES
strings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.repository import ModelCard
from service.api.v2_codec import DecodedTensor, V2BadRequestError

FEATURES_INPUT = "input"
PROMPT_INPUT = "prompt"


def input_name(card: ModelCard) -> str:
    return PROMPT_INPUT if card.config["input"]["kind"] == "tokens" else FEATURES_INPUT


def single_input(inputs: Sequence[DecodedTensor], expected_name: str) -> DecodedTensor:
    """The one input tensor a model takes, or 400 naming what came instead."""
    names = [tensor.name for tensor in inputs]
    if not names:
        raise V2BadRequestError("inputs must be a non-empty list of tensors")
    if names != [expected_name]:
        raise V2BadRequestError(
            f"this model takes exactly one input named {expected_name!r}; got {names} "
            "(see GET /v2/models/{name} for its inputs)"
        )
    return inputs[0]


def feature_batch(tensor: DecodedTensor, n_features: int) -> np.ndarray:
    """[N, T, F] values of a numeric (or BOOL: 0/1) input, float32 or float64 (other types
    widened to float64), or 400 naming the problem."""
    if tensor.datatype == "BYTES":
        raise V2BadRequestError(
            f"input {tensor.name!r} has datatype BYTES; this model takes numbers (FP16, BF16, "
            "FP32, FP64, INT*/UINT*, or BOOL as 0/1, e.g. spikes)"
        )
    if len(tensor.shape) != 3 or tensor.shape[2] != n_features:
        raise V2BadRequestError(
            f"input {tensor.name!r} has shape {list(tensor.shape)}; this model takes "
            f"[N, T, {n_features}] (N sequences of T steps of {n_features} features)"
        )
    values = np.asarray(tensor.values)  # [N, T, F]
    return values if values.dtype in _FLOAT_VALUES else values.astype(np.float64)


_FLOAT_VALUES = (np.dtype(np.float32), np.dtype(np.float64))  # taken as they are


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
