"""Training through a real Ray Train run on 2 CPU workers, tracked in a real MLflow store.

One local Ray session serves the module (its start-up is the slow part); each test prepares data
into its own folder and trains into its own storage, MLflow store and output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from scorelab.config import parse_params
from scorelab.data import prepare
from scorelab.metrics import sliced_wasserstein
from scorelab.sampling import sample
from scorelab.checkpoint import CheckpointMismatchError, load_state, load_trained, save_state
from scorelab.runtime import bf16_problem
from scorelab.training import TrainingError, config_hash, learning_rate, micro_batch, train_variant

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "ddpm": {"sde": {"type": "ddpm", "num_steps": 100}, "parameterization": {"type": "eps"},
             "samplers": [{"method": "ddim", "steps": [10]}]},
    "ncsn": {"sde": {"type": "ncsn", "sigma_min": 0.01, "sigma_max": 8.0, "num_scales": 20},
             "parameterization": {"type": "score", "scale_by_sigma": True},
             "samplers": [{"method": "ald", "steps_each": 5}]},
    "vp": {"sde": {"type": "vp"}, "parameterization": {"type": "eps"},
           "samplers": [{"method": "dpm_solver", "steps": [10]}]},
    "subvp": {"sde": {"type": "subvp"}, "parameterization": {"type": "eps"},
              "samplers": [{"method": "dpm_solver", "steps": [10]}]},
    "ve": {"sde": {"type": "ve", "sigma_max": 8.0}, "parameterization": {"type": "edm"},
           "samplers": [{"method": "heun", "steps": [10]}]},
}


def make_params(tmp: Path, source: str, variants: dict, train: dict, ray: dict | None = None, **extra) -> dict:
    data = {"source": source, "out_dir": str(tmp / "data")}
    if source == "toy2d":
        data["toy"] = {"kind": "gaussian_mixture", "n_train": 2000, "n_test": 500}
    return {
        "seed": 0,
        "data": data,
        "train": {"log_every": 5, "checkpoint_every": 10, "warmup_steps": 0, **train},
        "ray": {"num_workers": 2, "storage_path": str(tmp / "ray"), "max_failures": 1, **(ray or {})},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "variants": variants,
        **extra,
    }


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


def run(params_dict: dict, tmp: Path, variant: str):
    params = parse_params(params_dict)
    data_dir = params.data.dataset_dir
    if not (data_dir / "manifest.json").exists():
        prepare(params.data, params.seed)
    return params, train_variant(params, variant, root=tmp, data_dir=data_dir, out_dir=tmp / "out" / variant)


def mlflow_runs(tmp: Path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return c, [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]


# -- every variant, a few steps, on toy and digits data --------------------------------------------


@pytest.mark.parametrize("source", ["toy2d", "digits"])
def test_every_variant_trains_and_is_tracked(ray_local, tmp_path, source):
    variants = dict(VARIANTS)
    if source == "digits":  # a small U-Net keeps this quick
        net = {"type": "unet", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
               "attn_resolutions": [], "dropout": 0.0}
        variants = {k: {**v, "net": net} for k, v in variants.items()}
    p = make_params(tmp_path, source, variants, {"steps": 6, "batch_size": 16, "checkpoint_every": 3,
                                                "log_every": 3, "sample_every": 3})
    for name in variants:
        params, result = run(p, tmp_path, name)
        assert result.steps == 6
        trained = load_trained(result.model_path)
        assert trained.step == 6 and trained.variant.sde.type == variants[name]["sde"]["type"]
        x = torch.zeros(2, *trained.data_shape)
        assert torch.isfinite(trained.model(x, torch.full((2,), 0.5))).all()
        assert (tmp_path / "out" / name / "samples_final.png").stat().st_size > 1000

    client, runs = mlflow_runs(tmp_path)
    assert sorted(r.data.tags["variant"] for r in runs) == sorted(variants)
    for r in runs:
        assert r.info.status == "FINISHED"
        assert {"sde", "parameterization", "git_commit", "dataset_checksum"} <= set(r.data.tags)
        assert r.data.params["train.batch_size"] == "16"
        history = client.get_metric_history(r.info.run_id, "loss")
        assert [m.step for m in history] == [3, 6]
        assert {"lr", "grad_norm", "images_per_s"} <= set(r.data.metrics)
        assert any(k.startswith("loss_") for k in r.data.metrics)  # loss per noise-level bin
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id, "model")}
        assert {"model/model.pt", "model/config.json"} <= artifacts
        grids = {a.path for a in client.list_artifacts(r.info.run_id, "samples")}
        assert {"samples/samples_step0000003.png", "samples/samples_final.png"} <= grids


def test_toy_training_learns_the_data(ray_local, tmp_path):
    """A longer run: the loss falls and samples move from the prior towards the data."""
    variants = {"vp": {**VARIANTS["vp"], "net": {"type": "mlp", "hidden": 128, "layers": 3},
                       "ema": {"decay": 0.99}}}
    p = make_params(tmp_path, "toy2d", variants, {"steps": 400, "batch_size": 256, "lr": 3e-3, "warmup_steps": 20,
                                                  "lr_schedule": "cosine", "final_lr_fraction": 0.1,
                                                  "checkpoint_every": 200, "log_every": 50})
    params, result = run(p, tmp_path, "vp")
    client, runs = mlflow_runs(tmp_path)
    losses = [m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert losses[-1] < 0.8 * losses[0], losses
    # the loop steps with the schedule: the lr logged at step s is the one of its last optimizer step, s - 1
    lrs = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "lr")}
    assert sorted(lrs) == list(range(50, 401, 50))
    assert all(v == pytest.approx(learning_rate(params.train, s - 1), rel=1e-12) for s, v in lrs.items())
    assert lrs[400] < 0.11 * 3e-3 < lrs[50]

    trained = load_trained(result.model_path)
    from scorelab.data import load_manifest, read_split

    data = read_split(params.data.dataset_dir, "test")
    with torch.no_grad():
        x = sample(trained.model, trained.model.sde, (2000, 2), method="dpm_solver", steps=20, seed=1).x
    prior = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    sw_model, sw_prior = sliced_wasserstein(x, data), sliced_wasserstein(prior, data)
    assert sw_model < 0.5 * sw_prior, (sw_model, sw_prior)
    assert load_manifest(params.data.dataset_dir).gaussian_mixture().log_prob(x).mean() > -6


def test_bf16_autocast_trains_the_same_network_on_this_cpu_or_is_refused_by_name(ray_local, tmp_path):
    net = {"type": "unet", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
           "dropout": 0.0}
    variants = {"vp": {**VARIANTS["vp"], "net": net}}
    train = {"steps": 4, "batch_size": 16, "checkpoint_every": 4, "log_every": 2}
    _, fp32 = run(make_params(tmp_path / "a", "digits", variants, train), tmp_path / "a", "vp")
    problem = bf16_problem(torch.device("cpu"))
    _, auto = run(make_params(tmp_path / "b", "digits", variants, {**train, "bf16": "auto"}), tmp_path / "b", "vp")
    client, runs = mlflow_runs(tmp_path / "b")
    assert runs[0].data.tags["bf16"] == str(problem is None)  # what auto chose on the worker, in MLflow
    a, b = load_trained(fp32.model_path).model.state_dict(), load_trained(auto.model_path).model.state_dict()
    gap = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    if problem:  # auto ran float32 here, bit for bit; true is refused, not emulated slowly
        assert gap == 0
        with pytest.raises(TrainingError, match="train.bf16 is true but"):
            run(make_params(tmp_path / "c", "digits", variants, {**train, "bf16": True}), tmp_path / "c", "vp")
        return
    # bfloat16 gradients (other bits), yet Adam's 4 steps of at most lr = 1e-3 each from the same start
    assert 0 < gap < 8e-3, gap
    assert all(b[k].dtype == a[k].dtype for k in a)  # the weights stay float32


# -- resuming, refusing, stopping ---------------------------------------------------------------


def test_rerun_resumes_the_same_run_and_changed_config_starts_fresh(ray_local, tmp_path):
    p = make_params(tmp_path, "toy2d", {"vp": VARIANTS["vp"]}, {"steps": 10, "batch_size": 16})
    _, first = run(p, tmp_path, "vp")
    p["train"]["steps"] = 20  # a longer run of a *different* configuration (steps is part of it)
    _, second = run(p, tmp_path, "vp")
    assert second.run_id != first.run_id
    _, third = run(p, tmp_path, "vp")  # same configuration again: the same MLflow run, already done
    assert third.run_id == second.run_id and third.steps == 20
    _, runs = mlflow_runs(tmp_path)
    assert len(runs) == 2


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    save_state(tmp_path, model={}, ema={}, optimizer={}, step=5, config_hash="a" * 64, run_id="r", rng={})
    assert load_state(tmp_path, "a" * 64)["step"] == 5
    with pytest.raises(CheckpointMismatchError, match="written for configuration aaaaaaaaaaaa"):
        load_state(tmp_path, "b" * 64)
    data = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError, match="unreadable"):
        load_state(tmp_path, "a" * 64)


def test_config_hash_ignores_workers_and_cadence_but_not_the_math():
    base = make_params(Path("/tmp/x"), "toy2d", {"vp": VARIANTS["vp"]}, {"steps": 10, "batch_size": 16})
    h = config_hash(parse_params(base), "vp", "abc")
    assert h == config_hash(parse_params({**base, "ray": {**base["ray"], "num_workers": 1}}), "vp", "abc")
    assert h == config_hash(parse_params({**base, "train": {**base["train"], "log_every": 7}}), "vp", "abc")
    assert h != config_hash(parse_params({**base, "train": {**base["train"], "lr": 0.5}}), "vp", "abc")
    assert h != config_hash(parse_params(base), "vp", "abd")


def test_batch_that_does_not_divide_over_workers_is_refused():
    from scorelab.config import ConfigError, TrainConfig

    with pytest.raises(TrainingError, match="not a multiple"):
        micro_batch(TrainConfig(batch_size=10, micro_batch_size=4), 2)
    with pytest.raises(TrainingError, match="smaller than ray.num_workers"):
        micro_batch(TrainConfig(batch_size=1), 2)
    assert micro_batch(TrainConfig(batch_size=64, micro_batch_size=8), 2) == (8, 4)
    assert micro_batch(TrainConfig(batch_size=64), 2) == (32, 1)
    # params.yaml is refused at load time, naming the field
    bad = make_params(Path("/tmp/x"), "toy2d", {"vp": VARIANTS["vp"]}, {"batch_size": 1})
    with pytest.raises(ConfigError, match=r"train.batch_size: must be >= ray.num_workers \(2\)"):
        parse_params(bad)


def _poison_training_rows(data_dir: Path) -> None:
    """Write NaNs into some training rows and re-sign the manifest, as a broken upstream source would."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from scorelab.data import MANIFEST_DIGEST_KEY, manifest_sha256, overall_checksum
    from scorelab.storage import sha256_file

    manifest_path = data_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = next(s for s in manifest["shards"] if s["split"] == "train")
    path = data_dir / shard["file"]
    table = pq.read_table(path)
    x0 = table.column("x0").to_numpy().copy()
    x0[::100] = float("nan")  # a few bad rows: one is drawn within the first dozen steps
    table = table.set_column(table.schema.get_field_index("x0"), "x0", pc.cast(x0, table.schema.field("x0").type))
    pq.write_table(table, path)
    shard["sha256"] = sha256_file(path)
    manifest["checksum"] = overall_checksum(s["sha256"] for s in manifest["shards"])
    manifest[MANIFEST_DIGEST_KEY] = manifest_sha256(manifest)
    manifest_path.write_text(json.dumps(manifest))


