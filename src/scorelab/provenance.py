"""What produced an output: a fingerprint of the scorelab code that a computation runs.

Outputs kept across runs for resuming (the sample stage's chunks) carry it, so that a re-run after a code
change redraws them, while a re-run of the same code (an interrupted stage) keeps what is there. DVC
re-runs a stage when its deps change, but a stage that resumes would otherwise keep the old results.

The fingerprint covers a module and every scorelab module it imports, directly or not, lazy imports
included (read from the source, as tests/test_layout.py reads dvc.yaml's deps). It hashes each module's
syntax tree, not its bytes: comments and formatting do not count, any change to code or docstrings does.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _imports(tree: ast.AST, package: Path) -> set[str]:
    """The scorelab modules a syntax tree imports anywhere (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("scorelab")):
            base = (node.module or "").removeprefix("scorelab").lstrip(".")
            found.update([base.split(".")[0]] if base else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("scorelab."))
    return {m for m in found if (package / f"{m}.py").is_file()}


def module_closure(module: str, package: Path = PACKAGE) -> dict[str, ast.AST]:
    """`module` and the scorelab modules it imports, transitively: name -> syntax tree."""
    trees: dict[str, ast.AST] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name not in trees:
            path = package / f"{name}.py"
            if not path.is_file():
                raise ValueError(f"no scorelab module {name!r} in {package}")
            trees[name] = ast.parse(path.read_text(), filename=str(path))
            todo += sorted(_imports(trees[name], package))
    return trees


def code_fingerprint(module: str, package: Path = PACKAGE) -> str:
    """sha256 over the syntax trees of `module` and everything of scorelab it imports (see the module
    docstring). Reads and parses the files each call (tens of milliseconds)."""
    digest = hashlib.sha256()
    for name, tree in sorted(module_closure(module, package).items()):
        digest.update(f"{name}\0{ast.dump(tree, include_attributes=False)}\0".encode())
    return digest.hexdigest()
