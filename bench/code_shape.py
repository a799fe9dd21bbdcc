"""The shape of the package's code: longest functions, largest modules, import cycles and
function-local imports (the before/after figures of a refactoring).

    python bench/code_shape.py [PACKAGE_DIR]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, package_dir: Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package_dir: Path) -> dict[str, Path]:
    return {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class Import(NamedTuple):
    name: str  # "ray.tune", "dala_search.search.tuner.plan_search" (may name an object)
    in_function: bool  # written inside a function (imported when it runs), not at the top
    line: int


def imported_names(path: Path, module: str) -> list[Import]:
    """Every name ``path`` imports, at module level, under ``if TYPE_CHECKING`` or inside a
    function (``from a import b`` gives ``a.b``: b may be a module or an object in a)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found += [Import(n, id(node) in inside, node.lineno) for n in names]
    return found


def package_module(name: str, known: set[str]) -> str | None:
    """The package module ``name`` is or lies in (``a.b.func`` -> ``a.b``), or None."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its source, functions too)."""
    mods = modules(package_dir)
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        targets = {package_module(i.name, known) for i in imported_names(path, mod)}
        graph[mod] = {t for t in targets if t and t != mod}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules caught in import cycles: each strongly connected component of more than
    one module (Tarjan), sorted; ``cycle_path`` shows one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                result.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle inside ``component``: ``[a, b, ..., a]`` (shortest, by breadth first)."""
    start, members = component[0], set(component)
    parent: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise ValueError(f"{component} holds no cycle")


def functions(path: Path, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.end_lineno - node.lineno + 1, f"{module}.{node.name}"))
    return out


def local_imports(path: Path) -> int:
    """Import statements written inside functions."""
    tree = ast.parse(path.read_text())
    seen: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            seen.update(id(n) for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom))
    return len(seen)


def main(package_dir: Path) -> None:
    mods = modules(package_dir)
    funcs = sorted((f for m, p in mods.items() for f in functions(p, m)), reverse=True)
    sizes = sorted(((len(p.read_text().splitlines()), m) for m, p in mods.items()), reverse=True)
    print("10 longest functions (lines):")
    for n, name in funcs[:10]:
        print(f"  {n:4d}  {name}")
    print("10 largest modules (lines):")
    for n, name in sizes[:10]:
        print(f"  {n:4d}  {name}")
    graph = import_graph(package_dir)
    cycles = find_cycles(graph)
    print(f"import cycles: {len(cycles)}")
    for c in cycles:
        print("  " + " -> ".join(cycle_path(graph, c)))
    print(f"function-local imports: {sum(local_imports(p) for p in mods.values())}")
    print(f"modules: {len(mods)}, lines: {sum(n for n, _ in sizes)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "dala_search")
