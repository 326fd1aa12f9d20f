"""Who may import whom (CONTRIBUTING.md): no cycles, and each layer imports only what it may.

Every module of protocols/, codream_secure/ and benchmarks/ is parsed with ast; module-level and
function-local imports both count, since a function-local import is a dependency all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocols", "codream_secure", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str, modules: set[str] | None = None) -> set[str]:
    """Every module `path` imports, as absolute dotted names (relative imports resolved).

    `from pkg import a, b` counts as importing pkg itself only when a name is not one of
    `modules` (a package's submodules import it while it initialises, which is no cycle).
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            names = {f"{target}.{alias.name}" for alias in node.names}
            if modules is None or not names <= modules:
                found.add(target)
            found.update(names)
    return found


def _graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    paths = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        graph[module] = {name for name in _imports(path, module, set(paths)) if name in paths
                         and name != module}
    return graph


def _external(package: str) -> dict[str, set[str]]:
    """module of `package` -> every top-level package it imports."""
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        module = _module_name(path)
        out[module] = {name.split(".")[0] for name in _imports(path, module)}
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child):], child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def _importers(package: str, forbidden: set[str]) -> dict[str, set[str]]:
    return {module: found & forbidden for module, found in _external(package).items()
            if found & forbidden}


def test_the_graph_sees_function_local_and_relative_imports():
    graph = _graph()
    assert "protocols.secagg.session" in graph["protocols.secagg.spec"]  # relative, module level
    assert "protocols.paillier.session" in graph["protocols.paillier.spec"]  # function-local


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    assert _cycle(_graph()) is None


def test_protocols_imports_no_torch_flower_core_or_benchmarks():
    assert _importers("protocols", {"torch", "flwr", "codream_secure", "benchmarks"}) == {}


def test_the_core_imports_no_benchmarks():
    assert _importers("codream_secure", {"benchmarks"}) == {}
