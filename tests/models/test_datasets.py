"""Datasets: digits as sequences (split, variants, shifts), the stdlib character corpus, and
a user's .npz / text files."""

from __future__ import annotations
import __future__

import inspect
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from models import charcorpus, digits
from models.charcorpus import VOCABULARY, decode, encode, normalize_text
from models.datasets import SequenceDataset, sha256_of_arrays, split_dataset
from models.userdata import load_npz_dataset, load_text_corpus

# ---- digits ---------------------------------------------------------------------------------


def test_digits_split_is_the_fixed_permutation() -> None:
    expected = np.random.default_rng(0).permutation(1797)
    parts = [digits.split_indices(split) for split in digits.SPLITS]
    assert [len(part) for part in parts] == [1000, 400, 397]
    np.testing.assert_array_equal(np.concatenate(parts), expected)


@pytest.mark.parametrize("split", digits.SPLITS)
def test_digits_rows_and_pixels_hold_the_sklearn_images(split: str) -> None:
    bunch = load_digits()
    indices = digits.split_indices(split)
    rows = digits.load_digits_seq(split, "rows")
    pixels = digits.load_digits_seq(split, "pixels")
    assert rows.inputs.shape == (len(indices), 8, 8) and rows.inputs.dtype == torch.float32
    assert pixels.inputs.shape == (len(indices), 64, 1) and pixels.inputs.dtype == torch.float32
    np.testing.assert_array_equal(rows.inputs.numpy(), bunch.images[indices])
    np.testing.assert_array_equal(pixels.inputs.numpy()[:, :, 0], bunch.data[indices])
    np.testing.assert_array_equal(rows.labels.numpy(), bunch.target[indices])
    assert rows.labels.dtype == torch.long
    assert rows.label_names == [str(d) for d in range(10)]
    assert rows.value_range == (0.0, 16.0)


def test_digits_hashes_are_deterministic_and_distinct() -> None:
    first = digits.load_digits_seq("test")
    again = digits.load_digits_seq("test")
    assert (
        first.sha256 == again.sha256 == sha256_of_arrays(first.inputs.numpy(), first.labels.numpy())
    )
    hashes = {
        digits.load_digits_seq(split, variant).sha256
        for split in digits.SPLITS
        for variant in digits.VARIANTS
    }
    assert len(hashes) == 6


def test_inverted_shift_is_sixteen_minus_x() -> None:
    clean = digits.load_digits_seq("calibration")
    inverted = digits.load_digits_seq("calibration", shift="inverted")
    torch.testing.assert_close(inverted.inputs, 16.0 - clean.inputs, rtol=0, atol=0)
    assert torch.equal(inverted.labels, clean.labels)


def test_gaussian_noise_statistics_on_blank_pixels() -> None:
    """Blank pixels (value 0) become max(0, Z), Z ~ N(0, 4^2): P(> 0) = 1/2 and
    E = 4 / sqrt(2 pi), Var = 16/2 - E^2 (clipping at 16 has probability ~3e-5)."""
    clean = digits.load_digits_seq("train").inputs
    noisy = digits.load_digits_seq("train", shift="gaussian_noise").inputs
    assert float(noisy.min()) >= 0.0 and float(noisy.max()) <= 16.0
    blank = noisy[clean == 0].double()
    n = blank.numel()
    assert n > 10_000
    positive_fraction = float((blank > 0).double().mean())
    assert abs(positive_fraction - 0.5) < 4 * math.sqrt(0.25 / n)
    mean = 4.0 / math.sqrt(2 * math.pi)
    std = math.sqrt(8.0 - mean**2)
    assert abs(float(blank.mean()) - mean) < 4 * std / math.sqrt(n)


def test_gaussian_noise_is_seeded_per_split_and_shared_by_variants() -> None:
    first = digits.load_digits_seq("test", shift="gaussian_noise")
    again = digits.load_digits_seq("test", shift="gaussian_noise")
    other_seed = digits.load_digits_seq("test", shift="gaussian_noise", seed=1)
    pixels = digits.load_digits_seq("test", "pixels", shift="gaussian_noise")
    assert torch.equal(first.inputs, again.inputs) and first.sha256 == again.sha256
    assert not torch.equal(first.inputs, other_seed.inputs)
    assert torch.equal(pixels.inputs.view(-1, 8, 8), first.inputs)
    calibration = digits.load_digits_seq("calibration", shift="gaussian_noise").inputs
    assert not torch.equal(calibration[:100], first.inputs[:100])


