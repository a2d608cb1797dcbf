"""Request inputs checked against a model's input spec: feature sequences [N, T, F] as float32
tensors, prompts as token ids. Every problem becomes a `BadInputError` naming where it is
(`inputs[2][5]`), and cheap size checks come before parsing values, so an oversized request
is refused before its numbers are read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, TypeAdapter, ValidationError
from torch import Tensor

from service.errors import BadInputError, describe_validation_errors

_FiniteNumber = Annotated[float, Field(allow_inf_nan=False)]
# Strict: a JSON number is a feature, while true/false and "1.5" are type errors.
_FEATURE_SEQUENCES = TypeAdapter(list[list[list[_FiniteNumber]]])
_PROMPTS = TypeAdapter(list[str])
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class InputLimits:
    max_batch_size: int
    max_sequence_length: int


def plain_rows(rows: object, features: int) -> bool:
    """Whether `rows` is a list of lists of `features` numbers within float32's range: Python
    floats or ints, as JSON gives them (not bools, not strings, not NaN). What nearly every
    request holds, checked at a fraction of the strict validator's and numpy's per-call costs;
    `np.array(rows, dtype=np.float32)` then needs no further check. Anything else goes the
    strict way, which says what is wrong."""
    if type(rows) is not list:
        return False
    for row in rows:
        if type(row) is not list or len(row) != features or not plain_numbers(row):
            return False
    return True


def plain_numbers(values: list) -> bool:
    """Whether every value is a Python float or int (not a bool) within float32's range (not
    NaN): a JSON number that `np.array(values, dtype=np.float32)` takes as it is."""
    for value in values:
        if (type(value) is not float and type(value) is not int) or not (
            -FLOAT32_MAX <= value <= FLOAT32_MAX  # False for NaN too
        ):
            return False
    return True


def _check_batch(inputs: object, limits: InputLimits, expected: str) -> list[Any]:
    """Cheap checks first, so an oversized request is refused before its values are parsed."""
    if not isinstance(inputs, list):
        raise BadInputError(f"inputs must be {expected}, got {type(inputs).__name__}")
    if not inputs:
        raise BadInputError("inputs is empty: send at least one sequence")
    if len(inputs) > limits.max_batch_size:
        raise BadInputError(
            f"inputs has {len(inputs)} sequences; the limit is {limits.max_batch_size} per request "
            "(NEUROSERVE_MAX_BATCH_SIZE)"
        )
    for i, sequence in enumerate(inputs):
        if isinstance(sequence, list | str) and len(sequence) > limits.max_sequence_length:
            raise BadInputError(
                f"inputs[{i}] has {len(sequence)} steps; the limit is "
                f"{limits.max_sequence_length} per sequence (NEUROSERVE_MAX_SEQUENCE_LENGTH)"
            )
    return inputs


def _validated(adapter: TypeAdapter, inputs: list[Any]) -> Any:
    try:
        return adapter.validate_python(inputs, strict=True)
    except ValidationError as error:
        located = [dict(e, loc=("inputs", *e["loc"])) for e in error.errors()]
        raise BadInputError(describe_validation_errors(located)) from None


def feature_tensor(inputs: object, n_features: int, limits: InputLimits) -> Tensor:
    """A batch of equal-length feature sequences as float32 [N, T, F], or BadInputError.

    `inputs` is JSON (nested lists) or an array a protocol decoded already (V2 tensors)."""
    if isinstance(inputs, np.ndarray):
        return _array_features(inputs, n_features, limits)
    batch = _check_batch(inputs, limits, "a list of sequences of shape [N, T, F]")
    length = len(batch[0]) if isinstance(batch[0], list) else 0
    if length and all(
        len(sequence) == length and plain_rows(sequence, n_features) for sequence in batch
    ):
        return torch.from_numpy(np.array(batch, dtype=np.float32))  # [N, T, F]
    # Something unusual: the strict path says what.
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


def _array_features(values: np.ndarray, n_features: int, limits: InputLimits) -> Tensor:
    """`feature_tensor` of a decoded numeric array: the same limits and messages, no per-value
    Python work."""
    if values.ndim != 3 or values.shape[2] != n_features:
        raise BadInputError(
            f"inputs have shape {list(values.shape)}; the model expects [N, T, {n_features}]"
        )
    n, t, _ = values.shape
    if n == 0:
        raise BadInputError("inputs is empty: send at least one sequence")
    if n > limits.max_batch_size:
        raise BadInputError(
            f"inputs has {n} sequences; the limit is {limits.max_batch_size} per request "
            "(NEUROSERVE_MAX_BATCH_SIZE)"
        )
    if t == 0:
        raise BadInputError("inputs[0] is empty: every sequence needs at least one time step")
    if t > limits.max_sequence_length:
        raise BadInputError(
            f"inputs[0] has {t} steps; the limit is {limits.max_sequence_length} per sequence "
            "(NEUROSERVE_MAX_SEQUENCE_LENGTH)"
        )
    if values.dtype == np.float32 and values.flags.c_contiguous:
        array = values  # a protocol decoded it so already (V2's FP32)
    else:
        with np.errstate(over="ignore"):  # overflow to inf is reported below, by position
            array = np.ascontiguousarray(values, dtype=np.float32)  # [N, T, F]
    if not all_finite(array):
        i, step, f = (int(k) for k in np.argwhere(~np.isfinite(array))[0])
        raise BadInputError(
            f"inputs[{i}][{step}][{f}] = {float(values[i, step, f])!r} is not finite in float32"
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


# Inputs this far beyond the training range (as a fraction of its width) get a warning: the
# calibration was fitted on data inside the range, and coverage says nothing about such inputs.
FAR_OUTSIDE_RANGE = 0.25


# Up to this many values, a Python loop over `.tolist()` beats a numpy reduction, whose call
# alone costs ~2 us.
SMALL_ARRAY = 64


def numpy_view(tensor: Tensor) -> np.ndarray:
    """A tensor's values as a numpy array, in place when it can be (a CPU tensor without
    autograd or lazy conjugation): small checks cost a tenth of torch's in numpy."""
    try:
        return tensor.numpy()
    except (RuntimeError, TypeError):
        return tensor.detach().cpu().resolve_conj().resolve_neg().numpy()


