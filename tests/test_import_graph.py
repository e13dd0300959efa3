"""No module of the package imports another that imports it back, directly or around a longer loop.

The graph is read from the sources with ast (nothing is imported): one node per module of the installed package
`moelite` (src/moelite, runtime/, apps/, converters/, cache_policies/, as pyproject.toml maps them), one edge per
import statement, at module level or inside a function (a lazy import closes a loop too: it only moves the failure
to the first call). Imports under `if TYPE_CHECKING:` never run and are left out; `moelite._core` is the C++
extension, a leaf."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package it is installed as ([tool.scikit-build.wheel.packages] in pyproject.toml)
PACKAGES = {
    "src/moelite": "moelite",
    "runtime": "moelite.runtime",
    "apps": "moelite.apps",
    "converters": "moelite.converters",
    "cache_policies": "moelite.cache_policies",
}
EXTENSIONS = {"moelite._core"}


def modules(root: Path, packages: dict[str, str]) -> dict[str, Path]:
    """Dotted module name -> source file (a package is its __init__.py)."""
    out = {}
    for folder, package in packages.items():
        for f in sorted((root / folder).rglob("*.py")):
            parts = [p for p in f.relative_to(root / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = f
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    return skip


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module `name` (file `path`) imports anywhere in its code."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from ..runtime.planner import x: relative to this module's package
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # from pkg import submodule: an edge to the submodule, not to pkg's __init__
                sub = f"{target}.{a.name}"
                out.add(sub if sub in known or sub in EXTENSIONS else target)
    return {m for m in out if m in known and m != name}


def import_graph(root: Path = ROOT, packages: dict[str, str] = PACKAGES) -> dict[str, set[str]]:
    mods = modules(root, packages)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative), each as one loop through them."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(_loop(graph, set(comp)))
    return comps


def _loop(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One loop a -> ... -> a inside a strongly connected component (breadth-first from its first module)."""
    a = min(comp)
    prev, frontier = {a: None}, [a]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == a:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [*reversed(path), a]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no loop in {comp}")


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    # the graph is the package's: the edges the CLI and the runtime are built on are in it
    assert "moelite.runtime.speed" in graph["moelite.apps.plan"]
    assert "moelite.runtime.files" in graph["moelite.runtime.model"]
    assert "moelite.runtime.model" in graph["moelite"]  # the lazy moelite.load, inside __getattr__
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_a_cycle_through_a_lazy_import_is_found(tmp_path):
    """The checker on a package written here: a imports b at module level, b imports c inside a function, c
    imports a relatively; d imports b only under TYPE_CHECKING (never run) and a from the package (`from . import a`)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import run\n")
    (pkg / "b.py").write_text("def run():\n    from pkg import c\n    return c\n")
    (pkg / "c.py").write_text("from . import a\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import run\nfrom . import a\n"
    )
    graph = import_graph(tmp_path, {"pkg": "pkg"})
    assert graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    (pkg / "c.py").write_text("import os\n")
    assert cycles(import_graph(tmp_path, {"pkg": "pkg"})) == []