def test_translated_moves_each_image_by_one_pixel() -> None:
    clean = digits.load_digits_seq("test").inputs
    moved = digits.load_digits_seq("test", shift="translated").inputs
    zero_row, zero_col = torch.zeros(len(clean), 1, 8), torch.zeros(len(clean), 8, 1)
    candidates = torch.stack(
        [
            torch.cat([clean[:, 1:], zero_row], dim=1),  # up
            torch.cat([zero_row, clean[:, :-1]], dim=1),  # down
            torch.cat([clean[:, :, 1:], zero_col], dim=2),  # left
            torch.cat([zero_col, clean[:, :, :-1]], dim=2),  # right
        ]
    )  # [4, N, 8, 8]
    matches = (candidates == moved).flatten(2).all(dim=2)  # [4, N]
    assert bool(matches.any(dim=0).all()), "every image must equal one of the four shifts"
    assert bool(matches.any(dim=1).all()), "all four directions must occur"
    assert torch.equal(moved, digits.load_digits_seq("test", shift="translated").inputs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "validation"}, "unknown digits split 'validation'"),
        ({"split": "test", "variant": "columns"}, "unknown digits variant 'columns'"),
        ({"split": "test", "shift": "rotated"}, "unknown digits shift 'rotated'"),
    ],
)
def test_digits_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        digits.load_digits_seq(**kwargs)


# ---- the character corpus -------------------------------------------------------------------


def test_vocabulary_is_fixed_printable_ascii_newline_and_unknown() -> None:
    assert len(VOCABULARY) == 97 and len(set(VOCABULARY)) == 97
    assert VOCABULARY[0] == "\ufffd" and VOCABULARY[1] == "\n"
    assert "".join(VOCABULARY[2:]) == "".join(chr(c) for c in range(32, 127))


def test_encode_decode_roundtrip_and_unknown_characters() -> None:
    text = 'def f(x):\n    return {"a": x ~ 1}  # ok!'
    ids = encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert decode(ids) == text
    assert encode("é€😀").tolist() == [0, 0, 0]
    assert decode(encode("naïve")) == "na\ufffdve"
    assert normalize_text("a\tb\r\nc\rd") == "a   b\nc\nd"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decode([5, 97])


def test_vectorised_encode_matches_a_per_character_lookup() -> None:
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.integers(0, 200, 500), rng.integers(0x100, 0x1F600, 20)])
    text = "".join(chr(code) for code in codes if not 0xD800 <= code < 0xE000)
    lookup = {char: index for index, char in enumerate(VOCABULARY)}
    assert encode(text).tolist() == [lookup.get(char, 0) for char in text]


def test_stdlib_documents_start_with_the_first_module_docstring() -> None:
    documents = charcorpus.stdlib_documents(max_chars=20_000)
    assert documents[0] == inspect.cleandoc(__future__.__doc__)
    assert 20_000 <= sum(len(d) + 2 for d in documents) < 20_000 + len(documents[-1]) + 2
    assert charcorpus.stdlib_documents(max_chars=20_000) == documents


def test_split_documents_holds_out_every_twentieth() -> None:
    documents = [f"doc {i}" for i in range(45)]
    train, valid = charcorpus.split_documents(documents)
    assert valid == "doc 19\n\ndoc 39\n\n"
    assert train.count("\n\n") == 43 and "doc 19\n" not in train


def test_full_char_corpus_builds_with_a_small_held_out_split() -> None:
    corpus = charcorpus.load_char_corpus()
    n_train, n_valid = corpus.train_ids.numel(), corpus.valid_ids.numel()
    assert n_train + n_valid >= charcorpus.DEFAULT_MAX_CHARS
    assert 0.02 < n_valid / (n_train + n_valid) < 0.10
    assert corpus.vocab_size == 97 and int(corpus.train_ids.max()) < 97
    # Docstrings are nearly all ASCII: unknown symbols must be rare.
    assert float((corpus.train_ids == 0).double().mean()) < 0.01
    assert corpus.sha256 == sha256_of_arrays(corpus.train_ids.numpy(), corpus.valid_ids.numpy())


# ---- the user's data ------------------------------------------------------------------------