def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(ray_local, tmp_path):
    p = make_params(tmp_path, "toy2d", {"vp": VARIANTS["vp"]},
                    {"steps": 400, "batch_size": 16, "checkpoint_every": 2}, ray={"max_failures": 0})
    params = parse_params(p)
    prepare(params.data, params.seed)
    _poison_training_rows(params.data.dataset_dir)
    with pytest.raises(TrainingError, match=r"stopped at step \d+: non-finite loss"):
        run(p, tmp_path, "vp")
    assert not (tmp_path / "out" / "vp" / "model.pt").exists()
    steps = [int(torch.load(c, weights_only=True)["step"]) for c in (tmp_path / "ray").rglob("state.pt")]
    assert steps and max(steps) < 400, "the last good checkpoint is kept"
    _, runs = mlflow_runs(tmp_path)
    assert runs[0].info.status == "FAILED"


# -- faults injected for real ------------------------------------------------------------------


def _wait_for_registered_checkpoint(storage: Path, timeout: float = 240) -> int:
    """The step of the first checkpoint Ray Train has registered (its snapshot names it), or 0.
    A checkpoint on disk is not enough: one written just before a crash may not be registered yet."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for snapshot in storage.rglob("checkpoint_manager_snapshot.json"):
            try:
                latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
            except ValueError:  # being written
                continue
            if latest:
                return int(latest["metrics"]["step"])
        time.sleep(0.1)
    return 0


def _train_worker_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


def test_killed_worker_resumes_from_checkpoint_with_one_mlflow_run(ray_local, tmp_path):
    variants = {"vp": {**VARIANTS["vp"], "net": {"type": "mlp", "hidden": 512, "layers": 4}}}
    p = make_params(tmp_path, "toy2d", variants, {"steps": 600, "batch_size": 256, "checkpoint_every": 20,
                                                  "log_every": 20}, ray={"max_failures": 2})
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = run(p, tmp_path, "vp")[1]
        except BaseException as e:  # surfaced below
            outcome["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    registered = _wait_for_registered_checkpoint(tmp_path / "ray")
    assert 0 < registered < 600, "no checkpoint registered before the end"
    pids = _train_worker_pids()
    assert pids, "no Ray Train worker process found"
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.steps == 600
    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert int(runs[0].data.tags["resumed_from_step"]) >= registered, "the workers were not restarted from a checkpoint"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert sorted(steps) == list(range(20, 601, 20))  # one continuous curve: the redone steps' points not twice


def test_killed_driver_rerun_resumes(tmp_path):
    """The stage process dies (SIGKILL) after a checkpoint; running the stage again resumes from it."""
    variants = {"vp": {**VARIANTS["vp"], "net": {"type": "mlp", "hidden": 256, "layers": 4}}}
    p = make_params(tmp_path, "toy2d", variants, {"steps": 300, "batch_size": 256, "checkpoint_every": 20,
                                                  "log_every": 20})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(p, sort_keys=False))
    prepare(parse_params(p).data, 0)
    cmd = [sys.executable, str(REPO / "pipeline" / "train.py"), "--params", str(params_file), "--variant", "vp",
           "--root", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    assert _wait_for_registered_checkpoint(tmp_path / "ray"), "no checkpoint registered"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    done = [int(torch.load(s, weights_only=True)["step"]) for s in (tmp_path / "ray").rglob("state.pt")]
    assert done and max(done) < 300

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    metrics = json.loads((tmp_path / "outputs" / "train" / "vp" / "metrics.json").read_text())
    assert metrics["steps"] == 300
    first_step_logged = min(int(line.split("step ")[1].split("/")[0])
                            for line in second.stdout.splitlines() if "] step " in line)
    assert first_step_logged > 20, "the rerun started over instead of resuming"
    _, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1


def test_same_params_and_seed_give_bit_identical_weights_and_checkpoints(ray_local, tmp_path):
    """Two fresh runs of one configuration (separate storage, data and MLflow store) on CPU: the exported
    EMA weights and the final checkpoint's model and optimizer state are equal bit for bit."""
    states = []
    for k in range(2):
        tmp = tmp_path / f"run{k}"
        p = make_params(tmp, "toy2d", {"vp": VARIANTS["vp"]}, {"steps": 12, "batch_size": 32,
                                                                 "checkpoint_every": 6})
        _, result = run(p, tmp, "vp")
        trained = torch.load(result.model_path, map_location="cpu", weights_only=True)
        ckpts = sorted((tmp / "ray").glob("vp-*/checkpoint_*/state.pt"))
        final = [s for s in (torch.load(c, map_location="cpu", weights_only=True) for c in ckpts) if s["step"] == 12]
        assert final, f"no step-12 checkpoint among {ckpts}"
        states.append((trained, final[0]))
    (model_a, ckpt_a), (model_b, ckpt_b) = states
    for key in ("model", "ema", "optimizer"):
        assert _state_equal(ckpt_a[key], ckpt_b[key]), f"checkpoint {key} differs between runs"
    assert model_a["weights"].keys() == model_b["weights"].keys()
    for name, tensor in model_a["weights"].items():
        assert torch.equal(tensor, model_b["weights"][name]), f"model.pt {name} differs between runs"


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_state_equal, a, b))
    return a == b


