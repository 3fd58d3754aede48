"""llm-atc's own imports: the circles among its modules and the imports that go up a layer.

    .venv/bin/python scripts/imports.py          # a report; exit status 1 when there is a circle or an upward import

Every ``import llm_atc...`` / ``from llm_atc... import`` counts, at the top of a module or inside a function
(an import inside a function still ties the two modules together). A layer may import the layers below it:

    the CLI  >  the Python API  >  app  >  backends  >  the rest (specs, rendering, planning, storage, ...)

and no module may import one that imports it back (directly or through others).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llm_atc"
# The layers, top first; a module belongs to the first layer whose prefix names it.
LAYERS = (
    ("llm_atc", "llm_atc.__main__", "llm_atc.cli", "llm_atc.commands"),  # the CLI, and the package's own names
    ("llm_atc.api", "llm_atc.deployment", "llm_atc.handle"),  # the Python API
    ("llm_atc.app", "llm_atc.status"),  # the one orchestration layer
    ("llm_atc.backends", "llm_atc.tunnel"),  # SkyPilot and this machine
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The llm_atc modules ``path`` imports (``from llm_atc.x import y`` is ``llm_atc.x.y`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name in modules:
                found.add(name)
            elif name.startswith("llm_atc") and name.rsplit(".", 1)[0] in modules:
                found.add(name.rsplit(".", 1)[0])
    found.discard(module_name(path))
    return {m for m in found if not (m == "llm_atc" or module_name(path).startswith(m + "."))}


def graph() -> dict[str, set[str]]:
    paths = [p for p in PACKAGE.rglob("*.py") if "recipes" not in p.relative_to(PACKAGE).parts]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in edges.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def layer(module: str) -> int:
    for depth, prefixes in enumerate(LAYERS):
        if any(module == p or (p != "llm_atc" and module.startswith(p + ".")) for p in prefixes):
            return depth
    return len(LAYERS)


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in edges.items() for b in targets if layer(b) < layer(a))


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    edges = graph()
    found, up = circles(edges), upward(edges)
    print(f"{len(edges)} modules, {sum(len(t) for t in edges.values())} imports among them")
    print(f"{len(found)} circle(s)" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    print(f"{len(up)} upward import(s)" + "".join(f"\n  {a} -> {b}" for a, b in up))
    sys.exit(1 if found or up else 0)


if __name__ == "__main__":
    main()