def all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite (a small array without numpy's per-call cost)."""
    if values.size <= SMALL_ARRAY:
        return all(map(math.isfinite, values.ravel().tolist()))
    return bool(np.isfinite(values).all())


def out_of_range_warning(features: Tensor, value_range: Sequence[float] | None) -> str | None:
    """A warning when features [..., F] reach far outside the model's training value range."""
    if value_range is None or len(value_range) != 2 or features.numel() == 0:
        return None
    values = numpy_view(features)  # numpy: a tenth of torch's cost on a few values
    if values.size <= SMALL_ARRAY:
        listed = values.ravel().tolist()
        smallest, largest = float(min(listed)), float(max(listed))
    else:
        smallest, largest = float(values.min()), float(values.max())
    return _range_note(smallest, largest, value_range)


def out_of_range_warnings(
    features: Tensor, value_range: Sequence[float] | None, counts: Sequence[int]
) -> list[str | None]:
    """`out_of_range_warning` of each request in a batch of features [N, ...], whose requests
    hold `counts` consecutive rows: one pass over the whole batch instead of one per request."""
    if value_range is None or len(value_range) != 2 or features.numel() == 0:
        return [None] * len(counts)
    values = numpy_view(features).reshape(int(features.shape[0]), -1)
    lows, highs = values.min(axis=1).tolist(), values.max(axis=1).tolist()  # per row
    if _range_note(min(lows), max(highs), value_range) is None:
        return [None] * len(counts)  # the usual batch: every request inside the range
    notes, start = [], 0
    for count in counts:
        end = start + count
        notes.append(_range_note(min(lows[start:end]), max(highs[start:end]), value_range))
        start = end
    return notes


def _range_note(smallest: float, largest: float, value_range: Sequence[float]) -> str | None:
    low, high = float(value_range[0]), float(value_range[1])
    margin = FAR_OUTSIDE_RANGE * (high - low)
    if low - margin <= smallest and largest <= high + margin:
        return None
    return (
        f"inputs span [{smallest:g}, {largest:g}], far outside the range [{low:g}, {high:g}] the "
        "model was trained and calibrated on: its confidence and sets carry no guarantee there"
    )
