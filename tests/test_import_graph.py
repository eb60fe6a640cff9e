"""The package's import graph, read from the source with ``ast`` (nothing is imported):

1. no import of a project module inside a function or method (optional extras aside);
2. no cycle between the project's modules (top-level imports, plus the lazy tables' edges);
3. the layering: ``fqexport.quant`` is pure math, only the CLI imports the CLI, only the CLI prints.

The one exception to 1, the lazy boundary: ``fqexport/__init__.py`` resolves its public names
from one module-level table (``_PUBLIC``: name -> "module:attr") in ``_resolve``, and the CLI
runs each subcommand from one table (``fqexport.cli.main.COMMANDS``) in ``command`` — both
through ``importlib.import_module``, so that ``import fqexport``, ``--help`` and every flag error
load no stage. The tests below check that these are the only lazy imports of the project, that
every entry names a real module and attribute, and that the CLI's parsers import no stage.
(``fqexport.graph.loading._import_object`` imports the *user's* ``--model pkg:factory`` (and ``--decode``) module:
user code, not a project module; see docs/safety.md.)

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
# The lazy boundary: module -> (its table of "module:attr" targets, the function that imports them).
LAZY_TABLES = {"fqexport": ("_PUBLIC", "_resolve"), "fqexport.cli.main": ("COMMANDS", "command")}
# Where a module is imported by a name known only at run time: the lazy tables, and the user's model factory.
DYNAMIC_IMPORTS = {("fqexport", "_resolve"), ("fqexport.cli.main", "command"),
                   ("fqexport.graph.loading", "_import_object")}
_IMPORT_CALLS = ("import_module", "__import__", "spec_from_file_location", "module_from_spec", "exec_module",
                 "load_module", "run_module", "run_path")
# What a stage imports and the CLI's parsers must not (each costs seconds at start-up).
HEAVY = ("torch", "onnx", "onnxruntime", "onnxscript", "ml_dtypes", "onnx_ir", "tqdm")


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


def _lazy_table(module: str) -> dict[str, str]:
    """The lazy table of ``module`` (``LAZY_TABLES``) as written: a module-level dict literal of strings."""
    table_name, _ = LAZY_TABLES[module]
    for node in TREES[module].body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == table_name for t in targets):
            assert isinstance(node.value, ast.Dict), f"{module}.{table_name} must be a dict literal"
            return {ast.literal_eval(k): ast.literal_eval(v) for k, v in zip(node.value.keys, node.value.values)}
    raise AssertionError(f"{module} has no module-level table {table_name}")


def _lazy_edges() -> list[Import]:
    """The lazy tables' entries as import edges (not top level: they run on first use)."""
    edges = []
    for module, (table_name, _) in LAZY_TABLES.items():
        where = f"{FILES[module].relative_to(ROOT)}:{table_name}"
        edges.extend(Import(module, target.partition(":")[0], where, True, True)
                     for target in _lazy_table(module).values())
    return edges


def _graph(lazy: bool = False) -> dict[str, dict[str, str]]:
    """module → {imported project module: file:line}, from top-level imports only (and, with
    ``lazy``, the lazy tables' edges)."""
    graph: dict[str, dict[str, str]] = {m: {} for m in MODULES}
    for imp in ALL_IMPORTS + (_lazy_edges() if lazy else []):
        if imp.top_level and imp.runtime and _is_project(imp.target):
            target = _module_of(imp.target)
            if target is not None and target != imp.importer:
                graph[imp.importer].setdefault(target, imp.where)
    return graph


def _loaded_with(module: str, graph: dict[str, dict[str, str]]) -> set[str]:
    """Every project module importing ``module`` loads: its top-level imports and their packages, transitively."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES)
        todo.extend(graph[m])
    return seen


def _dynamic_imports() -> set[tuple[str, str]]:
    """(module, enclosing function) of every call that imports a module by a name held in a variable."""
    found = set()

    def visit(module: str, node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Call):
                name = getattr(child.func, "attr", getattr(child.func, "id", None))
                if name in _IMPORT_CALLS:
                    found.add((module, function))
            is_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(module, child, child.name if is_function else function)

    for module in MODULES:
        visit(module, TREES[module], "<module>")
    return found


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
    graph = _graph(lazy=True)
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
    bad = [f"{imp.where}: {imp.target}" for imp in ALL_IMPORTS + _lazy_edges()
           if (imp.target == "fqexport.cli" or imp.target.startswith("fqexport.cli."))
           and not imp.importer.startswith("fqexport.cli")]
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


# ------------------------------------------------------------------ the lazy boundary


def test_the_lazy_tables_are_the_only_imports_by_name():
    assert _dynamic_imports() == DYNAMIC_IMPORTS


def test_each_lazy_resolver_imports_only_from_its_table():
    for module, (table_name, function) in LAZY_TABLES.items():
        (fn,) = [n for n in TREES[module].body if isinstance(n, ast.FunctionDef) and n.name == function]
        names = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        assert table_name in names, f"{module}.{function} must look its target up in {table_name}"
        assert not [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _top_level_names(module: str) -> set[str]:
    names = set()
    for node in TREES[module].body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def test_every_lazy_entry_names_a_module_and_an_attribute_defined_there():
    for module in LAZY_TABLES:
        for name, target in _lazy_table(module).items():
            target_module, sep, attr = target.partition(":")
            assert sep and target_module in MODULES, f"{module}: {name} -> {target}: no such module"
            assert attr in _top_level_names(target_module), f"{module}: {name} -> {target}: no such attribute"
    assert set(_lazy_table("fqexport.cli.main")) == {"compress", "validate", "analyze", "sweep", "demo"}
    assert all(t.startswith("fqexport.cli.") for t in _lazy_table("fqexport.cli.main").values())
    assert not [t for t in _lazy_table("fqexport").values() if t.startswith("fqexport.cli")]


def test_the_cli_parsers_and_the_package_root_import_no_stage():
    """What ``fqexport --help`` and a flag error load: no torch, onnx or onnxruntime (statically)."""
    graph = _graph()
    for start in ("fqexport", "fqexport.cli.main"):
        loaded = _loaded_with(start, graph)
        assert not [m for m in loaded if m.startswith(("fqexport.cli.compress", "fqexport.pipeline"))]
        bad = [f"{imp.where}: {imp.target}" for imp in ALL_IMPORTS
               if imp.importer in loaded and imp.top_level and imp.runtime
               and imp.target.split(".")[0] in HEAVY]
        assert not bad, f"importing {start} loads a stage:\n" + "\n".join(bad)


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
