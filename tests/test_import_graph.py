"""The package's import graph, read from the source with ``ast`` (nothing is imported):

1. no import of a project module inside a function or method (optional extras aside);
2. no cycle between the project's modules (top-level imports);
3. the layering: ``fqexport.quant`` is pure math, only the CLI imports the CLI, only the CLI prints.

And the public API: ``import fqexport`` exposes the names the README uses.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import fqexport

ROOT = Path(__file__).resolve().parents[1]
# source folder → the module prefix it is installed as (pyproject [tool.setuptools.package-dir])
PACKAGES = {"fqexport": "fqexport", "calibration": "fqexport.calibration", "exporters": "fqexport.exporters"}
# fqexport.quant is pure tensor math: none of these above it.
QUANT_MUST_NOT_IMPORT = ("graph", "pipeline", "search", "cli", "demo", "validation", "exporters")
# The names README.md and examples/api_example.py use as ``fqexport.<name>``.
README_API = ("compress", "QuantConfig", "MixedPrecisionConfig", "search_mixed_precision", "export_float",
              "validate", "Thresholds", "ValidationReport", "GroupMetrics", "load_model", "export", "load_data",
              "save_npz", "GroupsFromCSV")


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    target: str  # imported module (or module.name for ``from m import name``; resolved later)
    where: str  # file:line
    top_level: bool
    runtime: bool  # False inside ``if TYPE_CHECKING:`` (never executed, so no edge of the graph)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _source_files() -> dict[str, Path]:
    files = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            files[_module_name(path)] = path
    return files


FILES = _source_files()
MODULES = set(FILES)
TREES = {module: ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for module, path in FILES.items()}


def _is_package(module: str) -> bool:
    return FILES[module].name == "__init__.py"


def _resolve_relative(module: str, level: int, name: str | None) -> str:
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports_of(module: str, tree: ast.AST | None = None, path: Path | None = None) -> list[Import]:
    path = path or FILES[module]
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool, runtime: bool) -> None:
        for child in ast.iter_child_nodes(node):
            where = f"{path.relative_to(ROOT)}:{getattr(child, 'lineno', '?')}"
            if isinstance(child, ast.Import):
                found.extend(Import(module, a.name, where, top_level, runtime) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve_relative(module, child.level, child.module) if child.level else child.module or ""
                found.append(Import(module, base, where, top_level, runtime))
                # ``from fqexport.quant import grid`` imports the submodule fqexport.quant.grid
                found.extend(Import(module, f"{base}.{a.name}", where, top_level, runtime)
                             for a in child.names if f"{base}.{a.name}" in MODULES)
            # class bodies and ``if TYPE_CHECKING:`` blocks count as top level; function bodies do not
            visit(child, top_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
                  runtime and not _type_checking_block(child))

    visit(tree or TREES[module], True, True)
    return found


ALL_IMPORTS = [imp for module in sorted(MODULES) for imp in _imports_of(module)]


def _is_project(target: str) -> bool:
    return target == "fqexport" or target.startswith("fqexport.")


def _module_of(target: str) -> str | None:
    """The project module an import target names (``fqexport.x.y`` may be the module or a name in it)."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


def _graph() -> dict[str, dict[str, str]]:
    """module → {imported project module: file:line}, from top-level imports only."""
    graph: dict[str, dict[str, str]] = {m: {} for m in MODULES}
    for imp in ALL_IMPORTS:
        if imp.top_level and imp.runtime and _is_project(imp.target):
            target = _module_of(imp.target)
            if target is not None and target != imp.importer:
                graph[imp.importer].setdefault(target, imp.where)
    return graph


def _cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module, as one cycle through it (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in components:  # a concrete path start → … → start inside the component
        members, start = set(comp), comp[0]
        path, seen, node = [start], {start}, start
        while True:
            nxt = next((w for w in sorted(graph[node]) if w in members and (w == start or w not in seen)), None)
            if nxt is None or nxt == start:
                break
            path.append(nxt)
            seen.add(nxt)
            node = nxt
        cycles.append(path + [start])
    return cycles


def _describe_cycle(cycle: list[str], graph: dict[str, dict[str, str]]) -> str:
    return " -> ".join(cycle) + "\n    " + "\n    ".join(
        f"{a} imports {b} at {graph[a].get(b, '?')}" for a, b in zip(cycle, cycle[1:]))


# ------------------------------------------------------------------ the walker itself


def test_walker_sees_every_installed_package_and_maps_names():
    assert {"fqexport", "fqexport.quant.grid", "fqexport.cli.main", "fqexport.calibration.readers",
            "fqexport.exporters.qdq_onnx"} <= MODULES
    assert _module_name(ROOT / "calibration" / "__init__.py") == "fqexport.calibration"
    assert _resolve_relative("fqexport.quant.grid", 1, "hessian") == "fqexport.quant.hessian"
    assert _resolve_relative("fqexport.quant", 2, "errors") == "fqexport.errors"
    assert len(MODULES) >= 40


def test_walker_tells_top_level_function_and_type_checking_imports_apart():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from fqexport.quant import grid\n"
        "from . import hessian\n"
        "if TYPE_CHECKING:\n"
        "    from fqexport.model import CompressedModel\n"
        "class A:\n"
        "    from fqexport.errors import ConfigError\n"
        "    def f(self):\n"
        "        from fqexport.config import QuantConfig\n"
        "def g():\n"
        "    import matplotlib\n"
        "    return lambda: __import__('x')\n"
    )
    found = _imports_of("fqexport.quant.solver", ast.parse(source), ROOT / "fqexport" / "quant" / "solver.py")
    got = {(i.target, i.top_level, i.runtime, i.where.rsplit(":", 1)[1]) for i in found}
    assert ("fqexport.quant.grid", True, True, "2") in got  # the submodule named in ``from pkg import mod``
    assert ("fqexport.quant.hessian", True, True, "3") in got  # relative, resolved
    assert ("fqexport.model", True, False, "5") in got  # TYPE_CHECKING: top level, not run
    assert ("fqexport.errors", True, True, "7") in got  # class body runs at import time
    assert ("fqexport.config", False, True, "9") in got  # in a method: flagged by the rule below
    assert ("matplotlib", False, True, "11") in got


