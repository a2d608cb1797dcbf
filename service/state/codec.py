"""Session state serialisation: named tensors + header <-> one self-checking byte string.

A session's recurrent state is a mapping of names to tensors whose leading dimension is the
batch (one row per session). It is stored as safetensors bytes behind a small JSON header that
says which model, version and backend wrote it, how many steps it has seen, when it was
created and last updated, a hash of its schema, and a little JSON session metadata (alpha,
score, options, owner).

Blob layout (all integers big-endian):

    b"NSST" | format: u8 | header length: u32 | header JSON (utf-8) | safetensors | sha256

The trailing sha256 covers every byte before it, so any corruption (a flipped bit, a torn or
truncated write) is caught before parsing. Parsing still validates every field as if the
checksum could be forged, so a decoder bug can never turn bad bytes into a crash.

`decode_state` raises `CorruptStateError` for bytes that are not a well-formed blob and
`IncompatibleStateError` for a well-formed blob that does not fit what the caller expects
(another model, version, backend or state schema), so the service can answer with a clear
error instead of running a model on the wrong state.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import safetensors.torch
import torch

MAGIC = b"NSST"
FORMAT_VERSION = 1
_PREFIX = struct.Struct(">4sBI")  # magic, format, header length
_DIGEST_BYTES = 32  # sha256
MAX_HEADER_BYTES = 1 << 20
MAX_METADATA_BYTES = 64 << 10
_MAX_NDIM = 16
_MAX_DIM = (1 << 31) - 1

# The dtypes a state may use, by their safetensors names. complex64 is here because diagonal
# linear recurrences (LRU) keep a complex hidden state.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.complex64: "C64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPE_BY_CODE = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
# The same dtypes in numpy, where it has them (not bfloat16): numpy views build a session's few
# small tensors at a fraction of torch's per-call cost.
_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {
    dtype: np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)
    for dtype in SAFETENSORS_DTYPES
    if dtype != torch.bfloat16
}
_HEADER_FIELDS = {
    "model",
    "version",
    "backend",
    "step",
    "schema_hash",
    "created_at",
    "updated_at",
    "metadata",
}
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


class StateCodecError(Exception):
    """Root of the errors raised while decoding a stored state."""


class CorruptStateError(StateCodecError):
    """The stored bytes are not a well-formed state blob (damaged, truncated or foreign)."""


class IncompatibleStateError(StateCodecError):
    """A well-formed state that does not fit the model, version, backend or schema expected."""


# --- schema -------------------------------------------------------------------------------


def tensor_schema_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of stored state tensors' sorted names, shapes without the batch dimension,
    and dtypes: the `schema_hash` of a stored state's header. (Not a model's declared schema:
    that is `models.artifact_format.model_state_schema_hash`, stored in config.json.)

    Two states with the same hash can be stacked into one batch and fed to the same model.
    """
    for name, tensor in tensors.items():
        _check_tensor(name, tensor)
    return _layout_hash(tensors)


def _layout_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """`tensor_schema_hash` of tensors already checked (a record's)."""
    return _schema_hash(tuple(sorted((n, t.shape[1:], t.dtype) for n, t in tensors.items())))


