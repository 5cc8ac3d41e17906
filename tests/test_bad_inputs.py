"""Bad input across the whole tool, one table: each row is a bad params file, dataset, checkpoint, set of
samples or cluster setting given to a real stage script, with the exit code, the exception class the
library raises (None: the script's own argument check) and what the first line of stderr must name.

Every case also checks that the failure left nothing DVC or a later stage could take for a result: the
stage's outputs do not exist (a stale metrics.json is removed), and no half-written dataset is left.

The stage scripts run in-process (`main(argv)`), with the library call they make wrapped to record the
exception that escapes it; the one case that needs a process of its own (a Ray address, which an
initialised Ray would ignore) runs this file as a script. Everything is small: 2-D toy data of 320
points, 8x8 digits, MLPs and an 8-channel U-Net. The Ray cases share one local Ray; the checkpoint
cases share one real 2-step training run, whose checkpoints each case damages and then restores.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_cluster import _free_port  # noqa: E402
from test_data import make_folder  # noqa: E402
from test_generate import DDIM, MLP, UNET, make_model  # noqa: E402
from test_training import make_params  # noqa: E402

from scorelab import checkpoint  # noqa: E402
from scorelab.config import ConfigError, VariantConfig  # noqa: E402
from scorelab.data import (  # noqa: E402
    MANIFEST_DIGEST_KEY, DataConfig, DataError, manifest_sha256, overall_checksum, prepare,
)
from scorelab.storage import sha256_file  # noqa: E402
from scorelab.ema import EMA  # noqa: E402
from scorelab.evaluate import EvaluateError  # noqa: E402
from scorelab.features import INCEPTION_WEIGHTS_ENV, DigitClassifier  # noqa: E402
from scorelab.generate import GenerateError  # noqa: E402
from scorelab.tracking import TrackingError  # noqa: E402
from scorelab.checkpoint import CheckpointMismatchError, build_model, export_model  # noqa: E402
from scorelab.runtime import RuntimeSetupError  # noqa: E402
from scorelab.training import TrainingError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# a truncated file: the faults work's subclass where it exists
CheckpointCorruptError = checkpoint.CheckpointCorruptError

TOY = {"kind": "gaussian_mixture", "n_train": 256, "n_test": 64}
VARIANT = {"sde": {"type": "vp"}, "parameterization": {"type": "eps"}, "net": MLP, "samplers": [DDIM]}
TRAIN = {"steps": 2, "batch_size": 16, "checkpoint_every": 1, "log_every": 1}
IMAGE_VARIANT = {"sde": {"type": "vp"}, "parameterization": {"type": "edm"}, "net": UNET,
                 "samplers": [{"method": "ddim", "steps": [2]}]}
N_IMAGES = 8  # samples per seed of the evaluation cases

# What each stage script calls; the spy records the exception that escapes it.
STAGES = {"train": ("train_variant",), "sample": ("generate",), "evaluate": ("evaluate_variant",),
          "prepare": ("load_data_params", "prepare")}


# ---------------------------------------------------------------------------------------------
# Running a stage


@functools.cache
def stage_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bad_inputs_{name}_stage", REPO / "pipeline" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_stage(stage: str, argv: list[str]) -> tuple[int, BaseException | None]:
    """(exit code, the first exception that escaped the library calls the script makes)."""
    import scorelab.cli

    module = stage_module(stage)
    raised: list[BaseException] = []

    def spy(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except BaseException as e:
                raised.append(e)
                raise
        return wrapper

    targets = [(scorelab.cli, "load_params")] + [(module, name) for name in STAGES[stage]]
    saved = [(obj, name, getattr(obj, name)) for obj, name in targets]
    for obj, name, fn in saved:
        setattr(obj, name, spy(fn))
    try:
        code = module.main(argv)
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    return code, (raised[0] if raised else None)


def run_stage_process(stage: str, argv: list[str], tmp: Path) -> tuple[int, str, str]:
    """This file as a script: (exit code, name of the exception class or "", stderr)."""
    record = tmp / "raised.txt"
    env = {**os.environ, "SCORELAB_BAD_INPUT_RAISED": str(record), "PYTHONPATH": str(REPO / "src")}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, __file__, stage, *argv], env=env, capture_output=True, text=True,
                       timeout=120, cwd=tmp)
    return r.returncode, record.read_text() if record.exists() else "", r.stderr


# ---------------------------------------------------------------------------------------------
# Inputs


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def set_key(data: dict, dotted: str, value: Any) -> dict:
    """data with data[a][b]... = value for "a.b..." (a deep copy)."""
    data = json.loads(json.dumps(data))
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return data


@dataclass
class Ctx:
    """One case's own folder, the shared fixtures it asked for, and values its messages mention."""

    tmp: Path
    request: Any
    vars: dict[str, Any] = field(default_factory=dict)
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def fixture(self, name: str) -> Any:
        return self.request.getfixturevalue(name)

    def toy_params(self, *edits: tuple[str, Any], data_dir: Path | None = None) -> Path:
        """A params file for the toy variant "v", training into this case's folder, reading the shared toy
        dataset (or data_dir's), with the dotted edits applied."""
        p = make_params(self.tmp, "toy2d", {"v": VARIANT}, TRAIN, ray={"num_workers": 1, "max_failures": 0})
        p["data"] = {"source": "toy2d", "out_dir": str(data_dir or self.fixture("toy_data")), "toy": TOY}
        for dotted, value in edits:
            p = set_key(p, dotted, value)
        return write_yaml(self.tmp / "params.yaml", p)

    def train_argv(self, params: Path, variant: str = "v") -> list[str]:
        return ["--params", str(params), "--variant", variant, "--root", str(self.tmp), "--out", str(self.tmp / "out")]

    def own_toy_data(self) -> Path:
        """A copy of the shared toy dataset to damage: <tmp>/data/toy2d."""
        shutil.copytree(self.fixture("toy_data") / "toy2d", self.tmp / "data" / "toy2d")
        return self.tmp / "data"


