"""No import circle anywhere in the package: a module graph built from every import statement, those inside
functions included (a lazy import only hides a circle until the function runs), must be acyclic.

An edge a -> b is written for `import b` and `from b import x`; when b.x is itself a module, `from b import x`
writes a -> b.x instead.
Imports under `if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "preftune"


def module_names(root: Path = SRC) -> dict[str, Path]:
    names = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of import nodes inside `if TYPE_CHECKING:` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                for inner in ast.walk(child):
                    skipped.add(id(inner))
    return skipped


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    names = module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in names}
    for name, path in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skipped = _type_checking_nodes(tree)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[:len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                # `from pkg import sub` loads the submodule (the parent package is loaded first for any
                # submodule, so that implicit step is no edge); `from mod import name` loads mod
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base
                           for alias in node.names]
            for target in targets:
                if target in names and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search with colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
    for start in sorted(graph):
        if colour[start]:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        colour[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = 2
                stack.pop()
            elif colour[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour[nxt] == 0:
                colour[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_lazy_import_cycle(tmp_path):
    # the check itself can fail: a circle closed only by an import inside a function is found
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from preftune.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from preftune import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from preftune import d\n")
    (pkg / "d.py").write_text("from preftune import c\n")
    graph = import_graph(tmp_path)
    assert graph["preftune.a"] == {"preftune.sub.b"}
    assert graph["preftune.c"] == set()  # TYPE_CHECKING imports never run
    assert find_cycle(graph) == ["preftune.a", "preftune.sub.b", "preftune.a"]


def test_no_module_outside_the_demo_imports_it():
    """The demo sits on top of the library; only the CLI command that starts it may reach into it."""
    graph = import_graph()
    offenders = {name: sorted(t for t in targets if t.startswith(f"{PACKAGE}.demo"))
                 for name, targets in graph.items()
                 if not name.startswith(f"{PACKAGE}.demo") and name != f"{PACKAGE}.cli"}
    assert {k: v for k, v in offenders.items() if v} == {}
