"""Careless and hostile params files, and failures from the libraries under the stage scripts: one table.

Each row writes its inputs into its own folder, runs a real command (`python -m scorelab validate`'s main
or a pipeline stage script's main(argv)), and checks the exit code, that stderr is one bounded line naming
the setting or file (no traceback), and that nothing in the folder changed except the stage's own outputs,
which a failure must not leave. The alias bomb and the giant grid are checked by what the loader does
(no object built, no grid point listed), not by the clock.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_bad_inputs import (  # noqa: E402,F401  (fixtures are found by name)
    VARIANT, Ctx, digits_project, evaluate_case, isolated_environment, mlp_model, sample_argv, set_key, stage_module,
    toy_data, write_yaml,
)

from scorelab import cli, config, tracking  # noqa: E402
from scorelab.config import MAX_GRID, MAX_YAML_NODES, ConfigError, load_params  # noqa: E402
from scorelab.failures import explain, run_stage  # noqa: E402
from scorelab.rng import MAX_SEED, SampleNoise  # noqa: E402
from scorelab.schema import MAX_LINE  # noqa: E402

MAX_STDERR_LINE = MAX_LINE + 200  # the file name and count in front of a problem


def alias_bomb(levels: int = 9) -> str:
    """10**levels list items from a few hundred bytes of YAML: each level repeats the one below ten times."""
    lines = ["bomb:", "  l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def giant_grid(params: dict) -> dict:
    return set_key(params, "tune", {
        "space": [{"sde": {"type": "vp", "beta_min": [0.05 + i / 1000 for i in range(100)],
                           "beta_max": [10.0 + i for i in range(100)], "eps": [1e-5 * (1 + i) for i in range(100)]}}],
        "samplers": [{"method": "ddim", "steps": [2]}]})


# ---------------------------------------------------------------------------------------------
# Inputs: each returns (command, argv); command "validate" or a pipeline stage's name


def params_file(ctx: Ctx, edit: Callable[[dict], dict] = lambda p: p, text: str = "") -> Path:
    """The toy params with `edit` applied, `text` (raw YAML) put in front."""
    path = ctx.toy_params()
    path.write_text(text + yaml.safe_dump(edit(yaml.safe_load(path.read_text())), sort_keys=False))
    return path


def replace_line(ctx: Ctx, old: str, new: str) -> Path:
    path = ctx.toy_params()
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return path


def on(command: str, build: Callable[[Ctx], Path]) -> Callable[[Ctx], tuple[str, list[str]]]:
    def case(ctx: Ctx) -> tuple[str, list[str]]:
        path = build(ctx)
        if command == "validate":
            return command, ["validate", str(path)]
        if command == "prepare":
            return command, ["--params", str(path)]
        if command == "tune":
            return command, ["--params", str(path), "--root", str(ctx.tmp), "--out", str(ctx.tmp / "out")]
        if command == "sample":
            return command, sample_argv(ctx, path)
        return command, ctx.train_argv(path)
    return case


def seeds_flag(ctx: Ctx) -> tuple[str, list[str]]:
    return "sample", sample_argv(ctx, ctx.toy_params()) + ["--seeds", str(MAX_SEED + 1)]


def manifest_without_nfe(ctx: Ctx) -> tuple[str, list[str]]:
    argv = evaluate_case()(ctx)
    manifest = ctx.tmp / "samples" / "ddim-2" / "seed0" / "manifest.json"
    manifest.write_text(json.dumps({"count": 8}))
    ctx.vars["manifest"] = manifest
    return "evaluate", argv


def raising(stage: str, call: str, error: Callable[[Ctx], BaseException]) -> Callable[[Ctx], tuple[str, list[str]]]:
    """The stage with its library call replaced by one that raises what that library raised for an outside
    test (an MLflow, Arrow, Ray or file-system error): the script must map it to one line."""
    def case(ctx: Ctx) -> tuple[str, list[str]]:
        module = stage_module(stage)
        e = error(ctx)

        def fail(*args: Any, **kwargs: Any) -> Any:
            raise e
        ctx.fixture("monkeypatch").setattr(module, call, fail)
        return stage, (sample_argv(ctx, ctx.toy_params()) if stage == "sample" else ctx.train_argv(ctx.toy_params()))
    return case


def mlflow_error(ctx: Ctx) -> BaseException:
    from mlflow.exceptions import MlflowException
    return MlflowException("Could not find a registered tracking store for: ftp://host/x. Currently registered "
                           "schemes are: ['', 'file', 'databricks', 'http', 'https', 'sqlite']")


def arrow_error(ctx: Ctx) -> BaseException:
    import pyarrow.fs
    try:
        pyarrow.fs.FileSystem.from_uri("ftp://host/ray")  # the real error, from the real call
    except Exception as e:
        return e
    raise AssertionError("pyarrow accepted ftp://")


def long_name_error(ctx: Ctx) -> BaseException:
    name = ctx.tmp / ("v" * 300)
    try:
        name.mkdir()  # the real error, from the real file system
    except OSError as e:
        return e
    raise AssertionError("a 300-character name was accepted")


@dataclass(frozen=True)
class Row:
    id: str
    build: Callable[[Ctx], tuple[str, list[str]]]
    code: int
    fragment: str  # in stderr's first line ({tmp}, {MAX_SEED}, ... formatted)


BOMB = alias_bomb()
ROWS = [
    # -- bounded validation --------------------------------------------------------------------------------
    Row("alias-bomb-validate", on("validate", lambda ctx: params_file(ctx, text=BOMB)), 2,
        f"expands to more than {MAX_YAML_NODES:,} nodes"),
    Row("alias-bomb-train", on("train", lambda ctx: params_file(ctx, text=BOMB)), 2,
        f"expands to more than {MAX_YAML_NODES:,} nodes"),
    Row("alias-bomb-prepare", on("prepare", lambda ctx: params_file(ctx, text=BOMB)), 2,
        f"expands to more than {MAX_YAML_NODES:,} nodes"),
    Row("huge-file-validate", on("validate", lambda ctx: params_file(ctx, text="# " + "x" * 1_000_000 + "\n")), 2,
        "larger than 1,000,000 bytes"),
    Row("deep-nesting-validate", on("validate", lambda ctx: params_file(ctx, text="deep: " + "[" * 5000 + "\n")), 2,
        "nested too deeply"),
    Row("giant-grid-validate", on("validate", lambda ctx: params_file(ctx, giant_grid)), 2,
        f"tune.space.0.sde: the grid has 1,000,000 settings (100 x 100 x 100); at most {MAX_GRID:,}"),
    Row("giant-grid-tune", on("tune", lambda ctx: params_file(ctx, giant_grid)), 2,
        "tune.space.0.sde: the grid has 1,000,000 settings"),
    # -- one strict loader -------------------------------------------------------------------------------------
    Row("steps-yes-validate", on("validate", lambda ctx: replace_line(ctx, "steps: 2\n", "steps: yes\n")), 2,
        "train.steps: must be a number, not a boolean"),
    Row("steps-yes-train", on("train", lambda ctx: replace_line(ctx, "steps: 2\n", "steps: yes\n")), 2,
        "train.steps: must be a number, not a boolean"),
    Row("sample-n-on", on("sample", lambda ctx: params_file(ctx, text="sample: {n: on}\n")), 2,
        "sample.n: must be a number, not a boolean"),
    Row("sampler-steps-true", on("validate", lambda ctx: params_file(
        ctx, lambda p: set_key(p, "variants.v.samplers", [{"method": "ddim", "steps": [4, True]}]))), 2,
        "variants.v.samplers.0.steps.1: must be a number, not a boolean"),
    Row("seed-yes-prepare", on("prepare", lambda ctx: params_file(ctx, lambda p: set_key(p, "seed", True))), 2,
        "seed: must be a number, not a boolean"),
    Row("duplicate-key-prepare", on("prepare", lambda ctx: params_file(ctx, text="seed: 1\n")), 2,
        "duplicate key 'seed'"),
    Row("infinite-timeout-train", on("train", lambda ctx: params_file(
        ctx, lambda p: set_key(p, "ray.connect_timeout_s", float("inf")))), 2,
        "ray.connect_timeout_s: must be a finite number"),
    Row("storage-ftp-validate", on("validate", lambda ctx: params_file(
        ctx, lambda p: set_key(p, "ray.storage_path", "ftp://host/ray"))), 2,
        "ray.storage_path: URI scheme 'ftp' is not a file system pyarrow can open; valid: a local or shared folder"),
    Row("storage-ftp-tune", on("tune", lambda ctx: params_file(
        ctx, lambda p: set_key(p, "ray.storage_path", "FTP://host/ray"))), 2,
        "ray.storage_path: URI scheme 'ftp' is not a file system pyarrow can open"),
    Row("nan-lr-validate", on("validate", lambda ctx: params_file(ctx, lambda p: set_key(p, "train.lr", float("nan")))),
        2, "train.lr: must be a finite number"),
    Row("seed-2-63-validate", on("validate", lambda ctx: params_file(ctx, lambda p: set_key(p, "seed", 2**63))), 2,
        f"seed: must be <= {MAX_SEED} (got 9223372036854775808)"),
    Row("seed-2-63-prepare", on("prepare", lambda ctx: params_file(ctx, lambda p: set_key(p, "seed", 2**63))), 2,
        f"seed: must be <= {MAX_SEED}"),
    Row("sample-seeds-2-63", on("validate", lambda ctx: params_file(
        ctx, lambda p: set_key(p, "sample.seeds", [0, 2**63]))), 2, f"sample.seeds.1: must be <= {MAX_SEED}"),
    Row("sample-seeds-flag-2-63", seeds_flag, 2, f"--seeds must be distinct integers in [0, {MAX_SEED}]"),
    Row("variant-name-300-validate", on("validate", lambda ctx: params_file(
        ctx, lambda p: {**p, "variants": {"v" * 300: p["variants"]["v"]}})), 2,
        "invalid name 'vvvvvvvvvvvvvvvvvvvvvvvvvvv...vvvvvvvvvvvvvvvvvvvvvvvvvvvv'; must be at most 64 characters"),
    # -- one line for every failure --------------------------------------------------------------------------
    Row("mlflow-exception-train", raising("train", "train_variant", mlflow_error), 1,
        "train v: mlflow.tracking_uri: MlflowException: Could not find a registered tracking store for: ftp://"),
    Row("arrow-invalid-train", raising("train", "train_variant", arrow_error), 1,
        "train v: ray.storage_path: ArrowInvalid:"),
    Row("no-ray-cluster-train", raising("train", "train_variant", lambda ctx: ConnectionError(
        "Could not find any running Ray instance. Please specify the one to connect to by setting `address`.")), 1,
        "train v: cannot connect (ConnectionError: Could not find any running Ray instance"),
    Row("overflow-train", raising("train", "train_variant", lambda ctx: OverflowError("timeout value is too large")),
        1, "train v: OverflowError: timeout value is too large"),
    Row("file-name-too-long-train", raising("train", "train_variant", long_name_error), 1,
        "train v: {tmp}/vvvvvvvvvv"),
    Row("model-without-variant-sample", raising("sample", "generate", lambda ctx: KeyError("variant")), 1,
        "sample v: model file {tmp}/model.pt is malformed (KeyError: 'variant')"),
    Row("manifest-without-nfe-evaluate", manifest_without_nfe, 1,
        "evaluate v: {tmp}/samples/ddim-2/seed0/manifest.json: `nfe` must be an integer"),
]


def tree_hash(root: Path, skip: tuple[str, ...]) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if not str(p.relative_to(root)).startswith(skip)}


def run(command: str, argv: list[str]) -> int:
    return cli.main(argv) if command == "validate" else stage_module(command).main(argv)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, tmp_path, request, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # stage defaults (outputs/, mlflow.db) land in the sandbox
    ctx = Ctx(tmp_path, request)
    command, argv = row.build(ctx)
    outputs = ("out", "eval", "outputs", "prepared", "ray", "mlflow.db", "mlruns")
    before = tree_hash(tmp_path, outputs)
    capsys.readouterr()
    code = run(command, argv)
    err = capsys.readouterr().err

    assert code == row.code, err
    assert err.strip() and "Traceback" not in err, err
    first = err.splitlines()[0]
    assert row.fragment.format(tmp=tmp_path) in first, first
    assert all(len(line) <= MAX_STDERR_LINE for line in err.splitlines()), max(map(len, err.splitlines()))
    assert tree_hash(tmp_path, outputs) == before, "the failure changed its inputs"
    for rel in ("out", "outputs", "prepared", "eval/metrics.json"):
        assert not (tmp_path / rel).exists(), f"{rel} left behind"


# ---------------------------------------------------------------------------------------------
# validate and the stages refuse the same files, with the same first problem


SHARED = [r for r in ROWS if r.id.endswith("-validate") and "grid" not in r.id]


@pytest.mark.parametrize("row", SHARED, ids=[r.id for r in SHARED])
def test_validate_and_train_agree(row: Row, tmp_path, request, capsys):
    ctx = Ctx(tmp_path, request)
    _, argv = row.build(ctx)
    path = argv[1]
    firsts = []
    for command, args in (("validate", ["validate", path]), ("train", ctx.train_argv(Path(path)))):
        capsys.readouterr()
        assert run(command, args) == 2
        firsts.append(capsys.readouterr().err.splitlines()[0])
    assert firsts[0] == firsts[1]


def test_validate_and_train_accept_the_same_valid_file(tmp_path, request):
    ctx = Ctx(tmp_path, request)
    path = ctx.toy_params()
    assert cli.main(["validate", str(path)]) == 0
    assert cli.load_or_report(str(path), "v") is not None  # what every stage script calls first


def test_committed_params_and_presets_still_validate():
    repo = Path(__file__).resolve().parents[1]
    for path in [repo / "params.yaml", *sorted((repo / "presets").glob("*.yaml"))]:
        assert cli.main(["validate", str(path)]) == 0, path


# ---------------------------------------------------------------------------------------------
# Bounded work: what the loader does with an alias bomb and a giant grid


def test_alias_bomb_is_refused_before_any_object_is_built(tmp_path, monkeypatch):
    built = []
    original = yaml.SafeLoader.construct_object
    monkeypatch.setattr(yaml.SafeLoader, "construct_object",
                        lambda self, node, deep=False: built.append(1) or original(self, node, deep))
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels=30))  # 10**30 items
    with pytest.raises(ConfigError) as e:
        load_params(path)
    assert built == []
    assert len(str(e.value)) <= MAX_STDERR_LINE


def test_expanded_size_stops_at_its_limit():
    node = yaml.compose(alias_bomb(levels=30))
    assert config.expanded_size(node, 1000) == 1001
    assert config.expanded_size(yaml.compose("[a, b, {c: d}]"), 1000) == 6  # list, a, b, mapping, c, d


def test_giant_grid_is_refused_without_listing_one_setting(tmp_path, request, monkeypatch):
    listed = []
    original = config.TuneCandidate.settings
    monkeypatch.setattr(config.TuneCandidate, "settings", lambda self, *a: listed.append(1) or original(self, *a))
    path = params_file(Ctx(tmp_path, request), giant_grid)
    with pytest.raises(ConfigError) as e:
        load_params(path)
    assert listed == []
    assert e.value.problems == [f"tune.space.0.sde: the grid has 1,000,000 settings (100 x 100 x 100); at most "
                                f"{MAX_GRID:,} can be swept: shorten the lists of choices"]


def test_the_whole_space_is_capped_too(tmp_path, request):
    p = giant_grid(yaml.safe_load(Ctx(tmp_path, request).toy_params().read_text()))
    p["tune"]["space"][0]["sde"] = {"type": "vp", "beta_max": [10.0 + i for i in range(20)]}
    p["tune"]["lr"] = [1e-4 * (1 + i) for i in range(10)]
    p["tune"]["ema_decay"] = [0.9 + i / 100 for i in range(9)]
    with pytest.raises(ConfigError, match=r"tune.space: space x lr x ema_decay has 1,800 configurations "
                                          r"\(20 SDE settings x 10 lr x 9 ema_decay\)"):
        config.parse_params(p)


def test_a_huge_value_is_quoted_in_bounded_space():
    bomb: list = ["x"] * 10
    for _ in range(40):  # 10**40 leaves: repr() would never finish
        bomb = [bomb] * 10
    with pytest.raises(ConfigError) as e:
        config.parse_params({"seed": bomb, "variants": {"v": VARIANT}})
    assert len(e.value.problems[0]) <= MAX_LINE and e.value.problems[0].startswith("seed: ")


# ---------------------------------------------------------------------------------------------
# Seeds and MLflow runs


def test_noise_refuses_seeds_it_would_alias():
    assert not SampleNoise(0, 2).randn((3,)).equal(SampleNoise(MAX_SEED, 2).randn((3,)))
    with pytest.raises(ValueError, match="outside"):
        SampleNoise(2**63, 2)


def test_a_failure_after_opening_a_run_ends_it_failed(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    error = arrow_error(None)

    def stage() -> int:
        run_id = tracking.open_run(uri, "e", tmp_path, "key", "v", {})
        tracking.RunLogger(uri, run_id).finish()  # a finished run, resumed below: RUNNING again
        tracking.open_run(uri, "e", tmp_path, "key", "v", {})
        raise error

    assert run_stage("train v", stage) == 1
    err = capsys.readouterr().err
    assert "train v: ray.storage_path: ArrowInvalid" in err.splitlines()[-1], err
    runs = tracking.client(uri).search_runs([tracking.experiment_id(uri, "e", tmp_path)])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_debug_keeps_the_traceback_and_a_bug_is_not_explained():
    with pytest.raises(ConnectionError):
        run_stage("train v", lambda: (_ for _ in ()).throw(ConnectionError("no cluster")), debug=True)
    assert explain(ZeroDivisionError("division by zero")) is None
    with pytest.raises(ZeroDivisionError):
        run_stage("train v", lambda: 1 // 0)
