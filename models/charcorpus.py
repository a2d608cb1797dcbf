"""A character corpus built from text present on every machine: the standard library's docstrings.

Building it (a few seconds, nothing downloaded, nothing cached on disk):

1. Walk `sysconfig.get_paths()["stdlib"]` in sorted order, skipping `site-packages`,
   `dist-packages`, test packages and `__pycache__`, so the text depends only on the
   Python version, not on what else is installed.
2. Parse each `.py` file with `ast` (files that fail to read or parse are skipped) and take
   the docstrings of the module, its classes and its functions in source order, cleaned with
   `inspect.cleandoc` (via `ast.get_docstring`). Each docstring is one document.
3. Stop once the corpus reaches `max_chars` characters.
4. Hold out every 20th document (documents 19, 39, ...) as the validation split, so held-out
   text comes from all over the library rather than from its alphabetically last modules.
   Each split is its documents, each followed by a blank line ("\\n\\n").

Vocabulary (fixed, 97 symbols): index 0 is the unknown symbol U+FFFD, index 1 is "\\n",
indices 2..96 are printable ASCII " " .. "~". Tabs are expanded to 4 spaces and "\\r\\n" /
"\\r" become "\\n" before encoding (`normalize_text`); every other character outside the
vocabulary (accented letters, other control characters, ...) encodes to the unknown symbol,
so decoding shows it as U+FFFD.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.datasets import sha256_of_arrays

UNKNOWN_CHAR = "\ufffd"
VOCABULARY: tuple[str, ...] = (UNKNOWN_CHAR, "\n", *(chr(code) for code in range(32, 127)))
UNKNOWN_ID = 0
_CHAR_TO_ID = {char: index for index, char in enumerate(VOCABULARY)}
# Lookup table for the ASCII range; anything beyond it is unknown.
_ASCII_TO_ID = np.full(128, UNKNOWN_ID, dtype=np.int64)
for _char, _index in _CHAR_TO_ID.items():
    if ord(_char) < 128:
        _ASCII_TO_ID[ord(_char)] = _index

DEFAULT_MAX_CHARS = 1_000_000
HOLDOUT_EVERY = 20  # document i is held out when i % 20 == 19
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
_DOCUMENTED_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def normalize_text(text: str) -> str:
    """Line endings to "\\n" and tabs to 4 spaces, the only rewrites before encoding."""
    return text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)


def encode(text: str) -> Tensor:
    """Characters -> ids [len(text)] long; characters outside the vocabulary -> UNKNOWN_ID."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)  # [L]
    ids = np.full(codes.shape, UNKNOWN_ID, dtype=np.int64)  # [L]
    ascii_mask = codes < 128
    ids[ascii_mask] = _ASCII_TO_ID[codes[ascii_mask]]
    return torch.from_numpy(ids)


def decode(ids: Tensor | list[int]) -> str:
    """Ids -> text; raises ValueError on an id outside the vocabulary."""
    values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    bad = [value for value in values if not 0 <= value < len(VOCABULARY)]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary 0..{len(VOCABULARY) - 1}")
    return "".join(VOCABULARY[value] for value in values)


@dataclass(frozen=True)
class CharCorpus:
    """Token ids of a train and a held-out split over the fixed `VOCABULARY`."""

    name: str
    train_ids: Tensor  # [N_train] long
    valid_ids: Tensor  # [N_valid] long
    vocabulary: tuple[str, ...]
    sha256: str

    @classmethod
    def from_texts(cls, name: str, train_text: str, valid_text: str) -> CharCorpus:
        train_ids = encode(normalize_text(train_text))
        valid_ids = encode(normalize_text(valid_text))
        if train_ids.numel() < 2 or valid_ids.numel() < 2:
            raise ValueError(
                f"{name}: both splits need at least 2 characters, got train "
                f"{train_ids.numel()} and held-out {valid_ids.numel()}"
            )
        return cls(
            name=name,
            train_ids=train_ids,
            valid_ids=valid_ids,
            vocabulary=VOCABULARY,
            sha256=sha256_of_arrays(train_ids.numpy(), valid_ids.numpy()),
        )

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def encode(self, text: str) -> Tensor:
        return encode(normalize_text(text))

    def decode(self, ids: Tensor | list[int]) -> str:
        return decode(ids)


def _stdlib_files(root: Path) -> Iterator[Path]:
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(name for name in subdirs if name not in _SKIPPED_DIRS)
        for file_name in sorted(files):
            if file_name.endswith(".py"):
                yield Path(directory) / file_name


def _docstrings(path: Path) -> list[str]:
    """Docstrings of a file's module, classes and functions in source order; [] if unparsable."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []
    nodes = [node for node in ast.walk(tree) if isinstance(node, _DOCUMENTED_NODES)]
    nodes.sort(key=lambda node: getattr(node, "lineno", 0))  # the module node has no lineno
    return [doc for node in nodes if (doc := ast.get_docstring(node, clean=True))]


def stdlib_documents(max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """The standard library's docstrings in a fixed order, until `max_chars` is reached."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    documents: list[str] = []
    total = 0
    for path in _stdlib_files(Path(sysconfig.get_paths()["stdlib"])):
        for doc in _docstrings(path):
            documents.append(doc)
            total += len(doc) + 2
            if total >= max_chars:
                return documents
    return documents


def split_documents(documents: list[str]) -> tuple[str, str]:
    """(train text, held-out text): every HOLDOUT_EVERY-th document is held out."""
    train = [d for i, d in enumerate(documents) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    valid = [d for i, d in enumerate(documents) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    return "".join(d + "\n\n" for d in train), "".join(d + "\n\n" for d in valid)


@lru_cache(maxsize=2)
def load_char_corpus(max_chars: int = DEFAULT_MAX_CHARS) -> CharCorpus:
    """The stdlib-docstring corpus (built once per process, kept only in memory)."""
    train_text, valid_text = split_documents(stdlib_documents(max_chars))
    name = f"charcorpus/stdlib-docstrings/{max_chars}"
    return CharCorpus.from_texts(name, train_text, valid_text)
