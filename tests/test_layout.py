"""dvc.yaml is the table of contents of the outputs that scorelab.layout spells, and every stage depends on
the code it runs: the scorelab modules its script imports, directly or through other modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from scorelab.layout import Layout, stage_command

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "scorelab"


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _paths(entries: list) -> list[str]:
    """DVC's outs/metrics/plots/deps entries: a path, or {path: options}."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def _module_imports(path: Path) -> set[str]:
    """The scorelab modules a file imports anywhere in it (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 or module.startswith("scorelab"):
                base = module.removeprefix("scorelab").lstrip(".")
                if base:
                    found.add(base.split(".")[0])
                else:  # from . import a, b / from scorelab import a
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("scorelab."):
                    found.add(alias.name.split(".")[1])
    return {m for m in found if (PACKAGE / f"{m}.py").is_file()}


def _closure(script: Path) -> set[str]:
    todo, seen = list(_module_imports(script)), set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += _module_imports(PACKAGE / f"{m}.py")
    return seen


def _script(cmd: str) -> Path:
    return REPO / next(part for part in cmd.split() if part.startswith("pipeline/"))


def test_outputs_in_dvc_yaml_are_the_layouts_paths():
    stages, out = _stages(), Layout(REPO)
    rel = out.shown
    train = stages["train"]["do"]
    assert rel(out.model("${key}")) in _paths(train["outs"])
    assert rel(out.train_metrics("${key}")) in _paths(train["outs"])
    assert _paths(stages["sample"]["do"]["outs"]) == [rel(out.samples("${key}"))]
    assert rel(out.eval_metrics("${key}")) in _paths(stages["evaluate"]["do"]["outs"])
    assert rel(out.featurizer) in _paths(stages["featurizer"]["outs"])
    assert {rel(out.tuned_variant_file), rel(out.tune_trials), rel(out.tune_metrics)} <= set(_paths(stages["tune"]["outs"]))
    assert rel(out.tuned_variant_file) in _paths(stages["train_tuned"]["deps"])
    assert rel(out.model("tuned")) in _paths(stages["train_tuned"]["outs"])
    assert rel(out.train_metrics("tuned")) in _paths(stages["train_tuned"]["outs"])
    assert _paths(stages["sample_tuned"]["outs"]) == [rel(out.samples("tuned"))]
    assert rel(out.eval_metrics("tuned")) in _paths(stages["evaluate_tuned"]["outs"])
    assert all(p.startswith(rel(out.reports) + "/") for p in _paths(stages["report"]["outs"]))
    for name, stage in stages.items():  # the commands are the stage scripts that stage_command names
        cmd = stage.get("do", stage)["cmd"]
        assert cmd.startswith(stage_command(name.removesuffix("_tuned").split("@")[0]).split(" --")[0])


def test_the_headline_is_the_only_declared_metrics_file_and_the_plots_are_the_reports():
    """`dvc exp show` prints a column per metric leaf: the per-seed detail of the stages stays in plain outs."""
    dvc_yaml, out = yaml.safe_load((REPO / "dvc.yaml").read_text()), Layout(REPO)
    declared = [p for stage in dvc_yaml["stages"].values() for p in _paths(stage.get("do", stage).get("metrics"))]
    assert declared == [out.shown(out.headline)]
    report_outs = set(_paths(dvc_yaml["stages"]["report"]["outs"]))
    plots = [next(iter(p)) for p in dvc_yaml["plots"]]
    assert plots and set(plots) <= report_outs, "the top-level plots draw the report's CSVs"
    for p in dvc_yaml["plots"]:
        template = next(iter(p.values()))["template"]
        assert (REPO / ".dvc" / "plots" / f"{template}.json").is_file(), template


@pytest.mark.parametrize("name", list(_stages()))
def test_every_stage_depends_on_the_code_it_runs(name):
    stage = _stages()[name]
    stage = stage.get("do", stage)
    deps = set(_paths(stage["deps"]))
    script = _script(stage["cmd"])
    assert str(script.relative_to(REPO)) in deps
    if "src/scorelab" in deps:
        return
    missing = sorted(m for m in _closure(script) if f"src/scorelab/{m}.py" not in deps)
    assert not missing, f"stage {name}: dvc.yaml does not list the modules it runs: {missing}"


def test_the_import_closure_follows_lazy_imports():
    # generate imports sampling at the top and checkpoint, which imports nets inside build_model
    assert {"sampling", "checkpoint", "nets", "sde"} <= _closure(REPO / "pipeline" / "sample.py")
