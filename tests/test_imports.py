"""No import cycle inside alps_ds: a static walk of every ``import`` / ``from`` (top level and inside
functions, so a lazy import that closes a circle counts too) between alps_ds modules."""

from __future__ import annotations

import ast
from pathlib import Path

import alps_ds

ROOT = Path(alps_ds.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("alps_ds", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """alps_ds modules ``name`` (file ``path``) imports anywhere in its body, except under TYPE_CHECKING
    (never executed: annotations only)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    guarded = [node for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)]
    skip = {id(n) for node in guarded for stmt in node.body for n in ast.walk(stmt)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base not in modules:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else base)  # `from pkg import submodule` imports the submodule
    out |= _lazy_table(tree, modules) if path.name == "__init__.py" and name != "alps_ds" else set()
    out.discard(name)
    return out


def _lazy_table(tree: ast.Module, modules: dict[str, Path]) -> set[str]:
    """Modules a package loads on attribute access (a ``_LAZY = {name: module}`` table): imports too.

    Only alps_ds/__init__.py's own table is exempt: it is the public API, loaded by users, never by alps_ds.
    """
    out = set()
    for node in tree.body:
        named = isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
        if named and isinstance(node.value, ast.Dict):
            out |= {v.value for v in node.value.values if isinstance(v, ast.Constant) and v.value in modules}
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walk_sees_lazy_and_relative_imports():
    """The detector itself: a function-level import closing a circle is found (so the next test can fail)."""
    graph = import_graph()
    assert "alps_ds.selection" in graph["alps_ds.selection_ops"]  # a top-level import
    assert "alps_ds.localize" in graph["alps_ds.commands.localize"]  # imported inside run()
    assert "alps_ds.localize.make" in graph["alps_ds.localize"]  # the package's lazy attribute table
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_alps_ds():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle inside alps_ds: " + " -> ".join(cycle)
