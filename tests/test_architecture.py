"""The library's import graph, as docs/ARCHITECTURE.md draws it: no cycles (lazy imports included), no
module importing another's _private name, and no more layers than the page shows."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "scorelab"
MODULES = {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
LAYERS = 7  # docs/ARCHITECTURE.md


def _imports(module: str) -> tuple[set[str], list[str]]:
    """(scorelab modules imported anywhere in `module`, the _private names it imports from them)."""
    found, private = set(), []
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("scorelab")):
            base = (node.module or "").removeprefix("scorelab").lstrip(".")
            if base:
                found.add(base.split(".")[0])
                private += [f"{base}.{a.name}" for a in node.names if a.name.startswith("_")]
            else:
                found.update(a.name for a in node.names)
    return {m for m in found if m in MODULES and m != module}, private


GRAPH = {m: _imports(m)[0] for m in MODULES}


def _layer(module: str, path: tuple[str, ...] = ()) -> int:
    assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
    return 1 + max((_layer(m, (*path, module)) for m in GRAPH[module]), default=0)


def test_no_module_imports_another_modules_private_name():
    private = {m: _imports(m)[1] for m in MODULES}
    assert not {m: p for m, p in private.items() if p}


def test_no_cycles_and_at_most_the_documented_layers():
    layers = {m: _layer(m) for m in MODULES}
    assert max(layers.values()) <= LAYERS, sorted(layers.items(), key=lambda kv: -kv[1])[:5]
    # the foundations import nothing of scorelab: every decision they own has one home
    assert all(layers[m] == 1 for m in ("modality", "layout", "storage", "sde", "schema"))


def test_the_graph_reader_sees_lazy_imports():
    assert "sampling" in GRAPH["visual"] and "checkpoint" in GRAPH["generate"]