def resign(dataset: Path) -> None:
    """Recompute the manifest's sha256s (its own included) after a shard was changed on purpose."""
    path = dataset / "manifest.json"
    m = json.loads(path.read_text())
    for s in m["shards"]:
        s["sha256"] = sha256_file(dataset / s["file"])
    m["checksum"] = overall_checksum(s["sha256"] for s in m["shards"])
    m[MANIFEST_DIGEST_KEY] = manifest_sha256(m)
    path.write_text(json.dumps(m))


def edit_manifest(dataset: Path, edit: Callable[[dict], None]) -> None:
    """Change the manifest and re-sign it, as a careful forger would: the checks behind its digest run."""
    path = dataset / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    m[MANIFEST_DIGEST_KEY] = manifest_sha256(m)
    path.write_text(json.dumps(m))


def write_samples(out: Path, setting: str, seed: int, x: np.ndarray) -> Path:
    """A finished sample folder in scorelab.generate's format: one chunk, its manifest."""
    folder = out / setting / f"seed{seed}"
    folder.mkdir(parents=True)
    n = len(x)
    np.savez(folder / f"chunk-0-{n}.npz", x=x, indices=np.arange(n, dtype=np.int64), nfe=np.int64(2),
             seconds=np.float64(0.0))
    (folder / "manifest.json").write_text(json.dumps({"count": n, "nfe": 2}))
    return folder


def mlp_model(path: Path, variant: dict, weights_hidden: int | None = None) -> Path:
    """model.pt of a toy variant with random weights; weights_hidden: weights of an MLP of that width
    under the variant's own (different) net config."""
    v = VariantConfig.model_validate(variant)
    if weights_hidden is None:
        return make_model(path, v, (2,))
    other = VariantConfig.model_validate({**variant, "net": {**variant["net"], "hidden": weights_hidden}})
    sd = build_model(other, (2,)).state_dict()
    state = {"ema": {"module." + k: t for k, t in sd.items()}, "step": 0, "config_hash": "x", "run_id": "r"}
    return export_model(state, v, (2,), path)


