"""What the session API takes, checked: ids, options, and chunks of a sequence.

A step takes one chunk of the session's sequence. A feature model takes float32 [T, F] (T
time steps of F numbers); a language model takes long [T] token ids, which a client may send
as a string (one token per character) or as a list of ids. `parse_chunk` turns a JSON chunk
into that tensor, `check_chunk` validates a tensor from any route (REST, V2, websocket).
Everything here raises `BadInputError` naming the problem (or, for ids that cannot name a
session, `NotFoundError`).

Session ids live in their owner's namespace: the store key is `<owner>/<id>`, or just `<id>`
without an owner; "/" is not allowed in either, so keys are unambiguous.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, TypeAdapter, ValidationError
from torch import Tensor

from hardware_backends.registry import freeze_options
from models.repository import ModelCard
from service.dataplane.inputs import all_finite, numpy_view, plain_rows
from service.errors import BadInputError, NotFoundError, describe_validation_errors

# Strict: a JSON number is a feature, while true/false, "1.5", NaN and Infinity are errors.
_FINITE = TypeAdapter(list[list[Annotated[float, Field(allow_inf_nan=False)]]])
_TOKEN_IDS = TypeAdapter(list[int])
# Printable ASCII without spaces and without "/", which separates owner and id in store keys.
_ID_PATTERN = re.compile(r"[!-.0-~]{1,128}")


@dataclass(frozen=True)
class ChunkSpec:
    """What one chunk of a session's inputs looks like, from the model's card (the wire
    schema a client reads, `GET /v1/models/{name}`'s input, is
    `service.api.schemas.models.InputSpec`)."""

    kind: str  # "features" or "tokens"
    features: int | None  # F per time step (features)
    vocabulary: list[str] | None  # tokens
    labels: list[str]  # output labels (or the vocabulary)

    @classmethod
    def of(cls, card: ModelCard) -> ChunkSpec:
        config = card.config
        tokens = config["input"]["kind"] == "tokens"
        return cls(
            kind=config["input"]["kind"],
            features=None if tokens else int(config["input"]["features"]),
            vocabulary=list(config["vocabulary"]) if tokens else None,
            labels=list(config["vocabulary"] if tokens else config["labels"]),
        )


def parse_chunk(inputs: object, spec: ChunkSpec, max_steps: int) -> Tensor:
    """A JSON chunk as a tensor for `spec`: float [T, F] features, or long [T] token ids from
    a string (each character a token) or a list of ids. What JSON can get wrong is refused
    here; what any tensor can get wrong (float32 range, token ids, length) is `check_chunk`'s,
    which every step runs."""
    if spec.kind == "tokens":
        if isinstance(inputs, str):
            if len(inputs) > max_steps:
                raise BadInputError(
                    f"inputs has {len(inputs)} steps; the limit is {max_steps} "
                    "(NEUROSERVE_MAX_SEQUENCE_LENGTH)"
                )
            index = {token: i for i, token in enumerate(spec.vocabulary or [])}
            unknown = sorted({char for char in inputs if char not in index})
            if unknown:
                shown = ", ".join(repr(char) for char in unknown[:10])
                raise BadInputError(f"inputs has characters outside the vocabulary: {shown}")
            ids = [index[char] for char in inputs]
        else:
            _check_length(inputs, max_steps, "a string or a list of token ids")
            ids = _validated(_TOKEN_IDS, inputs)
        return torch.tensor(ids, dtype=torch.long)
    _check_length(inputs, max_steps, f"a list of time steps, shape [T, {spec.features}]")
    if inputs and plain_rows(inputs, spec.features):
        return torch.from_numpy(np.array(inputs, dtype=np.float32))  # [T, F]
    # Something unusual (or empty): the strict path says what.
    values = _validated(_FINITE, inputs)
    for t, row in enumerate(values):
        if len(row) != spec.features:
            raise BadInputError(
                f"inputs[{t}] has {len(row)} features; the model expects {spec.features} per "
                f"time step (shape [T, {spec.features}])"
            )
    with np.errstate(over="ignore"):  # overflow to inf is reported by check_chunk
        array = np.asarray(values, dtype=np.float32).reshape(len(values), spec.features)
    return torch.from_numpy(array)


def check_chunk(inputs: object, spec: ChunkSpec, max_steps: int) -> Tensor:
    """Validate a chunk tensor against the session's model; float32 [T, F] or long [T]."""
    if not isinstance(inputs, Tensor):
        raise BadInputError(f"inputs must be a tensor, got {type(inputs).__name__}")
    if spec.kind == "tokens":
        if inputs.dtype.is_floating_point or inputs.dtype.is_complex or inputs.dtype == torch.bool:
            raise BadInputError(f"this model takes integer token ids, got dtype {inputs.dtype}")
        if inputs.dim() != 1:
            raise BadInputError(f"token inputs must have shape [T], got {list(inputs.shape)}")
        vocab = len(spec.vocabulary or [])
        if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= vocab):
            outside = inputs[(inputs < 0) | (inputs >= vocab)]
            raise BadInputError(
                f"token ids must lie in [0, {vocab}), got {outside.tolist()[:10]} outside it"
            )
        chunk = inputs.to(torch.long)
    else:
        if not inputs.dtype.is_floating_point:
            raise BadInputError(f"this model takes float features, got dtype {inputs.dtype}")
        if inputs.dim() != 2 or inputs.shape[1] != spec.features:
            raise BadInputError(
                f"feature inputs must have shape [T, {spec.features}], got {list(inputs.shape)}"
            )
        chunk = inputs if inputs.dtype == torch.float32 else inputs.to(torch.float32)
        values = numpy_view(chunk)  # numpy: cheaper on a few values
        if not all_finite(values):
            t, f = (int(i) for i in np.argwhere(~np.isfinite(values))[0])
            raise BadInputError(f"inputs[{t}][{f}] is not a finite float32 number")
    if chunk.shape[0] < 1:
        raise BadInputError("inputs is empty: send at least one time step")
    if chunk.shape[0] > max_steps:
        raise BadInputError(
            f"inputs has {chunk.shape[0]} steps; the limit is {max_steps} "
            "(NEUROSERVE_MAX_SEQUENCE_LENGTH)"
        )
    return chunk


