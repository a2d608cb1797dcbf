"""No unsafe deserialisation anywhere in the served code: safetensors and JSON only.

Each module of `service`, `models`, `calibration` and `hardware_backends` is parsed (so words in
comments and docstrings do not count) and searched for the ways Python runs code while loading
data: pickle and its relatives, `torch.load`, `numpy.load(allow_pickle=True)`, `yaml.load`
without a safe loader, and `eval`/`exec`. The checker itself is tested on snippets that
contain each of them, so a blind checker cannot pass unnoticed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED_PACKAGES = ("service", "models", "calibration", "hardware_backends")
# Modules that turn bytes into arbitrary objects (or run code) when loading.
UNSAFE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "shelve",
    "marshal",
    "joblib",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _call_problem(call: ast.Call) -> str | None:
    name = _dotted(call.func)
    keywords = {keyword.arg: keyword.value for keyword in call.keywords}
    if name in ("eval", "exec"):
        return f"{name}()"
    if name in ("torch.load", "torch.serialization.load"):
        return "torch.load (unpickles)"
    if name.split(".")[0] in UNSAFE_MODULES:
        return f"{name}()"
    allow_pickle = keywords.get("allow_pickle")
    if allow_pickle is not None and not (
        isinstance(allow_pickle, ast.Constant) and allow_pickle.value is False
    ):
        return f"{name}(allow_pickle=...) other than False"
    if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all"):
        return f"{name}()"
    if name in ("yaml.load", "yaml.load_all"):
        loader = keywords.get("Loader", call.args[1] if len(call.args) > 1 else None)
        if loader is None or _dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
            return f"{name}() without a safe Loader"
    return None


def unsafe_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for every unsafe deserialisation in `source`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in UNSAFE_MODULES:
                found.append((node.lineno, f"from {module} import ..."))
            elif module == "torch" and any(alias.name == "load" for alias in node.names):
                found.append((node.lineno, "from torch import load"))
        elif isinstance(node, ast.Call):
            problem = _call_problem(node)
            if problem is not None:
                found.append((node.lineno, problem))
    return found


def checked_files() -> list[Path]:
    return sorted(path for package in CHECKED_PACKAGES for path in (ROOT / package).rglob("*.py"))


def test_the_served_code_has_no_unsafe_deserialisation() -> None:
    files = checked_files()
    assert len(files) > 20, "the packages to check were not found"
    problems = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in files
        for line, what in unsafe_uses(path.read_text())
    ]
    assert problems == [], "unsafe deserialisation:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import cloudpickle as cp",
        "from pickle import loads",
        "from torch import load",
        "import torch\nstate = torch.load('weights.pt')",
        "import torch\nstate = torch.load(path, weights_only=True)",
        "import numpy as np\nnp.load('a.npz', allow_pickle=True)",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(text)",
        "value = eval(text)",
        "exec(code)",
        "import marshal\nmarshal.loads(data)",
    ],
)
def test_the_checker_finds_each_unsafe_form(snippet: str) -> None:
    assert unsafe_uses(snippet) != []


@pytest.mark.parametrize(
    "snippet",
    [
        "model.eval()",
        "import numpy as np\nnp.load('a.npz', allow_pickle=False)",
        "import yaml\nyaml.safe_load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
        "import safetensors.torch\nsafetensors.torch.load(payload)",
        "# pickle is never used; torch.load neither\nx = 1",
        "pipe.eval(source, 1, key)",
    ],
)
def test_the_checker_accepts_the_safe_forms(snippet: str) -> None:
    assert unsafe_uses(snippet) == []
