"""Layers point down: every import in src/milotile obeys the layer table of docs/architecture.md, no cycles."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = SRC / "milotile"


def layer_table() -> dict[str, int]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("<!-- layer table")[1].split("<!-- end layer table -->")[0]
    layers = {}
    for m in re.finditer(r"^\|\s*(\d+)\s*\|([^|]+)\|", block, flags=re.M):
        for name in m.group(2).split(","):
            layers[name.strip()] = int(m.group(1))
    assert layers, "the layer table in docs/architecture.md is empty"
    return layers


def modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(SRC).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = f
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> milotile modules it imports (module- and function-level, relative ones resolved)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        is_init = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = m.split(".") if is_init else m.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if t.split(".")[0] == "milotile" and (t in mods):
                    edges[m].add(t)
    return edges


def layer_of(module: str, table: dict[str, int]) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # milotile/__init__.py: the public face, above everything
        return max(table.values()) + 1
    name = parts[1]
    assert name in table, f"{module}: package/module {name!r} is missing from the layer table in docs/architecture.md"
    return table[name]


def violations(mods: dict[str, Path], table: dict[str, int]) -> list[str]:
    """Upward imports and imports of the top-level package."""
    bad = []
    for m, targets in imports(mods).items():
        for t in targets:
            if t == "milotile" and m != "milotile":
                bad.append(f"{m} imports the top-level package")
            elif t != "milotile" and layer_of(t, table) > layer_of(m, table):
                bad.append(f"{m} (layer {layer_of(m, table)}) imports {t} (layer {layer_of(t, table)})")
    return sorted(bad)


def test_imports_point_down():
    bad = violations(modules(), layer_table())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    mods = modules()
    inits = {m for m, f in mods.items() if f.name == "__init__.py"}
    graph = {m: {t for t in ts if t not in inits} for m, ts in imports(mods).items() if m not in inits}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_layer_check_catches_an_upward_import(tmp_path):
    """The checker itself can fail: a store module importing a stage, or the top-level package."""
    (tmp_path / "a.py").write_text("def f():\n    from milotile.stages.mine import mine\n")
    (tmp_path / "b.py").write_text("import numpy\n")
    (tmp_path / "c.py").write_text("from milotile import open\n")
    mods = {"milotile": tmp_path / "b.py", "milotile.store.x": tmp_path / "a.py",
            "milotile.stages.mine": tmp_path / "b.py", "milotile.formats.y": tmp_path / "c.py"}
    bad = violations(mods, layer_table())
    assert bad == ["milotile.formats.y imports the top-level package",
                   "milotile.store.x (layer 2) imports milotile.stages.mine (layer 3)"]