def test_stopped_and_resumed_run_equals_an_uninterrupted_one_bit_for_bit(ray_local, tmp_path):
    """A U-Net with dropout (its masks come from the global generator) on 2 workers: stopped at its first
    checkpoint through the stop file in its storage, then relaunched, it ends with the same model, EMA and
    optimizer state as an uninterrupted run, bit for bit. A checkpoint folder no launch registered (as a
    killed launch leaves) is removed when the run finishes; the registered ones stay."""
    from scorelab.training import STOP_FILE

    net = {"type": "unet", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
           "dropout": 0.3}
    variants = {"vp": {**VARIANTS["vp"], "net": net}}
    train = {"steps": 24, "batch_size": 32, "checkpoint_every": 8, "log_every": 8}
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = make_params(straight_dir, "digits", variants, train)
    resumed = make_params(resumed_dir, "digits", variants, train)
    resumed["data"]["out_dir"] = straight["data"]["out_dir"]
    run(straight, straight_dir, "vp")

    def request_stop():
        deadline = time.time() + 240
        while not list((resumed_dir / "ray").glob("vp-*/checkpoint_*/")) and time.time() < deadline:
            time.sleep(0.02)
        for run_dir in (resumed_dir / "ray").glob("vp-*"):
            (run_dir / STOP_FILE).write_text("{}")

    stopper = threading.Thread(target=request_stop)
    stopper.start()
    with pytest.raises(TrainingError, match=r"stopped by SIGTERM at step (\d+) of 24"):
        run(resumed, resumed_dir, "vp")
    stopper.join()
    kept = sorted((resumed_dir / "ray").glob("vp-*/checkpoint_*/"))
    orphan = kept[-1].with_name("checkpoint_2000-01-01_00-00-00.000000")  # Ray's naming, never registered
    shutil.copytree(kept[-1], orphan)
    _, result = run(resumed, resumed_dir, "vp")
    assert result.steps == 24

    def final(root: Path) -> dict:
        states = [torch.load(c, map_location="cpu", weights_only=True) for c in (root / "ray").rglob("state.pt")]
        return next(s for s in states if s["step"] == 24)

    a, b = final(straight_dir), final(resumed_dir)
    for key in ("model", "ema", "optimizer"):
        assert _state_equal(a[key], b[key]), f"{key} of the resumed run differs from the uninterrupted run"
    assert not orphan.exists(), "the unregistered checkpoint folder was left"
    left = sorted((resumed_dir / "ray").glob("vp-*/checkpoint_*/"))
    assert 1 <= len(left) <= 2 and all((c / "state.pt").is_file() for c in left)  # CheckpointConfig(num_to_keep=2)


