"""The server's modules import each other in one direction: no import circle, found statically (the module-level
imports of every ``server/`` file) and confirmed by importing the request-layer modules each in a fresh
interpreter (a circle that happens to resolve in one import order breaks in another)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVER = REPO / "server"
# The modules of the circle issue 19 named (deps -> jobs -> routes.common -> deps), and their package
NAMED = ("server.deps", "server.jobs", "server.routes", "server.routes.common")


def module_name(path: Path, base: Path) -> str:
    parts = path.relative_to(base).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The imports that run when the module is imported: module level, including inside ``if`` / ``try``
    blocks, but not under ``if TYPE_CHECKING:`` nor inside functions (run later, when called)."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                todo.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            todo.extend(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])
    return found


def import_graph(root: Path = SERVER) -> dict[str, set[str]]:
    """Module -> the ``server`` modules its import runs. Importing ``a.b.c`` runs ``a/b/__init__.py`` first,
    so a module depends on the packages above what it imports too; ``from pkg import name`` imports the
    submodule ``pkg.name`` when there is one."""
    files = {module_name(p, root.parent): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in _top_level_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
                continue
            if node.level:  # relative: from .x import y
                base = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            targets.add(module)
            targets |= {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in files}
        deps: set[str] = set()
        for t in targets:
            parts = t.split(".")
            deps |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & files.keys()
        deps.discard(name)
        # a package's own __init__ is run by importing any of its modules, and is not a circle with them
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of ``graph`` as the list of its modules (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_cycle_finder_finds_the_circle_issue_19_named(tmp_path: Path) -> None:
    """The check can fail: the old circle, rebuilt in a scratch tree, is found (through the package
    ``__init__`` that importing ``server.routes.common`` runs)."""
    pkg = tmp_path / "server"
    (pkg / "routes").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "deps.py").write_text("from server.state import AppState\n")
    (pkg / "state.py").write_text("")
    (pkg / "jobs.py").write_text("from server.routes.common import fingerprint\n")
    (pkg / "routes" / "__init__.py").write_text("from server.routes import common, jobs\n")
    (pkg / "routes" / "common.py").write_text("from server.deps import RequestOptions\n")
    (pkg / "routes" / "jobs.py").write_text("from server import jobs\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and {"server.jobs", "server.routes"} <= set(cycle), cycle


def test_no_import_circle_in_server() -> None:
    graph = import_graph()
    assert {"server.deps", "server.jobs", "server.routes.common"} <= graph.keys()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", NAMED)
def test_each_named_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