@functools.lru_cache(maxsize=256)
def _schema_hash(layout: tuple[tuple[str, torch.Size, torch.dtype], ...]) -> str:
    # A served model has one layout: hashing it once, not on every step, is the point.
    entries = [[name, list(shape), SAFETENSORS_DTYPES[dtype]] for name, shape, dtype in layout]
    canonical = json.dumps(entries, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class StateSignature:
    """What a caller expects a stored state to be: who wrote it and how it is shaped."""

    model: str
    version: str
    backend: str
    schema_hash: str

    @classmethod
    def of(
        cls, tensors: Mapping[str, torch.Tensor], *, model: str, version: str, backend: str
    ) -> StateSignature:
        """The signature of states shaped like `tensors` (e.g. `model.init_state(1)`)."""
        return cls(model, version, backend, tensor_schema_hash(tensors))


# --- record -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StateRecord:
    """One session's state and header. Build with `new`, move forward with `advance`.

    Construction validates everything, so every record can be encoded. `metadata` is kept in
    its JSON-normalised form (tuples become lists), so it compares equal after a round trip.
    """

    tensors: Mapping[str, torch.Tensor]
    model: str
    version: str
    backend: str
    step: int
    created_at: float
    updated_at: float
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, Mapping):
            raise TypeError(
                f"state tensors must be a mapping of names to tensors, "
                f"got {type(self.tensors).__name__}"
            )
        batch_sizes = set()
        for name, tensor in self.tensors.items():
            _check_tensor(name, tensor)
            batch_sizes.add(tensor.shape[0])
        if len(batch_sizes) > 1:
            raise ValueError(
                f"state tensors disagree on the batch size (leading dimension): "
                f"{sorted(batch_sizes)}"
            )
        _check_header_fields(vars(self))
        object.__setattr__(self, "tensors", dict(self.tensors))
        if not isinstance(self.metadata, _JsonMetadata):  # advancing keeps the normalised one
            object.__setattr__(self, "metadata", _normalise_metadata(self.metadata))

    @classmethod
    def _with_checked_tensors(cls, fields: dict[str, Any], schema_hash: str | None) -> StateRecord:
        """A record whose tensors are known to pass `__post_init__`'s checks with this schema
        hash (the hot paths: a decoded blob's checked index, or the same layout as a checked
        record); the other fields are checked as the constructor checks them. None: not
        known, check everything."""
        if schema_hash is None:
            return cls(**fields)
        _check_header_fields(fields)
        record = object.__new__(cls)
        record.__dict__.update(fields, schema_hash=schema_hash)  # schema_hash: the cache slot
        if not isinstance(record.metadata, _JsonMetadata):
            record.__dict__["metadata"] = _normalise_metadata(record.metadata)
        return record

    @classmethod
    def new(
        cls,
        tensors: Mapping[str, torch.Tensor],
        *,
        model: str,
        version: str,
        backend: str,
        metadata: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> StateRecord:
        """A fresh session state at step 0, created and updated `now` (default: wall clock)."""
        now = time.time() if now is None else now
        return cls(tensors, model, version, backend, 0, now, now, metadata or {})

    def advance(
        self,
        tensors: Mapping[str, torch.Tensor],
        steps: int,
        *,
        metadata: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> StateRecord:
        """The state after `steps` more time steps; keeps the metadata unless given new."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        fields = {
            "tensors": dict(tensors),
            "model": self.model,
            "version": self.version,
            "backend": self.backend,
            "step": self.step + steps,
            "created_at": self.created_at,
            "updated_at": time.time() if now is None else now,
            "metadata": self.metadata if metadata is None else metadata,
        }
        # A step keeps the layout: then the new tensors pass the checks the old ones passed.
        same_layout = _same_layout(self.tensors, fields["tensors"])
        return StateRecord._with_checked_tensors(fields, self.schema_hash if same_layout else None)

    def copy(self) -> StateRecord:
        """This record with its own copy of every tensor (a record may hold views into a
        larger batched tensor, which it would keep alive)."""
        record = object.__new__(StateRecord)
        record.__dict__.update(self.__dict__)  # checked fields, cached schema hash included
        record.__dict__["tensors"] = {name: t.clone() for name, t in self.tensors.items()}
        return record

    @functools.cached_property
    def schema_hash(self) -> str:
        return _layout_hash(self.tensors)  # the tensors were checked when the record was built

    @property
    def signature(self) -> StateSignature:
        return StateSignature(self.model, self.version, self.backend, self.schema_hash)


def _same_layout(checked: Mapping[str, torch.Tensor], tensors: Mapping[str, Any]) -> bool:
    """Whether `tensors` have exactly the names, shapes, dtypes and layout of `checked`."""
    if len(tensors) != len(checked):
        return False
    for name, tensor in tensors.items():
        old = checked.get(name)
        if (
            old is None
            or not isinstance(tensor, torch.Tensor)
            or tensor.shape != old.shape
            or tensor.dtype != old.dtype
            or tensor.layout != torch.strided
        ):
            return False
    return True


def check_compatible(record: StateRecord, expected: StateSignature) -> None:
    """Raise `IncompatibleStateError` naming every field where `record` differs from `expected`."""
    if (
        record.model == expected.model
        and record.version == expected.version
        and record.backend == expected.backend
        and record.schema_hash == expected.schema_hash
    ):
        return
    actual = record.signature
    differences = [
        f"{name} {getattr(actual, name)!r} (expected {getattr(expected, name)!r})"
        for name in ("model", "version", "backend", "schema_hash")
        if getattr(actual, name) != getattr(expected, name)
    ]
    if differences:
        raise IncompatibleStateError(
            "stored session state does not fit this request: it has " + ", ".join(differences)
        )


# --- encode -------------------------------------------------------------------------------


def encode_state(record: StateRecord) -> bytes:
    """Serialise a record to one self-checking blob (see the module docstring for the layout)."""
    header = {
        "model": record.model,
        "version": record.version,
        "backend": record.backend,
        "step": record.step,
        "schema_hash": record.schema_hash,
        "created_at": float(record.created_at),
        "updated_at": float(record.updated_at),
        "metadata": record.metadata,
    }
    # Every value was checked finite and JSON-typed when the record was built, so orjson's
    # NaN-as-null can never apply.
    header_bytes = orjson.dumps(header)
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ValueError(
            f"state header is {len(header_bytes)} bytes, over the {MAX_HEADER_BYTES}-byte limit"
        )
    payload = safetensors_bytes(record.tensors)
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + payload
    return body + hashlib.sha256(body).digest()


def safetensors_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The tensors in the safetensors format, with the index built once per layout.

    `safetensors.torch.save` (the reference, `safetensors_bytes_reference`) costs more than a
    whole model step for a session's few small tensors; this writes the same format (tensors
    in name order, index padded to 8 bytes) from a cached index and the raw bytes.
    """
    names = sorted(tensors)
    index = _safetensors_index(
        tuple((name, tensors[name].dtype, tuple(tensors[name].shape)) for name in names)
    )
    return index + b"".join(_raw_bytes(tensors[name]) for name in names)


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's values in C order, bit for bit."""
    try:  # a CPU tensor without autograd, conjugate bit or bfloat16: numpy reads it in place
        return tensor.numpy().tobytes()  # tobytes writes C order whatever the strides
    except (RuntimeError, TypeError):
        # .contiguous() keeps the values bit-for-bit; a uint8 view reads any dtype's raw bytes.
        plain = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
        return plain.view(torch.uint8).numpy().tobytes()


def safetensors_bytes_reference(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The slow reference for `safetensors_bytes`: the safetensors library itself."""
    return safetensors.torch.save({n: t.detach().cpu().contiguous() for n, t in tensors.items()})


@functools.lru_cache(maxsize=256)
def _safetensors_index(layout: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]) -> bytes:
    """Length prefix and JSON index of tensors laid out back to back in `layout` order."""
    entries, offset = {}, 0
    for name, dtype, shape in layout:
        end = offset + math.prod(shape) * dtype.itemsize
        entries[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(text)) + text


# --- decode -------------------------------------------------------------------------------


def decode_state(blob: bytes, expected: StateSignature | None = None) -> StateRecord:
    """Parse and validate a blob; check it against `expected` when given.

    Raises `CorruptStateError` for anything that is not a well-formed blob and
    `IncompatibleStateError` for a good blob that is of another format or does not match.
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CorruptStateError(f"state blob must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < _PREFIX.size + _DIGEST_BYTES:
        raise CorruptStateError(f"state blob is truncated: {len(blob)} bytes")
    magic, format_version, header_length = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptStateError("bytes are not a neuroserve state blob (bad magic)")
    body, digest = blob[:-_DIGEST_BYTES], blob[-_DIGEST_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptStateError("state blob checksum mismatch: the stored bytes are damaged")
    if format_version != FORMAT_VERSION:
        raise IncompatibleStateError(
            f"state blob has format {format_version}; this server reads format {FORMAT_VERSION}"
        )
    header_end = _PREFIX.size + header_length
    if header_length > MAX_HEADER_BYTES or header_end > len(body):
        raise CorruptStateError(f"state header length {header_length} exceeds the blob")
    header = _parse_header(body[_PREFIX.size : header_end])
    if header_length <= MAX_METADATA_BYTES:  # parsed JSON, within the limit: already normal
        header["metadata"] = _JsonMetadata(header["metadata"])
    tensors, spans = _tensors_and_spans(body[header_end:])
    fields = {
        "tensors": tensors,
        "model": header["model"],
        "version": header["version"],
        "backend": header["backend"],
        "step": header["step"],
        "created_at": header["created_at"],
        "updated_at": header["updated_at"],
        "metadata": header["metadata"],
    }
    try:
        record = StateRecord._with_checked_tensors(fields, _record_schema_hash(spans))
    except (TypeError, ValueError) as exc:
        raise CorruptStateError(f"stored state header is invalid: {exc}") from exc
    if record.schema_hash != header["schema_hash"]:
        raise CorruptStateError("stored schema hash does not match the stored tensors")
    if expected is not None:
        check_compatible(record, expected)
    return record


def _parse_header(header_bytes: bytes) -> dict[str, Any]:
    # Fast path: a header this codec wrote is orjson's canonical form of what it parses to.
    # Anything else (duplicate keys, other spacing, big integers) takes the strict parser.
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or orjson.dumps(header) != header_bytes:
        header = _parse_header_strictly(header_bytes)
    if not isinstance(header, dict) or set(header) != _HEADER_FIELDS:
        raise CorruptStateError("state header does not have the expected fields")
    if not isinstance(header["schema_hash"], str) or not _HEX_SHA256.fullmatch(
        header["schema_hash"]
    ):
        raise CorruptStateError("state header schema_hash is not a sha256 hex digest")
    if not isinstance(header["metadata"], dict):
        raise CorruptStateError("state header metadata is not a JSON object")
    return header


def _parse_header_strictly(header_bytes: bytes) -> Any:
    try:
        return json.loads(
            header_bytes.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptStateError(f"state header is not valid JSON: {exc}") from exc


def tensors_from_safetensors(payload: bytes) -> dict[str, torch.Tensor]:
    """Validate the safetensors layout ourselves, then build the tensors from the bytes."""
    return _tensors_and_spans(payload)[0]


_Spans = tuple[tuple[int, int, str, torch.dtype, tuple], ...]


def _tensors_and_spans(payload: bytes) -> tuple[dict[str, torch.Tensor], _Spans]:
    if len(payload) < 8:
        raise CorruptStateError("state tensor payload is truncated")
    (index_length,) = struct.unpack_from("<Q", payload)
    if index_length > len(payload) - 8 or index_length > MAX_HEADER_BYTES:
        raise CorruptStateError(f"tensor index length {index_length} exceeds the payload")
    spans = _tensor_spans(payload[8 : 8 + index_length])
    data = memoryview(payload)[8 + index_length :]
    covered = spans[-1][1] if spans else 0
    if covered != len(data):
        raise CorruptStateError(f"tensor data is {len(data)} bytes but the index covers {covered}")
    # One writable copy (the blob is immutable bytes; states must be writable), viewed per tensor.
    writable = bytearray(data)
    tensors = {}
    for begin, end, name, dtype, shape in spans:
        numpy_dtype = _NUMPY_DTYPES.get(dtype)
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif numpy_dtype is not None and begin % numpy_dtype.itemsize == 0:
            count = (end - begin) // numpy_dtype.itemsize
            values = np.frombuffer(writable, numpy_dtype, count, begin).reshape(shape)
            tensors[name] = torch.from_numpy(values)
        else:  # bfloat16, or a dtype's values off their alignment
            tensors[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).reshape(shape)
    return tensors, spans


@functools.lru_cache(maxsize=256)
def _record_schema_hash(spans: _Spans) -> str | None:
    """The schema hash of tensors read by `spans` when they pass `StateRecord`'s tensor checks
    (names, dtypes and shapes are the index's, already checked; the batch sizes must agree),
    else None. Cached: every state of one model has the same index."""
    if not spans or len({shape[0] for *_, shape in spans}) != 1:
        return None
    return _schema_hash(
        tuple(sorted((name, torch.Size(shape[1:]), dtype) for _, _, name, dtype, shape in spans))
    )


@functools.lru_cache(maxsize=256)
def _tensor_spans(index_bytes: bytes) -> _Spans:
    """(begin, end, name, dtype, shape) per tensor in data order, from a checked index.

    Cached by the index's bytes: every state of one model has the same index. A CorruptStateError
    is not cached (lru_cache keeps only returned values)."""
    try:
        index = json.loads(
            index_bytes.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptStateError(f"tensor index is not valid JSON: {exc}") from exc
    if not isinstance(index, dict):
        raise CorruptStateError("tensor index is not a JSON object")
    metadata = index.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptStateError("tensor index __metadata__ is not a string mapping")
    spans = []
    for name, entry in index.items():
        begin, end = _check_index_entry(name, entry)
        dtype = _DTYPE_BY_CODE[entry["dtype"]]
        spans.append((begin, end, name, dtype, tuple(entry["shape"])))
    spans.sort(key=lambda span: (span[0], span[1]))
    position = 0
    for begin, end, name, _, _ in spans:
        if begin != position:
            raise CorruptStateError(f"tensor {name!r} data is not contiguous with the previous")
        position = end
    return tuple(spans)


def _check_index_entry(name: str, entry: Any) -> tuple[int, int]:
    if not name or not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CorruptStateError(f"tensor index entry {name!r} is malformed")
    dtype = _DTYPE_BY_CODE.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    shape, offsets = entry["shape"], entry["data_offsets"]
    if (
        dtype is None
        or not isinstance(shape, list)
        or not 1 <= len(shape) <= _MAX_NDIM
        or not all(_is_int_in(d, 0, _MAX_DIM) for d in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int_in(o, 0, 1 << 62) for o in offsets)
    ):
        raise CorruptStateError(f"tensor index entry {name!r} has a bad dtype, shape or offsets")
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CorruptStateError(f"tensor {name!r} offsets do not match its shape and dtype")
    return begin, end


# --- helpers ------------------------------------------------------------------------------


def _check_tensor(name: Any, tensor: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"state tensor names must be non-empty strings, got {name!r}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"state entry {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(f"state tensor {name!r} must be dense, got layout {tensor.layout}")
    if tensor.dtype not in SAFETENSORS_DTYPES:
        raise ValueError(
            f"state tensor {name!r} has unsupported dtype {tensor.dtype}; "
            f"supported: {', '.join(str(d) for d in SAFETENSORS_DTYPES)}"
        )
    if tensor.ndim == 0:
        raise ValueError(f"state tensor {name!r} needs a leading batch dimension, got a scalar")


def _check_header_fields(fields: Mapping[str, Any]) -> None:
    """A record's fields besides its tensors and metadata, as the constructor checks them."""
    for name in ("model", "version", "backend"):
        value = fields[name]
        if not isinstance(value, str) or not value:
            raise ValueError(f"state {name} must be a non-empty string, got {value!r}")
    step = fields["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"state step must be a non-negative integer, got {step!r}")
    for name in ("created_at", "updated_at"):
        value = fields[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value >= 0)
        ):
            raise ValueError(f"state {name} must be a finite unix time, got {value!r}")


def _normalise_metadata(metadata: Any) -> dict[str, Any]:
    if not isinstance(metadata, Mapping):
        raise TypeError(f"session metadata must be a mapping, got {type(metadata).__name__}")
    bad_keys = [key for key in metadata if not isinstance(key, str)]
    if bad_keys:
        raise ValueError(f"session metadata keys must be strings, got {bad_keys!r}")
    try:
        text = json.dumps(dict(metadata), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(
            f"session metadata must be JSON-serialisable (finite numbers, string keys): {exc}"
        ) from exc
    if len(text) > MAX_METADATA_BYTES:
        raise ValueError(
            f"session metadata is {len(text)} bytes, over the {MAX_METADATA_BYTES}-byte limit"
        )
    return _JsonMetadata(json.loads(text))


class _JsonMetadata(dict):
    """Session metadata already in its JSON-normalised form (treated as immutable)."""


def _is_int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in JSON")