def test_cycle_finder_reports_a_cycle_with_its_lines():
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3"}, "d": {"a": "d.py:4"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert "c imports a at c.py:3" in _describe_cycle(["a", "b", "c", "a"], graph)
    assert _cycles({"a": {"b": "x"}, "b": {}}) == []


# ------------------------------------------------------------------ the rules


def test_no_project_import_inside_a_function():
    bad = [f"{imp.where}: {imp.target}" for imp in ALL_IMPORTS
           if not imp.top_level and _is_project(imp.target)]
    assert not bad, "project imports inside a function (move them to the module top):\n" + "\n".join(bad)


def test_no_module_imports_the_package_root():
    """``fqexport/__init__.py`` re-exports the API; a module that imports it depends on everything."""
    bad = [f"{imp.where}: {imp.target}" for imp in ALL_IMPORTS
           if imp.target == "fqexport" and imp.importer != "fqexport"]
    assert not bad, "import the defining module, not the package root:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = _graph()
    graph["fqexport"] = {}  # the root's re-exports are no node others may depend on (checked above)
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe_cycle(c, graph) for c in cycles)


def test_quant_is_pure_math():
    bad = [f"{imp.where}: {imp.target}" for imp in ALL_IMPORTS
           if imp.importer.startswith("fqexport.quant")
           and any(imp.target == f"fqexport.{p}" or imp.target.startswith(f"fqexport.{p}.")
                   for p in QUANT_MUST_NOT_IMPORT)]
    assert not bad, "fqexport.quant imports a higher layer:\n" + "\n".join(bad)


def test_only_the_cli_imports_the_cli():
    bad = [f"{imp.where}: {imp.target}" for imp in ALL_IMPORTS
           if (imp.target == "fqexport.cli" or imp.target.startswith("fqexport.cli."))
           and not imp.importer.startswith("fqexport.cli") and imp.importer != "fqexport"]
    assert not bad, "only fqexport.cli may import fqexport.cli:\n" + "\n".join(bad)


def test_library_code_never_prints():
    bad = []
    for module, path in sorted(FILES.items()):
        if module == "fqexport.cli" or module.startswith("fqexport.cli."):
            continue
        for node in ast.walk(TREES[module]):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, "print() outside fqexport/cli/ (log with logging.getLogger(__name__)):\n" + "\n".join(bad)


# ------------------------------------------------------------------ the public API


def test_package_exposes_the_readme_api():
    missing = [name for name in README_API if name not in fqexport.__all__ or not hasattr(fqexport, name)]
    assert not missing, f"fqexport lacks {missing}"
    assert all(callable(getattr(fqexport, name)) for name in README_API)
    unresolved = [name for name in fqexport.__all__ if not hasattr(fqexport, name)]
    assert not unresolved, f"fqexport.__all__ names {unresolved} that do not exist"
    # every ``fqexport.<name>`` the README calls (other than a subpackage path) is top-level API
    readme = (ROOT / "README.md").read_text()
    called = set(re.findall(r"\bfqexport\.([A-Za-z_]\w*)\(", readme))
    assert {"compress", "validate", "load_model"} <= called
    assert called <= set(fqexport.__all__), f"README calls fqexport.{sorted(called - set(fqexport.__all__))}"


def test_api_example_imports_the_pipeline_from_the_package_root():
    """examples/api_example.py uses ``fqexport.<name>`` only; demo data helpers may come from fqexport.demo."""
    path = ROOT / "examples" / "api_example.py"
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and _is_project(node.module or ""):
            if node.module != "fqexport" and not node.module.startswith("fqexport.demo"):
                bad.append(f"examples/api_example.py:{node.lineno}: from {node.module} import ...")
            elif node.module == "fqexport":
                bad.extend(f"examples/api_example.py:{node.lineno}: {a.name} is not in fqexport.__all__"
                           for a in node.names if a.name not in fqexport.__all__)
        elif isinstance(node, ast.Import):
            bad.extend(f"examples/api_example.py:{node.lineno}: import {a.name}" for a in node.names
                       if _is_project(a.name) and a.name != "fqexport" and not a.name.startswith("fqexport.demo"))
    assert not bad, "the example must use the public API:\n" + "\n".join(bad)
