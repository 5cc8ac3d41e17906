"""scorelab.provenance: the code fingerprint that the sample chunks carry changes with the code a module
runs, and with nothing else."""

from __future__ import annotations

import shutil

import pytest

from scorelab.provenance import PACKAGE, code_fingerprint, module_closure


@pytest.fixture
def package(tmp_path):
    copy = tmp_path / "scorelab"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_the_closure_is_what_generate_runs_and_follows_lazy_imports():
    closure = set(module_closure("generate"))
    # sampling at the top; checkpoint imports nets inside a function
    assert {"generate", "sampling", "sde", "rng", "checkpoint", "nets", "parameterization"} <= closure
    assert not {"report", "tune", "training", "evaluate"} & closure, "stages downstream or beside it do not count"


def test_a_code_change_anywhere_in_the_closure_changes_the_fingerprint(package):
    base = code_fingerprint("generate", package)
    assert base == code_fingerprint("generate", PACKAGE), "a copy of the same code has the same fingerprint"
    _edit(package / "sde.py", "import math", "import math\nUNUSED = 1")  # two imports away from generate
    assert code_fingerprint("generate", package) != base


def test_comments_formatting_and_modules_outside_the_closure_do_not_count(package):
    base = code_fingerprint("generate", package)
    (package / "sampling.py").write_text("# a new comment\n\n" + (package / "sampling.py").read_text() + "\n\n")
    (package / "report.py").write_text((package / "report.py").read_text() + "\nUNUSED = 1\n")
    assert code_fingerprint("generate", package) == base


def test_an_unknown_module_is_named():
    with pytest.raises(ValueError, match="no scorelab module 'nope'"):
        module_closure("nope")