# ---------------------------------------------------------------------------------------------
# Shared fixtures


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    """The out_dir of a prepared toy dataset (<out_dir>/toy2d); cases that damage data copy it."""
    out = tmp_path_factory.mktemp("toy_data")
    prepare(DataConfig(source="toy2d", out_dir=str(out), toy=TOY), seed=0)
    return out


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the cases that need one; num_gpus=0 so "no GPU" holds on any machine. With its
    dashboard: Ray Train's placement-group cleaner asks the state API whether the run's controller is
    alive, and without an answer removes the workers' placement group mid-run."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=0, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def trained(ray_local, toy_data, tmp_path_factory) -> dict:
    """A real 2-step training run of the toy variant through the train stage, with its checkpoints."""
    root = tmp_path_factory.mktemp("trained")
    p = make_params(root, "toy2d", {"v": VARIANT}, TRAIN, ray={"num_workers": 1, "max_failures": 0})
    p["data"] = {"source": "toy2d", "out_dir": str(toy_data), "toy": TOY}
    params = write_yaml(root / "params.yaml", p)
    code, raised = run_stage("train", ["--params", str(params), "--variant", "v", "--root", str(root)])
    assert code == 0 and raised is None, raised
    states = sorted((root / "ray").rglob(checkpoint.STATE_FILE))
    assert states, "the run left no checkpoint"
    return {"root": root, "params": params, "states": states}


