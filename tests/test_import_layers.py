"""The import graph of the four code packages, read with `ast` (nothing is imported).

- Layers point one way: `service -> (models, calibration, hardware_backends)`,
  `hardware_backends -> models`, `models -> calibration` at most, and `calibration` depends
  on nothing of ours. Every import counts here, at any depth and under `TYPE_CHECKING` too.
- No import cycle among the project's modules, counting the imports a module runs when it
  is loaded (module level, `TYPE_CHECKING` blocks included).
- No import inside a function, which is how a cycle gets hidden. Exceptions: the `neuroserve`
  command modules, which import the heavy parts in their handlers so `--help` starts fast,
  and a few third-party imports named below; each says why in a comment.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("calibration", "models", "hardware_backends", "service")

# What each package must never import.
FORBIDDEN = {
    "calibration": ("models", "hardware_backends", "service"),
    "models": ("hardware_backends", "service"),
    "hardware_backends": ("service",),
}

# Command modules: lazy imports for start-up time, each block under a comment.
CLI_MODULES = frozenset(
    {
        "service.cli.main",
        "service.cli.calibrate",
        "service.cli.common",
        "service.cli.importing",
        "service.cli.keys",
        "service.cli.models",
        "service.cli.worker",
    }
)

# (module, third-party package) imported inside a function on purpose, said on the line.
LAZY_THIRD_PARTY = frozenset(
    {
        ("calibration.plot", "matplotlib"),  # an optional extra, neuroserve[plot]
        ("hardware_backends.onnxruntime_backend", "onnxruntime"),  # reported when missing
        ("models.digits", "sklearn"),  # about a second of start-up for every importer
    }
)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module: a project module, or a third-party top-level name
    line: int
    where: str  # "module", "typing" (under TYPE_CHECKING) or "function"
    run_start: int  # line of the first import in this statement's run of imports

    @property
    def internal(self) -> bool:
        return self.target.split(".")[0] in PACKAGES


def project_modules(root: Path = REPO_ROOT) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST, where: str = "module") -> Iterator[tuple[ast.stmt, str, int]]:
    """(import statement, where it runs, line of the first import of its run of imports)."""
    run_start, previous = 0, None
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            if not isinstance(previous, ast.Import | ast.ImportFrom):
                run_start = child.lineno
            yield child, where, run_start
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _import_nodes(child, "function")
        elif isinstance(child, ast.If) and where == "module" and _is_type_checking(child.test):
            for statement in child.body:
                yield from _import_nodes(ast.Module([statement], []), "typing")
            for statement in child.orelse:
                yield from _import_nodes(ast.Module([statement], []), "module")
        else:
            yield from _import_nodes(child, where)
        previous = child


def _targets(node: ast.stmt, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """The modules an import statement loads: the nearest project module for our own code,
    the top-level package name for third-party code."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package upwards
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{alias.name}" for alias in node.names]
        names = [name if name in known else base for name in names]
    targets = []
    for name in names:
        if name.split(".")[0] not in PACKAGES:
            targets.append(name.split(".")[0])
            continue
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            targets.append(name)
    return sorted(set(targets))


def all_imports(root: Path = REPO_ROOT) -> list[Import]:
    known = project_modules(root)
    found = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, where, run_start in _import_nodes(tree):
            for target in _targets(node, module, path.name == "__init__.py", known):
                found.append(Import(module, target, node.lineno, where, run_start))
    return found


def layer_violations(imports: list[Import]) -> list[str]:
    return [
        f"{i.module}:{i.line} imports {i.target} ({i.where} level)"
        for i in imports
        if i.internal
        and i.target.split(".")[0] in FORBIDDEN.get(i.module.split(".")[0], ())
        and i.target.split(".")[0] != i.module.split(".")[0]
    ]


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-imports."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        if i.internal and i.where != "function":
            graph.setdefault(i.module, set()).add(i.target)
            graph.setdefault(i.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def function_level_violations(imports: list[Import], root: Path = REPO_ROOT) -> list[str]:
    modules = project_modules(root)
    problems = []
    for i in imports:
        if i.where != "function":
            continue
        lines = modules[i.module].read_text(encoding="utf-8").splitlines()
        if i.module in CLI_MODULES:
            # The run of imports sits under a comment that says why.
            if not lines[i.run_start - 2].strip().startswith("#"):
                problems.append(f"{i.module}:{i.line} lazy import of {i.target} without a comment")
        elif i.internal or (i.module, i.target) not in LAZY_THIRD_PARTY:
            problems.append(f"{i.module}:{i.line} imports {i.target} inside a function")
        elif "#" not in lines[i.line - 1]:
            problems.append(f"{i.module}:{i.line} lazy import of {i.target} does not say why")
    return problems


# ---- the checks ------------------------------------------------------------------------------


def test_the_walk_sees_the_whole_project() -> None:
    imports = all_imports()
    modules = {i.module for i in imports}
    assert len(project_modules()) > 100 and len(modules) > 90
    edges = {(i.module, i.target, i.where) for i in imports}
    assert ("models.repository", "models.trajectory", "module") in edges
    assert ("hardware_backends.base", "models.base", "typing") in edges
    assert ("service.cli.main", "uvicorn", "function") in edges


def test_layers_point_one_way() -> None:
    problems = layer_violations(all_imports())
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_there_is_no_import_cycle() -> None:
    cycles = import_cycles(all_imports())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_import_inside_a_function_outside_the_commands() -> None:
    problems = function_level_violations(all_imports())
    assert not problems, "function-level imports:\n" + "\n".join(problems)
