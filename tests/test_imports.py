"""The import graph of ``flexsp/`` and ``solver/``: no cycles, and ``solver/`` stays pure.

Every ``import`` / ``from ... import`` statement of every module is read with :mod:`ast`, at module
level AND inside functions (a function-local import hides a cycle from Python's import machinery
until that function runs, but it is a dependency all the same). An edge goes from a module to the
module it names: ``from a.b import c`` names ``a.b.c`` when that is a module, else ``a.b``; relative
imports are resolved against the importing module's package. A package's ``__init__`` running
first when one of its submodules is imported is not an edge (Python's machinery, not a dependency
of the importing code).

- no cycle among the modules (a strongly connected component of more than one module fails, listing
  its modules);
- ``solver/`` imports neither ``torch`` nor ``flexsp`` (it runs on a machine without them:
  ``flexsp-plan``, ``flexsp-simulate``), anywhere, not even inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("flexsp", "solver")


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every module of the packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module ``name`` imports (anywhere in the file), as dotted names (external ones too)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in modules else target)
    return found


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {
        name: {m for m in imports_of(name, path, modules) if m in modules and m != name}
        for name, path in modules.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    """The checker itself: a planted cycle a -> b -> c -> a is found, a DAG is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles (module-level and function-level imports):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_solver_imports_neither_torch_nor_flexsp():
    modules = module_files()
    bad = {}
    for name, path in modules.items():
        if name.split(".")[0] != "solver":
            continue
        hits = sorted(m for m in imports_of(name, path, modules) if m.split(".")[0] in ("torch", "flexsp"))
        if hits:
            bad[name] = hits
    assert not bad, f"solver/ must not import torch or flexsp: {bad}"


def test_no_cycles_between_packages():
    """Each package imports only from below it: the graph collapsed to ``flexsp.<package or module>``
    (flexsp.model, flexsp.data, flexsp.engines, ... and each top-level module) and ``solver`` has no
    cycle either (a submodule importing a sibling package that imports it back is an upward import)."""

    def unit(m: str) -> str:
        return ".".join(m.split(".")[:2]) if m.startswith("flexsp.") else m.split(".")[0]

    packed: dict[str, set[str]] = {}
    for a, bs in graph().items():
        packed.setdefault(unit(a), set()).update(unit(b) for b in bs if unit(b) != unit(a))
    for bs in list(packed.values()):
        for b in bs:
            packed.setdefault(b, set())
    found = cycles(packed)
    assert not found, "cycles between packages:\n" + "\n".join(" <-> ".join(c) for c in found)
