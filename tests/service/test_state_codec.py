"""State codec: exact round trips, schema hashing, compatibility checks, corruption fuzzing."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.state.codec import (
    MAX_METADATA_BYTES,
    SAFETENSORS_DTYPES,
    CorruptStateError,
    IncompatibleStateError,
    StateCodecError,
    StateRecord,
    StateSignature,
    decode_state,
    encode_state,
    safetensors_bytes,
    safetensors_bytes_reference,
    tensor_schema_hash,
    tensors_from_safetensors,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PREFIX_BYTES = 9  # magic (4) + format (1) + header length (4), as the module documents
DIGEST_BYTES = 32


def lru_like_state(batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layers.0.h": torch.randn(batch, 16, dtype=torch.complex64, generator=generator),
        "layers.1.h": torch.randn(batch, 16, dtype=torch.complex64, generator=generator),
        "spikes": torch.rand(batch, 8, generator=generator) > 0.5,
        "membrane": torch.randn(batch, 8, generator=generator),
    }


def make_record(tensors: dict[str, torch.Tensor] | None = None, **overrides) -> StateRecord:
    fields = {"model": "digits-lru", "version": "1", "backend": "torch", "now": 1.7e9}
    fields.update(overrides)
    return StateRecord.new(lru_like_state() if tensors is None else tensors, **fields)


def reseal(body: bytes) -> bytes:
    """Append a fresh checksum, so mutated bytes get past the integrity check to the parser."""
    return body + hashlib.sha256(body).digest()


def split_blob(blob: bytes) -> tuple[dict, bytes]:
    """(header dict, safetensors payload) of a blob, following the documented layout."""
    (header_length,) = struct.unpack_from(">I", blob, 5)
    header = json.loads(blob[PREFIX_BYTES : PREFIX_BYTES + header_length])
    return header, blob[PREFIX_BYTES + header_length : -DIGEST_BYTES]


def assemble(header: dict, payload: bytes, format_version: int = 1) -> bytes:
    header_bytes = json.dumps(header).encode()
    prefix = struct.pack(">4sBI", b"NSST", format_version, len(header_bytes))
    return reseal(prefix + header_bytes + payload)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8))


# --- round trips --------------------------------------------------------------------------


def test_round_trip_is_bit_exact_for_every_supported_dtype() -> None:
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for dtype in SAFETENSORS_DTYPES:
        raw = torch.randint(0, 256, (3, 5 * dtype.itemsize), dtype=torch.uint8, generator=generator)
        tensors[f"t.{str(dtype).removeprefix('torch.')}"] = raw.view(dtype)  # any bit pattern
    specials = torch.tensor([[float("nan"), -0.0, float("inf"), -float("inf"), 1e-45]])
    tensors["specials"] = specials.expand(3, 5).clone()
    record = make_record(tensors, metadata={"alpha": 0.1, "score": "aps", "owner": "alice"})

    decoded = decode_state(encode_state(record))

    assert sorted(decoded.tensors) == sorted(tensors)
    for name, tensor in tensors.items():
        assert same_bits(decoded.tensors[name], tensor), name
    assert (decoded.model, decoded.version, decoded.backend) == ("digits-lru", "1", "torch")
    assert (decoded.step, decoded.created_at, decoded.updated_at) == (0, 1.7e9, 1.7e9)
    assert decoded.metadata == {"alpha": 0.1, "score": "aps", "owner": "alice"}
    assert decoded.signature == record.signature


def test_round_trip_of_non_contiguous_tensors_keeps_values() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    record = make_record({"h": base.t()})  # [6, 4], strided
    decoded = decode_state(encode_state(record))
    assert torch.equal(decoded.tensors["h"], base.t())
    decoded.tensors["h"][0, 0] = -1.0  # decoded tensors own writable memory
    assert base[0, 0] == 0.0


def test_metadata_is_json_normalised_so_it_round_trips() -> None:
    record = make_record(metadata={"options": {"never_empty": True, "classes": (1, 2)}})
    assert record.metadata == {"options": {"never_empty": True, "classes": [1, 2]}}
    assert decode_state(encode_state(record)).metadata == record.metadata


def test_advance_counts_steps_and_keeps_creation_time() -> None:
    record = make_record(metadata={"alpha": 0.1})
    later = record.advance(lru_like_state(seed=1), 5, now=1.7e9 + 3)
    later = later.advance(lru_like_state(seed=2), 2, metadata={"alpha": 0.2}, now=1.7e9 + 4)
    decoded = decode_state(encode_state(later))
    assert decoded.step == 7
    assert (decoded.created_at, decoded.updated_at) == (1.7e9, 1.7e9 + 4)
    assert decoded.metadata == {"alpha": 0.2}
    assert same_bits(decoded.tensors["membrane"], lru_like_state(seed=2)["membrane"])
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        record.advance(lru_like_state(), -1)


def test_advance_to_another_layout_is_checked_as_a_new_record_is() -> None:
    record = make_record()
    widened = {**lru_like_state(), "membrane": torch.randn(1, 9)}
    assert record.advance(widened, 1).schema_hash == tensor_schema_hash(widened)
    assert record.advance(widened, 1).schema_hash != record.schema_hash
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        record.advance({**lru_like_state(), "membrane": [0.0] * 8}, 1)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        record.advance({**lru_like_state(), "membrane": torch.randn(2, 8)}, 1)
    with pytest.raises(ValueError, match="finite unix time"):
        record.advance(lru_like_state(), 1, now=float("nan"))
    with pytest.raises(ValueError, match="JSON-serialisable"):
        record.advance(lru_like_state(), 1, metadata={"x": float("inf")})


def test_advance_in_the_same_layout_keeps_the_hash_it_would_compute() -> None:
    record = make_record()
    later = record.advance(lru_like_state(seed=3), 1)
    assert later.schema_hash == tensor_schema_hash(later.tensors) == record.schema_hash
    assert later.tensors is not record.tensors


def test_a_copy_owns_its_tensors_and_encodes_alike() -> None:
    batched = lru_like_state(batch=3, seed=4)
    record = make_record({name: tensor[1:2] for name, tensor in batched.items()})  # views
    blob = encode_state(record)
    copy = record.copy()
    for tensor in batched.values():
        tensor.zero_()  # the batch is reused: the copy must not see it
    assert encode_state(copy) == blob
    assert copy.signature == record.signature and copy.metadata == record.metadata
    for tensor in copy.tensors.values():
        assert tensor.untyped_storage().nbytes() == tensor.nbytes  # not the whole batch


def test_a_decoded_record_has_the_hash_its_tensors_give() -> None:
    decoded = decode_state(encode_state(make_record()))
    assert decoded.schema_hash == tensor_schema_hash(decoded.tensors)


def test_non_contiguous_and_conjugate_tensors_are_written_by_value() -> None:
    base = torch.randn(3, 4, dtype=torch.complex64)
    views = {"t": torch.randn(4, 3).t(), "c": base.conj(), "n": torch.randn(2, 5)[:, ::2]}
    expected = {name: view.resolve_conj().contiguous() for name, view in views.items()}
    assert safetensors_bytes(views) == safetensors_bytes_reference(expected)


@st.composite
def random_states(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    batch = draw(st.integers(0, 3))
    names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=0, max_size=4, unique=True))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        dtype = draw(st.sampled_from(list(SAFETENSORS_DTYPES)))
        shape = [batch, *draw(st.lists(st.integers(0, 4), max_size=3))]
        nbytes = dtype.itemsize * int(torch.tensor(shape).prod())
        raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


@FUZZ
@given(tensors=random_states(), step=st.integers(0, 2**40))
def test_random_states_round_trip_exactly(tensors: dict[str, torch.Tensor], step: int) -> None:
    record = StateRecord(tensors, "m", "v", "b", step, 1.0, 2.0, {"k": [1, "x", None]})
    decoded = decode_state(encode_state(record))
    assert sorted(decoded.tensors) == sorted(tensors)
    assert all(same_bits(decoded.tensors[name], tensors[name]) for name in tensors)
    assert decoded.step == step
    assert decoded.schema_hash == record.schema_hash


# --- schema hash and compatibility --------------------------------------------------------


def test_schema_hash_ignores_batch_size_values_and_order() -> None:
    one, four = lru_like_state(batch=1, seed=0), lru_like_state(batch=4, seed=9)
    reordered = dict(reversed(list(one.items())))
    assert tensor_schema_hash(one) == tensor_schema_hash(four) == tensor_schema_hash(reordered)


@pytest.mark.parametrize(
    "change",
    [
        lambda s: {**s, "extra": torch.zeros(1, 1)},
        lambda s: {("h2" if k == "membrane" else k): v for k, v in s.items()},
        lambda s: {**s, "membrane": torch.zeros(1, 9)},
        lambda s: {**s, "membrane": torch.zeros(1, 8, dtype=torch.float64)},
        lambda s: {**s, "membrane": torch.zeros(1, 8, 1)},
    ],
    ids=["added", "renamed", "resized", "retyped", "reshaped"],
)
def test_schema_hash_changes_with_names_shapes_and_dtypes(change) -> None:
    state = lru_like_state()
    assert tensor_schema_hash(change(state)) != tensor_schema_hash(state)


def test_matching_signature_decodes() -> None:
    record = make_record()
    expected = StateSignature.of(
        lru_like_state(batch=2), model="digits-lru", version="1", backend="torch"
    )
    assert decode_state(encode_state(record), expected).step == 0


@pytest.mark.parametrize("field", ["model", "version", "backend", "schema_hash"])
def test_mismatching_signature_is_incompatible_and_names_the_field(field: str) -> None:
    record = make_record()
    values = {"model": "digits-lru", "version": "1", "backend": "torch"}
    values["schema_hash"] = record.schema_hash
    values[field] = "something-else"
    with pytest.raises(IncompatibleStateError, match=f"{field} .*expected 'something-else'"):
        decode_state(encode_state(record), StateSignature(**values))


def test_unknown_format_version_is_incompatible_not_corrupt() -> None:
    header, payload = split_blob(encode_state(make_record()))
    with pytest.raises(IncompatibleStateError, match="format 2"):
        decode_state(assemble(header, payload, format_version=2))


# --- corruption ---------------------------------------------------------------------------


def test_every_single_bit_flip_is_detected() -> None:
    blob = encode_state(make_record({"h": torch.ones(1, 3)}))
    for bit in range(len(blob) * 8):
        damaged = bytearray(blob)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptStateError):
            decode_state(bytes(damaged))


def test_every_truncation_is_detected() -> None:
    blob = encode_state(make_record({"h": torch.ones(1, 3)}))
    for length in range(len(blob)):
        with pytest.raises(CorruptStateError):
            decode_state(blob[:length])


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes_are_refused_as_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptStateError):
        decode_state(data)
    with pytest.raises(CorruptStateError):
        decode_state(b"NSST\x01" + data)


@FUZZ
@given(flips=st.lists(st.integers(min_value=0), min_size=1, max_size=8))
def test_bit_flips_are_refused_as_corrupt(flips: list[int]) -> None:
    blob = bytearray(encode_state(make_record()))
    for flip in set(flips):
        blob[(flip // 8) % len(blob)] ^= 1 << (flip % 8)
    if bytes(blob) == encode_state(make_record()):  # an even number of flips of one bit
        return
    with pytest.raises(CorruptStateError):
        decode_state(bytes(blob))


@FUZZ
@given(
    flips=st.lists(st.integers(min_value=0), min_size=1, max_size=8),
    cut=st.integers(min_value=0, max_value=64),
)
def test_parser_survives_damage_behind_a_valid_checksum(flips: list[int], cut: int) -> None:
    """Bytes that pass the checksum (as if forged) still only decode or raise codec errors."""
    body = bytearray(encode_state(make_record(metadata={"alpha": 0.1}))[:-DIGEST_BYTES])
    for flip in flips:
        body[(flip // 8) % len(body)] ^= 1 << (flip % 8)
    try:
        record = decode_state(reseal(bytes(body[: len(body) - cut])))
    except StateCodecError:
        return
    # What decodes is a fully valid record: it encodes and decodes again unchanged.
    again = decode_state(encode_state(record))
    assert again.signature == record.signature and again.step == record.step


def test_header_that_lies_about_the_schema_is_corrupt() -> None:
    header, payload = split_blob(encode_state(make_record()))
    header["schema_hash"] = tensor_schema_hash({"other": torch.zeros(1, 2)})
    with pytest.raises(CorruptStateError, match="schema hash does not match"):
        decode_state(assemble(header, payload))


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.pop("step"),
        lambda h: h.update(step=-1),
        lambda h: h.update(step=1.5),
        lambda h: h.update(model=""),
        lambda h: h.update(created_at="yesterday"),
        lambda h: h.update(metadata=[1, 2]),
        lambda h: h.update(extra_field=1),
    ],
    ids=["missing", "negative-step", "float-step", "empty-model", "bad-time", "list-meta", "extra"],
)
def test_malformed_header_fields_are_corrupt(edit) -> None:
    header, payload = split_blob(encode_state(make_record()))
    edit(header)
    with pytest.raises(CorruptStateError):
        decode_state(assemble(header, payload))


def test_headers_decode_alike_in_any_spacing_and_duplicate_keys_are_corrupt() -> None:
    """The canonical (compact) header takes a fast parser; any other form the strict one."""
    record = make_record(metadata={"owner": "alice", "alpha": 0.1})
    header, payload = split_blob(encode_state(record))
    spaced = decode_state(assemble(header, payload))  # json.dumps' spacing: the strict path
    compact = decode_state(encode_state(record))
    assert (spaced.step, spaced.metadata, spaced.created_at) == (
        compact.step,
        compact.metadata,
        compact.created_at,
    )
    canonical = json.dumps(header, separators=(",", ":"))
    duplicated = canonical[:-1] + ',"step":7}'  # compact, with "step" twice
    prefix = struct.pack(">4sBI", b"NSST", 1, len(duplicated))
    with pytest.raises(CorruptStateError, match="duplicate"):
        decode_state(reseal(prefix + duplicated.encode() + payload))


def test_tensor_index_that_disagrees_with_the_data_is_corrupt() -> None:
    header, payload = split_blob(encode_state(make_record({"h": torch.ones(1, 4)})))
    (index_length,) = struct.unpack_from("<Q", payload)
    index = json.loads(payload[8 : 8 + index_length])
    index["h"]["shape"] = [1, 5]  # claims 20 bytes of data where there are 16
    index_bytes = json.dumps(index).encode()
    forged = struct.pack("<Q", len(index_bytes)) + index_bytes + payload[8 + index_length :]
    with pytest.raises(CorruptStateError, match="offsets do not match"):
        decode_state(assemble(header, forged))


def test_non_bytes_are_corrupt() -> None:
    with pytest.raises(CorruptStateError, match="must be bytes"):
        decode_state("NSST")  # type: ignore[arg-type]


# --- bad input when building a record -----------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "kwargs", "error", "message"),
    [
        ({"h": torch.tensor(1.0)}, {}, ValueError, "leading batch dimension"),
        ({"h": [1.0]}, {}, TypeError, "must be a torch.Tensor"),
        ({"h": torch.zeros(1, 2, dtype=torch.complex128)}, {}, ValueError, "unsupported dtype"),
        ({"a": torch.zeros(1, 2), "b": torch.zeros(2, 2)}, {}, ValueError, "batch size"),
        ({"": torch.zeros(1)}, {}, ValueError, "non-empty strings"),
        ({"h": torch.zeros(1)}, {"model": ""}, ValueError, "model must be a non-empty"),
        ({"h": torch.zeros(1)}, {"metadata": {"a": float("nan")}}, ValueError, "JSON"),
        ({"h": torch.zeros(1)}, {"metadata": {1: "a"}}, ValueError, "keys must be strings"),
        ({"h": torch.zeros(1)}, {"metadata": {"a": object()}}, ValueError, "JSON"),
        ({"h": torch.zeros(1)}, {"metadata": {"a": "x" * MAX_METADATA_BYTES}}, ValueError, "limit"),
    ],
)
def test_bad_records_are_refused_with_a_clear_message(tensors, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        make_record(tensors, **kwargs)


def test_negative_step_is_refused() -> None:
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        StateRecord({"h": torch.zeros(1)}, "m", "v", "b", -1, 0.0, 0.0)


# ---- the fast safetensors writer and reader against the library -------------------------------


@pytest.mark.parametrize("dtype", list(SAFETENSORS_DTYPES))
def test_fast_safetensors_bytes_agree_with_the_library_both_ways(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "z_last": (torch.randn(3, 5, generator=generator) * 50).to(dtype),
        "a_first": (torch.randn(3, 2, 4, generator=generator) * 50).to(dtype),
        "m_empty": torch.zeros(3, 0, dtype=dtype),
    }
    fast, reference = safetensors_bytes(tensors), safetensors_bytes_reference(tensors)
    for written in (fast, reference):
        for read in (safetensors.torch.load(written), tensors_from_safetensors(written)):
            assert read.keys() == tensors.keys()
            for name, tensor in tensors.items():
                assert read[name].dtype == tensor.dtype and read[name].shape == tensor.shape
                assert torch.equal(read[name].view(torch.uint8), tensor.view(torch.uint8))
