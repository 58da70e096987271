"""The package's shape: short functions, and no import cycle between its modules."""

from __future__ import annotations

import ast
from pathlib import Path

import chunkkv_cli

PACKAGE = Path(chunkkv_cli.__file__).parent
MAX_LINES = 50


def modules() -> dict[str, ast.Module]:
    """Every module of chunkkv_cli by dotted name, parsed."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return found


def test_no_function_is_longer_than_fifty_lines():
    long = [
        f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long, f"functions over {MAX_LINES} lines: {', '.join(long)}"


def module_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules `name` imports at module level (imports inside functions are lazy and do not count)."""
    package = name if tree_is_package(name, known) else name.rpartition(".")[0]
    targets = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets.add(base)
            targets |= {f"{base}.{alias.name}" for alias in node.names}
    return {t for t in targets if t in known and t != name}


def tree_is_package(name: str, known: set[str]) -> bool:
    return any(other.startswith(name + ".") for other in known)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names (first and last the same), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    trees = modules()
    graph = {name: module_imports(name, tree, set(trees)) for name, tree in trees.items()}
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports_first_in_a_fresh_package():
    """Import order hides cycles through a package's __init__: each module is imported first, on its own."""
    code = """
import importlib, sys
names = sys.argv[1:]
for name in names:
    for loaded in [m for m in sys.modules if m.startswith("chunkkv_cli")]:
        del sys.modules[loaded]
    importlib.import_module(name)
"""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code, *sorted(modules())], check=True, cwd=PACKAGE.parent)