def _check_length(inputs: object, max_steps: int, expected: str) -> None:
    if not isinstance(inputs, list):
        raise BadInputError(f"inputs must be {expected}, got {type(inputs).__name__}")
    if len(inputs) > max_steps:
        raise BadInputError(
            f"inputs has {len(inputs)} steps; the limit is {max_steps} "
            "(NEUROSERVE_MAX_SEQUENCE_LENGTH)"
        )


def _validated(adapter: TypeAdapter, inputs: object) -> Any:
    try:
        return adapter.validate_python(inputs, strict=True)
    except ValidationError as error:
        located = [dict(e, loc=("inputs", *e["loc"])) for e in error.errors()]
        raise BadInputError(describe_validation_errors(located)) from None


# ---- session settings and ids ----------------------------------------------------------------


def check_options(options: object) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise BadInputError(f"options must be an object, got {type(options).__name__}")
    try:
        freeze_options(options)
    except ValueError as error:
        raise BadInputError(f"options: {error}") from None
    return dict(options)


def check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not _ID_PATTERN.fullmatch(value):
        raise BadInputError(
            f"{what} must be 1-128 printable ASCII characters without spaces or '/', got {value!r}"
        )
    return value


def store_key(session_id: str, owner: str | None) -> str:
    return session_id if owner is None else f"{owner}/{session_id}"


def lookup_key(session_id: str, owner: str | None) -> str:
    """The store key of an existing session; a malformed id or owner cannot name one."""
    for value in (session_id, owner):
        if value is not None and (not isinstance(value, str) or not _ID_PATTERN.fullmatch(value)):
            raise NotFoundError(f"no session {session_id!r} (not a valid session id)")
    return store_key(session_id, owner)
