"""The house's structure: the library never imports the benchmark harness, and its modules
import each other without a cycle (read from the source, so a lazy import inside a function
counts too)."""

from __future__ import annotations

import ast
import itertools
import pathlib

import riemannlora

ROOT = pathlib.Path(riemannlora.__file__).resolve().parent


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("riemannlora", *path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [n for n in subs if n in modules] or [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def _library(name: str) -> bool:
    return not (name.startswith("riemannlora.bench") or name == "riemannlora.cli")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, set(modules)) - {m} for m, p in modules.items()}


def test_library_never_imports_the_harness():
    graph = _graph()
    bad = {m: sorted(t for t in ts if not _library(t)) for m, ts in graph.items() if _library(m)}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_no_import_cycle_in_the_library():
    """A cycle through a package's own ``__init__`` re-exporting its children is allowed
    (``riemannlora.optim`` -> ``riemannlora.optim.scaled``); any other is not."""
    graph = {m: {t for t in ts if _library(t)} for m, ts in _graph().items() if _library(m)}

    def parent_child(a: str, b: str) -> bool:
        return a.startswith(b + ".") or b.startswith(a + ".")

    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                if not all(parent_child(a, b) for a, b in itertools.pairwise(cycle)):
                    cycles.append(cycle)
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_check_sees_lazy_imports(tmp_path):
    """The reader counts an import inside a function (the kind that hid the old loops)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from riemannlora.bench import tasks\n    return tasks\n")
    assert _imports(source, {"riemannlora.bench", "riemannlora.bench.tasks"}) == {
        "riemannlora.bench.tasks"
    }
    source.write_text("def f():\n    from riemannlora.bench.tasks import TASKS\n")
    assert _imports(source, {"riemannlora.bench", "riemannlora.bench.tasks"}) == {
        "riemannlora.bench.tasks"
    }