@pytest.fixture(scope="module")
def digits_project(tmp_path_factory) -> dict:
    """What the evaluate stage reads: params, 8x8 digits, a random-weights model.pt; no samples (each
    case writes its own)."""
    root = tmp_path_factory.mktemp("digits")
    params = {"seed": 0, "data": {"source": "digits", "image_size": 8, "out_dir": str(root / "data")},
              "variants": {"v": IMAGE_VARIANT}}
    write_yaml(root / "params.yaml", params)
    prepare(DataConfig(source="digits", image_size=8, out_dir=str(root / "data")), seed=0)
    model = make_model(root / "model.pt", VariantConfig.model_validate(IMAGE_VARIANT), (1, 8, 8))
    return {"root": root, "params": params, "model": model}


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """No machine-wide Inception weights, Ray address or MLflow URI reaches a case."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in (INCEPTION_WEIGHTS_ENV, "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------------------------------------
# The cases: each builds its inputs under ctx.tmp and returns the stage's argv


def params_case(*edits: tuple[str, Any]) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ctx.train_argv(ctx.toy_params(*edits))


def unknown_variant(ctx: Ctx) -> list[str]:
    return ctx.train_argv(ctx.toy_params(), variant="nope")


def sample_argv(ctx: Ctx, params: Path, model: Path | None = None) -> list[str]:
    model = model or mlp_model(ctx.tmp / "model.pt", VARIANT)
    return ["--params", str(params), "--variant", "v", "--model", str(model), "--out", str(ctx.tmp / "out"),
            "--no-progress"]


def sample_params_case(*edits: tuple[str, Any]) -> Callable[[Ctx], list[str]]:
    return lambda ctx: sample_argv(ctx, ctx.toy_params(*edits))


def sample_n_zero(ctx: Ctx) -> list[str]:
    return sample_argv(ctx, ctx.toy_params()) + ["--n", "0"]


def prepare_argv(ctx: Ctx, data: dict) -> list[str]:
    """The prepare stage writing into the case's folder, which lies outside the project (pytest's working
    directory), so on purpose."""
    data = {"out_dir": str(ctx.tmp / "prepared"), "allow_external_out_dir": True, **data}
    params = write_yaml(ctx.tmp / "params.yaml", {"seed": 0, "data": data})
    return ["--params", str(params)]


def folder_case(build: Callable[[Path], None], **data: Any) -> Callable[[Ctx], list[str]]:
    def case(ctx: Ctx) -> list[str]:
        build(ctx.tmp / "imgs")
        return prepare_argv(ctx, {"source": "folder", "folder": str(ctx.tmp / "imgs"), **data})
    return case


def no_folder(root: Path) -> None:
    pass


def empty_folder(root: Path) -> None:
    root.mkdir()


def with_fake_png(root: Path) -> None:
    make_folder(root)
    (root / "dogs" / "fake.png").write_text("plain text with a .png name")


def with_top_level_image(root: Path) -> None:
    make_folder(root)
    Image.new("RGB", (8, 8)).save(root / "stray.png")


def data_case(damage: Callable[[Path], None]) -> Callable[[Ctx], list[str]]:
    """The train stage on a copy of the toy dataset that `damage` changed."""
    def case(ctx: Ctx) -> list[str]:
        out_dir = ctx.own_toy_data()
        damage(out_dir / "toy2d")
        return ctx.train_argv(ctx.toy_params(data_dir=out_dir))
    return case


def not_prepared(ctx: Ctx) -> list[str]:
    return ctx.train_argv(ctx.toy_params(data_dir=ctx.tmp / "data"))


def flip_byte(dataset: Path) -> None:
    shard = dataset / "train-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def truncate_and_resign(dataset: Path) -> None:
    shard = dataset / "train-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-20])  # the footer is gone: not Parquet any more
    resign(dataset)


def more_rows_in_manifest(dataset: Path) -> None:
    edit_manifest(dataset, lambda m: m["shards"][0].update(rows=m["shards"][0]["rows"] + 1))


def more_train_rows_counted(dataset: Path) -> None:
    edit_manifest(dataset, lambda m: m["counts"].update(train=m["counts"]["train"] + 1))


def resume_case(damage: Callable[[Path], None]) -> Callable[[Ctx], list[str]]:
    """The train stage again on the shared run, each of whose checkpoints `damage` changed (restored after)."""
    def case(ctx: Ctx) -> list[str]:
        run = ctx.fixture("trained")
        for state in run["states"]:
            original = state.read_bytes()
            ctx.cleanup.append(functools.partial(state.write_bytes, original))
            damage(state)
        return ["--params", str(run["params"]), "--variant", "v", "--root", str(run["root"]),
                "--out", str(ctx.tmp / "out")]
    return case


def other_config_hash(state: Path) -> None:
    s = checkpoint.load_state(state.parent, None)
    checkpoint.save_state(state.parent, **{**s, "config_hash": "0" * 64})  # as another configuration writes it


def other_architecture(state: Path) -> None:
    """Weights of a narrower MLP under the same configuration hash: what a changed default net leaves."""
    s = checkpoint.load_state(state.parent, None)
    narrow = build_model(VariantConfig.model_validate({**VARIANT, "net": {**MLP, "hidden": 16}}), (2,))
    checkpoint.save_state(state.parent, **{**s, "model": narrow.state_dict(), "ema": EMA(narrow).state_dict()})


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def sample_model_case(make: Callable[[Path], Path]) -> Callable[[Ctx], list[str]]:
    return lambda ctx: sample_argv(ctx, ctx.toy_params(), model=make(ctx.tmp / "model.pt"))


def ve_model(path: Path) -> Path:
    return mlp_model(path, {**VARIANT, "sde": {"type": "ve"}})


def narrow_weights_model(path: Path) -> Path:
    return mlp_model(path, VARIANT, weights_hidden=16)


def truncated_model(path: Path) -> Path:
    mlp_model(path, VARIANT)
    truncate(path)
    return path


def evaluate_case(x: np.ndarray | None = None, model: Callable[[Path], Path] | None = None, mlflow: bool = False,
                  **evaluate: Any) -> Callable[[Ctx], list[str]]:
    """The evaluate stage on the digits project with these samples (default: valid ones), model and
    params.evaluate settings; a stale metrics.json and fid_vs_nfe.csv wait in its output folder. mlflow:
    log to a tracking server where none listens (else --no-mlflow)."""
    def case(ctx: Ctx) -> list[str]:
        project = ctx.fixture("digits_project")
        samples = np.random.default_rng(0).integers(0, 256, (N_IMAGES, 8, 8, 1), dtype=np.uint8) if x is None else x
        write_samples(ctx.tmp / "samples", "ddim-2", 0, samples)
        params = dict(project["params"])
        if mlflow:
            ctx.vars["port"] = _free_port()
            params = set_key(params, "mlflow.tracking_uri", f"http://127.0.0.1:{ctx.vars['port']}")
        for key, value in evaluate.items():
            params = set_key(params, f"evaluate.{key}", value(ctx) if callable(value) else value)
        (ctx.tmp / "eval").mkdir()
        for stale in ("metrics.json", "fid_vs_nfe.csv"):
            (ctx.tmp / "eval" / stale).write_text("stale")
        model_path = model(ctx.tmp / "model.pt") if model else project["model"]
        return ["--params", str(write_yaml(ctx.tmp / "params.yaml", params)), "--variant", "v",
                "--root", str(project["root"]), "--samples", str(ctx.tmp / "samples"), "--model", str(model_path),
                "--out", str(ctx.tmp / "eval"), "--bpd-samples", "0"] + ([] if mlflow else ["--no-mlflow"])
    return case


def truncated_image_model(path: Path) -> Path:
    make_model(path, VariantConfig.model_validate(IMAGE_VARIANT), (1, 8, 8))
    truncate(path)
    return path


def classifier_weights(ctx: Ctx) -> str:
    path = ctx.tmp / "inception.pth"
    torch.save(DigitClassifier().state_dict(), path)  # a valid weights file, of another network
    return str(path)


def closed_port_address(ctx: Ctx) -> list[str]:
    ctx.vars["port"] = _free_port()  # bound once, then released: nothing listens there
    return ctx.train_argv(ctx.toy_params(("ray.address", f"127.0.0.1:{ctx.vars['port']}")))


def closed_port_tracking(ctx: Ctx) -> list[str]:
    ctx.vars["port"] = _free_port()
    return ctx.train_argv(ctx.toy_params(("mlflow.tracking_uri", f"http://127.0.0.1:{ctx.vars['port']}")))


def two_node_cluster(ctx: Ctx) -> list[str]:
    """The shared local Ray, reporting a second node: the local sqlite store must be refused (the real
    two-node cluster is tests/test_cluster.py's)."""
    import ray

    ctx.fixture("ray_local")
    alive = [n for n in ray.nodes() if n.get("Alive")]
    mp = ctx.fixture("monkeypatch")
    mp.setattr(ray, "nodes", lambda: alive + [{**alive[0], "NodeID": "f" * 56}])
    return ctx.train_argv(ctx.toy_params())


def gpu_wanted(ctx: Ctx) -> list[str]:
    ctx.fixture("ray_local")  # started with num_gpus=0
    return ctx.train_argv(ctx.toy_params(("ray.use_gpu", True)))


@dataclass(frozen=True)
class Case:
    id: str
    stage: str  # pipeline/<stage>.py
    build: Callable[[Ctx], list[str]]  # writes the inputs, returns the argv
    code: int  # exit code
    error: type[BaseException] | None  # exactly the class the library raises; None: the script's own check
    names: tuple[str, ...]  # what the first line of stderr must name ({tmp}: the case's folder; {port}, ...)
    absent: tuple[str, ...] = ("out", "ray")  # under the case's folder: must not exist afterwards
    empty: tuple[str, ...] = ()  # under the case's folder: absent or an empty folder afterwards
    process: bool = False  # in a process of its own
    seconds: float | None = None  # must fail within this many seconds


EVAL_OUT = ("eval/metrics.json", "eval/fid_vs_nfe.csv")
DATA_OUT = ("out", "ray", "prepared")

CASES = [
    # -- params: a representative few (tests/test_config.py holds the full table) --------------------------
    Case("params-wrong-type", "train", params_case(("train.steps", "many")), 2, ConfigError,
         ("{tmp}/params.yaml: 1 problem(s); first: train.steps: must be a valid integer",)),
    Case("params-out-of-range", "train", params_case(("train.lr", 0)), 2, ConfigError,
         ("train.lr: must be > 0 (got 0)",)),
    Case("params-coupled-sigma-min-above-max", "train",
         params_case(("variants.v.sde", {"type": "ve", "sigma_min": 5.0, "sigma_max": 1.0})), 2, ConfigError,
         ("variants.v.sde.sigma_max: must be > sigma_min (5.0)",)),
    Case("params-unknown-key", "train", params_case(("variants.v.sde.beta_mn", 0.1)), 2, ConfigError,
         ("variants.v.sde.beta_mn: unknown key 'beta_mn'; did you mean 'beta_min'?",)),
    Case("params-unknown-variant", "train", unknown_variant, 2, None, ("--variant 'nope' is not in", "valid: v")),
    Case("params-unknown-sampler", "sample", sample_params_case(("variants.v.samplers", [{"method": "ddimm"}])), 2,
         ConfigError, ("variants.v.samplers.0.method: unknown method 'ddimm'; did you mean 'ddim'?",)),
    Case("params-steps-below-1", "sample",
         sample_params_case(("variants.v.samplers", [{"method": "ddim", "steps": [0]}])), 2, ConfigError,
         ("variants.v.samplers.0.steps.0: must be >= 1 (got 0)",)),
    Case("params-sample-n-below-1", "sample", sample_n_zero, 2, None, ("--n", "must be >= 1")),
    Case("params-batch-below-workers", "train", params_case(("train.batch_size", 1), ("ray.num_workers", 2)), 2,
         ConfigError, ("train.batch_size: must be >= ray.num_workers (2) (got 1)",)),
    Case("params-unknown-data-source", "prepare", lambda ctx: prepare_argv(ctx, {"source": "imagenet"}), 2,
         ConfigError, ("data.source: must be 'digits', 'toy2d'",), absent=DATA_OUT),
    # -- data: image folders (prepare), prepared datasets (train) ---------------------------------------------
    Case("data-folder-missing", "prepare", folder_case(no_folder, image_size=8), 1, DataError,
         ("data.folder: {tmp}/imgs does not exist",), absent=DATA_OUT),
    Case("data-folder-empty", "prepare", folder_case(empty_folder, image_size=8), 1, DataError,
         ("data.folder: no PNG or JPEG files under {tmp}/imgs",), absent=DATA_OUT),
    Case("data-non-image-file", "prepare", folder_case(with_fake_png, image_size=8), 1, DataError,
         ("{tmp}/imgs/dogs/fake.png: not a readable PNG/JPEG image",), absent=("out", "ray"), empty=("prepared",)),
    Case("data-mixed-sizes-without-image-size", "prepare", folder_case(make_folder), 2, ConfigError,
         ("data.image_size: required when source is 'folder'",), absent=DATA_OUT),
    Case("data-images-beside-class-folders", "prepare", folder_case(with_top_level_image, image_size=8), 1,
         DataError, ("data.folder: {tmp}/imgs mixes images at its top level (stray.png)",), absent=DATA_OUT),
    Case("data-not-prepared", "train", not_prepared, 1, DataError,
         ("{tmp}/data/toy2d/manifest.json: not found", "run pipeline/prepare.py")),
    Case("data-shard-bytes-changed", "train", data_case(flip_byte), 1, DataError,
         ("{tmp}/data/toy2d/train-00000.parquet: checksum mismatch",)),
    Case("data-shard-corrupt-parquet", "train", data_case(truncate_and_resign), 1, DataError,
         ("{tmp}/data/toy2d/train-00000.parquet: unreadable Parquet shard",)),
    Case("data-manifest-rows-disagree", "train", data_case(more_rows_in_manifest), 1, DataError,
         ("{tmp}/data/toy2d/train-00000.parquet: row count mismatch (256 rows, manifest says 257)",)),
    Case("data-manifest-counts-disagree", "train", data_case(more_train_rows_counted), 1, DataError,
         ("{tmp}/data/toy2d/manifest.json: counts.train is 257 but its shards hold 256 rows",)),
    # -- checkpoints: resuming training, and model.pt for sampling and evaluation ------------------------------
    Case("resume-checkpoint-of-another-config", "train", resume_case(other_config_hash), 1, CheckpointMismatchError,
         ("training 'v' failed: checkpoint ", "state.pt was written for configuration 000000000000")),
    Case("resume-checkpoint-of-another-architecture", "train", resume_case(other_architecture), 1,
         CheckpointMismatchError, ("state.pt holds weights of another architecture than variant 'v'",
                                   "shape mismatch")),
    Case("resume-checkpoint-truncated", "train", resume_case(truncate), 1, CheckpointCorruptError,
         ("training 'v' failed: checkpoint ", "state.pt is unreadable")),
    Case("sample-model-of-another-config", "sample", sample_model_case(ve_model), 1, GenerateError,
         ("{tmp}/model.pt was trained with a different sde, parameterization or net",)),
    Case("sample-model-of-another-architecture", "sample", sample_model_case(narrow_weights_model), 1,
         CheckpointMismatchError, ("model file {tmp}/model.pt holds weights of another architecture",)),
    Case("sample-model-truncated", "sample", sample_model_case(truncated_model), 1, CheckpointCorruptError,
         ("model file {tmp}/model.pt is unreadable",)),
    Case("evaluate-model-truncated", "evaluate", evaluate_case(model=truncated_image_model), 1, EvaluateError,
         ("{tmp}/model.pt: not a readable scorelab model",), absent=EVAL_OUT),
    # -- evaluation: samples and Inception weights ----------------------------------------------------------
    Case("evaluate-samples-wrong-shape", "evaluate",
         evaluate_case(np.zeros((N_IMAGES, 4, 4, 1), np.uint8)), 1, EvaluateError,
         ("{tmp}/samples/ddim-2/seed0: expected shape (N, 1, 8, 8), found (8, 1, 4, 4)",), absent=EVAL_OUT),
    Case("evaluate-samples-wrong-range", "evaluate",
         evaluate_case(np.full((N_IMAGES, 1, 8, 8), 255.0, np.float32)), 1, EvaluateError,
         ("{tmp}/samples/ddim-2/seed0: expected values in [-1, 1], found min 255",), absent=EVAL_OUT),
    Case("evaluate-samples-wrong-dtype", "evaluate",
         evaluate_case(np.zeros((N_IMAGES, 1, 8, 8), np.int32)), 1, EvaluateError,
         ("{tmp}/samples/ddim-2/seed0: expected a floating-point dtype, found int32",), absent=EVAL_OUT),
    Case("evaluate-inception-weights-of-another-network", "evaluate",
         evaluate_case(inception_weights=classifier_weights), 1, EvaluateError,
         ("{tmp}/inception.pth: not pytorch-fid's FID Inception weights",), absent=EVAL_OUT),
    Case("evaluate-inception-weights-missing", "evaluate",
         evaluate_case(inception_weights=lambda ctx: str(ctx.tmp / "missing.pth")), 1, EvaluateError,
         ("evaluate.inception_weights: ", "{tmp}/missing.pth not found"), absent=EVAL_OUT),
    # -- cluster --------------------------------------------------------------------------------------------
    Case("cluster-ray-address-unreachable", "train", closed_port_address, 1, RuntimeSetupError,
         ("ray.address 127.0.0.1:{port}: no Ray cluster answers there",), process=True, seconds=60),
    Case("cluster-mlflow-server-unreachable", "train", closed_port_tracking, 1, TrackingError,
         ("mlflow.tracking_uri http://127.0.0.1:{port}: no server answers",), seconds=10),
    Case("cluster-mlflow-server-unreachable-evaluate", "evaluate", evaluate_case(mlflow=True), 1, EvaluateError,
         ("mlflow.tracking_uri http://127.0.0.1:{port}: no server answers",), absent=EVAL_OUT, seconds=10),
    Case("cluster-local-store-with-two-nodes", "train", two_node_cluster, 1, TrackingError,
         ("mlflow.tracking_uri 'sqlite:///{tmp}/mlflow.db' is a local store, but the Ray cluster has 2 nodes",)),
    Case("cluster-gpu-without-gpu", "train", gpu_wanted, 1, TrainingError,
         ("ray.use_gpu is true but the Ray cluster has no GPU",)),
]


def test_the_table_covers_at_least_25_cases():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, request, capsys):
    ctx = Ctx(tmp_path, request)
    try:
        argv = case.build(ctx)
        capsys.readouterr()
        tick = time.monotonic()
        raised = None
        if case.process:
            code, raised_name, err = run_stage_process(case.stage, argv, tmp_path)
        else:
            code, raised = run_stage(case.stage, argv)
            err = capsys.readouterr().err
            raised_name = "" if raised is None else type(raised).__name__
        seconds = time.monotonic() - tick
    finally:
        for undo in ctx.cleanup:
            undo()

    assert code == case.code, err
    assert raised_name == ("" if case.error is None else case.error.__name__), err
    assert err.strip() and "Traceback" not in err, err
    if raised is not None and not isinstance(raised, ConfigError):  # ConfigError lists every problem, one a line
        assert len(str(raised).strip().splitlines()) == 1, str(raised)
    first = err.splitlines()[0]
    for name in case.names:
        assert name.format(tmp=tmp_path, **ctx.vars) in first, first
    if case.seconds is not None:
        assert seconds < case.seconds, f"took {seconds:.1f}s"
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), f"{rel} left behind"
    for rel in case.empty:
        assert not (tmp_path / rel).exists() or not any((tmp_path / rel).iterdir()), f"{rel} not empty"


if __name__ == "__main__":  # run_stage_process: python tests/test_bad_inputs.py STAGE ARGV...
    code, raised = run_stage(sys.argv[1], sys.argv[2:])
    if raised is not None:
        Path(os.environ["SCORELAB_BAD_INPUT_RAISED"]).write_text(type(raised).__name__)
    sys.exit(code)
