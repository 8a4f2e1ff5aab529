"""docs/architecture.md stays true: the modules it names exist, every module of cxr/ is named there, and the
imports follow its layers (no cycle; the engine's stack imports only downwards)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
STACK = [{"cli"}, {"cluster", "jobs", "compare"}, {"sweep", "relay"}, {"unit"}, {"engine"},  # top to bottom
         {"kernels", "graphs"}]


def _modules() -> dict[str, Path]:
    """cxr's modules by short name: "engine", "report.model", ..."""
    out = {}
    for p in (ROOT / "cxr").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT / "cxr").with_suffix("").parts).removesuffix("__init__").rstrip(".")
        out[name or "cxr"] = p
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The cxr modules a file imports anywhere in it (inside functions too; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
            for b in n.body for x in ast.walk(b)}
    found = set()
    for n in ast.walk(tree):
        if id(n) in skip:
            continue
        names = []
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            names = [f"{n.module}.{a.name}" for a in n.names] + [n.module]
        for name in names:
            if name.startswith("cxr."):
                short = name[4:]
                while short and short not in modules:
                    short = short.rpartition(".")[0]
                if short:
                    found.add(short)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    for m in graph:  # a package's __init__ is its own node; report.x importing report is fine
        graph[m] = {d for d in graph[m] if not (d == "report" and m.startswith("report."))}
    return graph


def test_the_engine_stack_imports_only_downwards():
    graph = _graph()
    rank = {m: i for i, layer in enumerate(STACK) for m in layer}
    for m, deps in graph.items():
        for d in deps:
            if d in rank:
                assert m in rank and rank[m] < rank[d], f"cxr.{m} imports cxr.{d}, which is not below it"


def test_robustness_is_a_foundation():
    """cxr.robustness scores stored runs from below the engine's stack (cxr-bench's commands and the report both
    import it, so it is not in STACK), and cxr.corruptions needs nothing of cxr but its errors (the reference
    script imports it beside medmnistc, without torch)."""
    graph = _graph()
    assert not graph["robustness"] & set().union(*STACK)
    assert graph["corruptions"] <= {"errors"}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join([*path, m, d])
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_map_names_every_module_and_only_modules_that_exist():
    named = set(re.findall(r"`cxr/([a-z_/]+)\.py`", DOC.read_text()))
    assert {m for m in named if not (ROOT / "cxr" / f"{m}.py").exists()} == set(), "named, but not there"
    top = {p.stem for p in (ROOT / "cxr").glob("*.py")} - {"__init__"}
    assert top - named == set(), "modules of cxr/ missing from docs/architecture.md"


def test_the_names_the_map_gives_exist():
    """Every `module.name` the map mentions (sweep.run_group, kernels.choose, ...) is in that module."""
    import importlib

    modules = {str(p.relative_to(ROOT / "cxr").with_suffix("")) for p in (ROOT / "cxr").glob("*.py")}
    pairs = set(re.findall(r"`([a-z_]+)\.([A-Za-z_]+)`", DOC.read_text()))
    checked = [(m, name) for m, name in pairs if m in modules]
    assert len(checked) >= 10
    for m, name in sorted(checked):
        assert hasattr(importlib.import_module(f"cxr.{m}"), name), f"docs/architecture.md: {m}.{name} is gone"
