"""The package's layering: every module imports, and the static import graph of cvae_exp/ (every import
statement, function-level ones included, since a lazy import only hides a circle) has no cycle; no entry
point reaches another; the math (objectives) never reaches up into the models."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cvae_exp"
ENTRY_POINTS = ("cvae_exp.train", "cvae_exp.evaluate", "cvae_exp.sample", "cvae_exp.bench", "cvae_exp.report")


def module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(f): f for f in sorted(PACKAGE.rglob("*.py"))}


def _with_packages(name: str, importer: str) -> list[str]:
    """`name` and the packages above it that importing it from `importer` runs: not the empty top-level
    package, nor a package that `importer` lies in (it is already being imported by then)."""
    parts = name.split(".")
    above = [".".join(parts[:i]) for i in range(2, len(parts))]
    return [name, *(p for p in above if p in MODULES and not importer.startswith(p + "."))]


def imports_of(name: str) -> set[str]:
    """The cvae_exp modules that module `name` imports anywhere in its body."""
    file = MODULES[name]
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `level - 1` steps up
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from package import name` imports the submodule `name` when there is one
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            if target.startswith("cvae_exp.") and target in MODULES:  # the empty top-level package left out
                found.update(_with_packages(target, name))
    found.discard(name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def reachable(start: str) -> set[str]:
    seen, todo = set(), list(GRAPH[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(GRAPH[name])
    return seen


def test_the_graph_sees_the_imports():
    """A check that could pass by finding nothing: known edges must be there."""
    assert "cvae_exp.cli" in GRAPH["cvae_exp.train"]
    assert "cvae_exp.runs.job" in GRAPH["cvae_exp.train"]  # a function-level import
    assert "cvae_exp.models.distributions" in GRAPH["cvae_exp.models.objectives"]
    assert "cvae_exp.data.pipeline" in GRAPH["cvae_exp.training.images"]  # `from cvae_exp.data.pipeline import ...`
    assert "cvae_exp.data" in GRAPH["cvae_exp.training.images"]  # ... which runs cvae_exp/data/__init__.py first


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_import_cycle():
    state: dict[str, str] = {}  # name -> "open" while on the path, "done" after

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_no_entry_point_reaches_another(entry):
    assert not reachable(entry) & (set(ENTRY_POINTS) - {entry})


def test_the_objectives_never_reach_the_models():
    networks = (
        "cvae_exp.models.cvae",
        "cvae_exp.models.mlp",
        "cvae_exp.models.conv",
        "cvae_exp.models.nets",
        "cvae_exp.models.build",
    )
    assert not reachable("cvae_exp.models.objectives") & set(networks)
    assert not reachable("cvae_exp.models.distributions") & set(networks)


def test_the_readmes_code_layout_lists_every_module_above_what_it_imports():
    """README.md's "Code layout" names each module (a package by its folder) from the entry points down: every
    module is there, and each imports only modules listed below it (or inside its own package)."""
    text = (PACKAGE.parent / "README.md").read_text()
    block = text[text.index("## Code layout") :].split("\n## ", 1)[0]
    listed = [
        "cvae_exp." + m.group(1).replace("/", ".")
        for m in (re.match(r"cvae_exp/([\w/]+?)(?:\.py|/)\s", line) for line in block.splitlines())
        if m
    ]
    position = {name: i for i, name in enumerate(listed)}

    def place(module: str) -> int | None:
        owner = next((n for n in listed if module == n or module.startswith(n + ".")), None)
        return position.get(owner)

    modules = [name for name in MODULES if name != "cvae_exp"]
    assert [name for name in modules if place(name) is None] == [], "modules missing from the README's layout"
    upward = [f"{name} -> {target}" for name in modules for target in GRAPH[name] if place(target) < place(name)]
    assert upward == [], "imports of a module listed above the importer"