def test_background_metrics_land_on_flush_and_failed_batches_are_resent_then_reported(tmp_path, capsys):
    from scorelab import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id = client.create_run(client.create_experiment("background")).info.run_id
    logger = tracking.RunLogger(uri, run_id)
    for step in range(1, 6):
        logger.metrics({"loss": 1.0 / step}, step=step, background=True)
    logger.flush()
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == \
        [(k, 1.0 / k) for k in range(1, 6)]
    assert logger.dropped == 0

    lost = tracking.RunLogger(uri, "0" * 32, retries=2, backoff=0.01)  # no such run: every try fails
    lost.metrics({"loss": 1.0}, step=7, background=True)
    lost.flush()
    err = capsys.readouterr().err
    assert lost.dropped == 1
    assert "1 metric batch(es) logged in the background failed (steps 7" in err and "giving up" in err


# -- restoring onto a device ---------------------------------------------------------------------


def _moments_off_their_parameter(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Optimizer state tensors that do not live on the device of the model parameter they belong to (the
    optimizer's parameters, in order, are the model's). Adam's `step` counter is a CPU scalar by torch's
    design unless the optimizer is fused or capturable: only then is it checked."""
    fused = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    tracked = [p for g in optimizer.param_groups for p in g["params"]]
    return [f"{name} on {value.device}, parameter on {p.device}"
            for p, q in zip(model.parameters(), tracked, strict=True)
            for name, value in optimizer.state[q].items()
            if torch.is_tensor(value) and value.device != p.device and (name != "step" or fused)]


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_restore_onto_another_device_puts_every_optimizer_moment_on_its_parameters_device():
    """The order a GPU resume needs, proven on the CPU with the meta device: a checkpoint written on one
    device and restored for training on another has its Adam moments on the parameters' device. The old
    order (optimizer and restore on the CPU, then the model moved) leaves them behind, as the check shows."""
    from scorelab.config import TrainConfig, VariantConfig
    from scorelab.training import training_state

    variant = VariantConfig.model_validate({**VARIANTS["vp"], "net": {"type": "mlp", "hidden": 16, "layers": 2}})
    train = TrainConfig.model_validate({"steps": 10, "batch_size": 8, "lr": 1e-3})
    torch.manual_seed(0)
    written = training_state(variant, (2,), train, torch.device("cpu"))
    for _ in range(3):  # a few real steps, so that Adam has moments to restore
        written.optimizer.zero_grad()
        written.model(torch.randn(8, 2), torch.rand(8)).square().mean().backward()
        written.optimizer.step()
        written.ema.update(written.model)
    state = {"model": written.model.state_dict(), "ema": written.ema.state_dict(),
             "optimizer": written.optimizer.state_dict(), "step": 3}

    meta = torch.device("meta")
    restored = training_state(variant, (2,), train, meta, state)
    assert restored.step == 3
    assert {p.device for p in restored.model.parameters()} == {meta}
    assert {p.device for p in restored.ema.module.parameters()} == {meta}
    assert len(restored.optimizer.state) == len(list(restored.model.parameters()))
    assert _moments_off_their_parameter(restored.model, restored.optimizer) == []
    assert all(p is q for p, q in zip(restored.model.parameters(), restored.optimizer.param_groups[0]["params"]))

    # today's order before the fix: the moments stay on the CPU, and the first GPU step would fail
    from scorelab.checkpoint import build_model

    old = build_model(variant, (2,))
    optimizer = torch.optim.Adam(old.parameters(), lr=train.lr, fused=True)
    optimizer.load_state_dict(state["optimizer"])
    old.to(meta)
    off = _moments_off_their_parameter(old, optimizer)
    assert off and all("on cpu, parameter on meta" in o for o in off), off


# -- EMA profiles chosen after training -----------------------------------------------------------


def test_ema_profiles_are_scored_at_the_end_and_the_best_is_exported(ray_local, tmp_path):
    """Two power EMA profiles beside the classic EMA: the last step scores all three with the objective,
    metrics.json and the MLflow run carry the scores, and model.pt holds the argmin's weights as the last
    checkpoint has them."""
    variants = {"vp": {**VARIANTS["vp"], "ema": {"decay": 0.9, "profiles": [0.05, 0.2],
                                                 "select": {"n_samples": 64, "seeds": 2}}}}
    p = make_params(tmp_path, "toy2d", variants, {"steps": 12, "batch_size": 32, "checkpoint_every": 6})
    _, result = run(p, tmp_path, "vp")
    metrics = json.loads((tmp_path / "out" / "vp" / "metrics.json").read_text())
    scores = metrics["ema_scores"]
    assert list(scores) == ["ema-0.9", "power-0.05", "power-0.20"]
    assert all(len(v) == 2 and v[0] > 0 and v[1] > 0 for v in scores.values()), scores
    assert len({v[0] for v in scores.values()}) == 3, scores  # three different averages, scored apart
    chosen = metrics["ema_chosen"]
    assert chosen == min(scores, key=lambda k: scores[k][0])

    states = {s["step"]: s for s in (torch.load(c, map_location="cpu", weights_only=True)
                                     for c in (tmp_path / "ray").glob("vp-*/checkpoint_*/state.pt"))}
    assert set(states[6]["ema_profiles"]) == {"power-0.05", "power-0.20"} and "ema_selection" not in states[6]
    last = states[12]
    assert last["ema_selection"]["chosen"] == chosen and last["ema_selection"]["scores"] == scores
    source = last["ema"] if chosen == "ema-0.9" else last["ema_profiles"][chosen]
    model = torch.load(result.model_path, map_location="cpu", weights_only=True)
    assert model["ema"] == chosen and load_trained(result.model_path).ema == chosen
    assert model["weights"].keys() == {k[len("module."):] for k in source if k.startswith("module.")}
    for name, tensor in model["weights"].items():
        assert torch.equal(tensor, source[f"module.{name}"]), name
    others = [last["ema"]] + list(last["ema_profiles"].values())
    assert sum(all(torch.equal(t, s[f"module.{n}"]) for n, t in model["weights"].items()) for s in others) == 1

    client, runs = mlflow_runs(tmp_path)
    (r,) = runs
    assert r.data.tags["scorelab.ema_chosen"] == chosen
    for name, (mean, se) in scores.items():
        assert r.data.metrics[f"ema_{name}"] == pytest.approx(mean)
        assert r.data.metrics[f"ema_{name}_se"] == pytest.approx(se)


def test_a_restored_training_state_continues_its_ema_profiles_exactly():
    """training_state restores every power EMA from the checkpoint's ema_profiles: continued, they equal the
    profiles of the state that was never written, bit for bit; a checkpoint without them is refused."""
    from scorelab.config import TrainConfig, VariantConfig
    from scorelab.training import training_state

    variant = VariantConfig.model_validate({**VARIANTS["vp"], "net": {"type": "mlp", "hidden": 16, "layers": 2},
                                            "ema": {"profiles": [0.05, 0.2]}})
    train = TrainConfig.model_validate({"steps": 10, "batch_size": 8, "lr": 1e-2})
    cpu = torch.device("cpu")

    def step(ts, k: int) -> None:
        ts.optimizer.zero_grad()
        g = torch.Generator().manual_seed(k)
        # against 1, not 0: the output layer starts at zero, where a square loss has no gradient at all
        (ts.model(torch.randn(8, 2, generator=g), torch.rand(8, generator=g)) - 1).square().mean().backward()
        ts.optimizer.step()
        ts.ema.update(ts.model)
        for p in ts.profiles.values():
            p.update(ts.model)

    torch.manual_seed(0)
    straight = training_state(variant, (2,), train, cpu)
    assert list(straight.profiles) == ["power-0.05", "power-0.20"]
    for k in range(4):
        step(straight, k)
    state = {"model": straight.model.state_dict(), "ema": straight.ema.state_dict(),
             "optimizer": straight.optimizer.state_dict(), "step": 4,
             "ema_profiles": {n: p.state_dict() for n, p in straight.profiles.items()}}
    state = {k: (v if k == "step" else _clone(v)) for k, v in state.items()}
    torch.manual_seed(1)  # other initial weights: everything must come from the state
    resumed = training_state(variant, (2,), train, cpu, state)
    for k in range(4, 9):
        step(straight, k)
        step(resumed, k)
    for name, profile in straight.profiles.items():
        assert resumed.profiles[name].num_updates == 9
        assert _state_equal(profile.state_dict(), resumed.profiles[name].state_dict()), name
    assert not _state_equal(straight.profiles["power-0.05"].state_dict(), straight.ema.state_dict())

    with pytest.raises(CheckpointMismatchError, match="cannot be resumed"):
        training_state(variant, (2,), train, cpu, {k: v for k, v in state.items() if k != "ema_profiles"})


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    return tree