def _save_npz(tmp_path, **arrays) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def test_npz_roundtrip_with_and_without_label_names(tmp_path) -> None:
    rng = np.random.default_rng(3)
    inputs = rng.normal(size=(12, 5, 3))
    labels = np.arange(12) % 3
    dataset = load_npz_dataset(_save_npz(tmp_path, inputs=inputs, labels=labels))
    assert dataset.inputs.dtype == torch.float32 and dataset.inputs.shape == (12, 5, 3)
    np.testing.assert_allclose(dataset.inputs.numpy(), inputs, rtol=1e-6)
    assert dataset.labels.tolist() == labels.tolist()
    assert dataset.label_names == ["0", "1", "2"]
    named = load_npz_dataset(
        _save_npz(
            tmp_path, inputs=inputs, labels=labels, label_names=np.array(["a", "b", "c", "d"])
        )
    )
    assert named.label_names == ["a", "b", "c", "d"] and named.n_classes == 4
    assert named.sha256 == dataset.sha256  # the hash covers the arrays a model sees


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"inputs": np.zeros((4, 2, 1))}, r"missing array\(s\) \['labels'\]"),
        (
            {"inputs": np.zeros((4, 2, 1)), "labels": np.arange(4), "extra": np.zeros(1)},
            "unexpected array",
        ),
        (
            {"inputs": np.zeros((4, 2)), "labels": np.arange(4)},
            r"'inputs' must be a non-empty \[N, T, F\]",
        ),
        (
            {"inputs": np.zeros((4, 2, 1), dtype=bool), "labels": np.arange(4)},
            "'inputs' must be real numbers",
        ),
        ({"inputs": np.full((4, 2, 1), np.nan), "labels": np.arange(4)}, "8 non-finite values"),
        ({"inputs": np.full((4, 2, 1), 1e300), "labels": np.arange(4)}, "non-finite"),
        (
            {"inputs": np.zeros((4, 2, 1)), "labels": np.arange(3)},
            r"'labels' must be \[N\] with N=4",
        ),
        ({"inputs": np.zeros((4, 2, 1)), "labels": np.arange(4.0)}, "integer dtype"),
        ({"inputs": np.zeros((4, 2, 1)), "labels": np.array([0, 1, -1, 0])}, "non-negative"),
        ({"inputs": np.zeros((4, 2, 1)), "labels": np.zeros(4, dtype=int)}, "at least 2 classes"),
        (
            {
                "inputs": np.zeros((4, 2, 1)),
                "labels": np.arange(4),
                "label_names": np.array(["a", "b"]),
            },
            "label 3 is out of range for 2 label_names",
        ),
        (
            {
                "inputs": np.zeros((4, 2, 1)),
                "labels": np.arange(4),
                "label_names": np.array([1, 2, 3, 4]),
            },
            "'label_names' must be a 1-D string array",
        ),
    ],
)
def test_npz_problems_are_named(tmp_path, arrays: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_npz_dataset(_save_npz(tmp_path, **arrays))


def test_npz_refuses_pickles_and_non_archives(tmp_path) -> None:
    objects = np.array([{"a": 1}, None], dtype=object)
    path = _save_npz(
        tmp_path, inputs=np.zeros((2, 1, 1)), labels=np.array([0, 1]), label_names=objects
    )
    with pytest.raises(ValueError, match="object arrays, which are refused"):
        load_npz_dataset(path)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="garbage.npz"):
        load_npz_dataset(garbage)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="found a single .npy array"):
        load_npz_dataset(single)
    with pytest.raises(ValueError, match="no such file"):
        load_npz_dataset(tmp_path / "absent.npz")


def test_split_dataset_is_seeded_disjoint_and_complete() -> None:
    dataset = SequenceDataset.from_arrays(
        "toy", np.arange(40.0).reshape(20, 2, 1), np.arange(20) % 2, ["even", "odd"]
    )
    train, holdout = split_dataset(dataset, 0.25, seed=5)
    assert (len(train), len(holdout)) == (15, 5)
    seen = sorted(train.inputs[:, 0, 0].tolist() + holdout.inputs[:, 0, 0].tolist())
    assert seen == [2.0 * i for i in range(20)]
    again_train, _ = split_dataset(dataset, 0.25, seed=5)
    assert again_train.sha256 == train.sha256
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_dataset(dataset, 1.0)


def test_text_corpus_holds_out_the_tail_at_a_line_start(tmp_path) -> None:
    lines = [f"line number {i}" for i in range(100)]
    path = tmp_path / "notes.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = load_text_corpus(path, holdout_fraction=0.05)
    train, valid = decode(corpus.train_ids), decode(corpus.valid_ids)
    assert train + valid == path.read_text()
    assert train.endswith("\n") and valid.startswith("line number 9")
    assert 0.03 < len(valid) / (len(train) + len(valid)) < 0.07
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_text_corpus(path)
