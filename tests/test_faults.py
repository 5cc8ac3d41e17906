"""Faults injected for real, each ending in a resumed run or a clear refusal.

- preemption: SIGTERM to the training stage's driver process;
- a checkpoint or model write killed midway, and truncated or altered checkpoint and model files;
- `dvc repro` killed in the middle of the train stage (SIGKILL) and of the sample stage (SIGINT);
- the MLflow tracking server killed and restarted on the same port and store during training;
- a Ray worker node removed during training.

Each test prints what the fault cost (steps since the last checkpoint, metrics) and the time to recover;
`pytest -s tests/test_faults.py` shows the lines, prefixed with "fault:".
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from scorelab.config import VariantConfig, parse_params
from scorelab.data import prepare
from scorelab.checkpoint import (
    STATE_FILE,
    CheckpointCorruptError,
    build_model,
    export_model,
    load_state,
    load_trained,
    save_state,
)
from scorelab.training import STOP_FILE

sys.path.insert(0, str(Path(__file__).parent))
from conftest import wait_for_mlflow  # noqa: E402
from test_dvc import TINY, tiny_repo  # noqa: E402
from test_training import VARIANTS, _wait_for_registered_checkpoint, make_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def report(line: str) -> None:
    print(f"fault: {line}")


def _progress(log: Path) -> int:
    """The last step a training log's progress lines name ("[vp] step 120/3000 | ...")."""
    found = re.findall(r"\] step (\d+)/", log.read_text())
    return int(found[-1]) if found else 0


def train_cmd(params_file: Path, root: Path, variant: str = "vp") -> list[str]:
    return [sys.executable, str(REPO / "pipeline" / "train.py"), "--params", str(params_file), "--variant", variant,
            "--root", str(root)]


def write_params(tmp: Path, p: dict) -> Path:
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    prepare(parse_params(p).data, p["seed"])
    return path


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal a process started with start_new_session=True and everything it started (its local Ray)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def runs_in(uri: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    return c, [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]


def logged_steps(client, run_id: str, key: str = "loss") -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


# -- 1. preemption ------------------------------------------------------------------------------


def test_sigterm_checkpoints_the_current_step_and_the_rerun_resumes_there(tmp_path):
    """SIGTERM to the driver: the workers checkpoint the step they are at, the stage exits 143 with one
    line naming that step; the rerun resumes from exactly that step, in the same MLflow run. The storage is
    given as a URI (file://, as s3:// or gs:// would be): the stop request and the outcome travel through it,
    not through the driver's disk, which workers on other machines would not see."""
    steps, every = 3000, 1000
    p = make_params(tmp_path, "toy2d", {"vp": {**VARIANTS["vp"], "net": TINY}},
                    {"steps": steps, "batch_size": 64, "checkpoint_every": every, "log_every": 10},
                    ray={"storage_path": (tmp_path / "ray").as_uri()})
    cmd = train_cmd(write_params(tmp_path, p), tmp_path)
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(out, "w") as fo, open(err, "w") as fe:  # files: a full pipe would stall the driver
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, start_new_session=True)
    try:
        registered = _wait_for_registered_checkpoint(tmp_path / "ray")
        assert registered, "no checkpoint registered"
        # and some steps past it, so that the checkpoint SIGTERM asks for is not one of the regular ones
        assert _wait_until(lambda: _progress(out) >= registered + 20, proc, 120), out.read_text()[-3000:]
        sent = time.time()
        proc.send_signal(signal.SIGTERM)  # the driver alone, as a scheduler preempting the job would
        proc.wait(timeout=180)
        stop_s = time.time() - sent
    finally:
        kill_group(proc)
    assert proc.returncode == 143, out.read_text()[-3000:] + err.read_text()[-3000:]
    said = [line for line in err.read_text().splitlines() if line.startswith("train vp: training")]
    assert len(said) == 1, err.read_text()[-3000:]
    m = re.fullmatch(rf"train vp: training 'vp' stopped by SIGTERM at step (\d+) of {steps}, after checkpointing "
                     r"that step in .* \(no steps lost\): rerun to resume from it", said[0])
    assert m, said[0]
    stopped = int(m[1])
    assert registered + 20 <= stopped < steps and stopped % every, "an extra checkpoint, at the step reached"
    stop_file = next((tmp_path / "ray").rglob(STOP_FILE))
    seen_s = json.loads(stop_file.read_text())["time"] - sent  # SIGTERM to the stop request on disk
    on_disk = {int(load_state(s.parent, None)["step"]) for s in (tmp_path / "ray").rglob(STATE_FILE)}
    assert stopped in on_disk, (stopped, on_disk)
    assert not (tmp_path / "outputs" / "train" / "vp" / "model.pt").exists()
    assert not (tmp_path / "outputs" / "status").exists(), "nothing of the run on the driver's own disk"
    client, runs = runs_in(p["mlflow"]["tracking_uri"])
    assert len(runs) == 1 and runs[0].info.status == "KILLED"

    started = time.perf_counter()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    rerun_s = time.perf_counter() - started
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    client, runs = runs_in(p["mlflow"]["tracking_uri"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", "the rerun continues the same MLflow run"
    assert int(runs[0].data.tags["resumed_from_step"]) == stopped > 0
    assert load_trained(tmp_path / "outputs" / "train" / "vp" / "model.pt").step == steps
    logged = logged_steps(client, runs[0].info.run_id)
    assert logged == list(range(10, steps + 1, 10)), "one loss point per log step: none lost, none twice"
    report(f"preemption: SIGTERM after step {registered + 20} (regular checkpoints every {every}) handled in "
           f"{seen_s:.2f}s; the workers checkpointed step {stopped} and the stage exited {stop_s:.1f}s after the "
           "signal; "
           f"0 steps and 0 metric points lost; rerun resumed at step {stopped} and finished "
           f"{steps - stopped} steps in {rerun_s:.1f}s (incl. Ray start-up)")


def test_second_sigterm_exits_at_once_keeping_the_registered_checkpoint(tmp_path):
    """A scheduler that follows SIGTERM with another (or an impatient user): the driver exits 143 at once,
    saying so, without waiting for the workers; the registered checkpoint stays and the rerun resumes."""
    # steps of about a second, so that the workers are still at work when the second signal comes
    p = make_params(tmp_path, "toy2d", {"vp": {**VARIANTS["vp"], "net": {"type": "mlp", "hidden": 1024, "layers": 4}}},
                    {"steps": 100000, "batch_size": 2000, "checkpoint_every": 2, "log_every": 1})
    cmd = train_cmd(write_params(tmp_path, p), tmp_path)
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, start_new_session=True)
    try:
        registered = _wait_for_registered_checkpoint(tmp_path / "ray")
        assert registered, out.read_text()[-3000:]
        first = time.time()
        proc.send_signal(signal.SIGTERM)
        # once the first is handled (two signals pending at once are one to Python)
        assert _wait_until(lambda: "SIGTERM: asking" in err.read_text(), proc, 60), err.read_text()[-3000:]
        handled_s = time.time() - first
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        exit_s = time.time() - sent
    finally:
        kill_group(proc)
    assert proc.returncode == 143, err.read_text()[-3000:]
    assert "second SIGTERM: exiting now" in err.read_text(), err.read_text()[-3000:]
    assert "stopped by SIGTERM at step" not in err.read_text(), "it waited for the workers' checkpoint"
    on_disk = {int(load_state(s.parent, None)["step"]) for s in (tmp_path / "ray").rglob(STATE_FILE)}
    # every kept checkpoint loads whole; Ray keeps the last 2 registered, which may have moved past the one seen
    # before the signals (its controller collects reports every 0.25 s: scorelab.runtime.TRAIN_POLL_S)
    assert on_disk and max(on_disk) >= registered, (registered, sorted(on_disk))
    report(f"second SIGTERM: the first was handled in {handled_s:.2f}s; the driver exited 143 {exit_s:.2f}s after "
           f"the second; checkpoints kept {sorted(on_disk)}")


# -- 2. checkpoint integrity --------------------------------------------------------------------


def _state(step: int) -> dict:
    torch.manual_seed(step)
    v = VariantConfig.model_validate({**VARIANTS["vp"], "net": TINY})
    model = build_model(v, (2,))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 2), torch.rand(4)).sum().backward()
    opt.step()
    sd = model.state_dict()
    return {"model": sd, "ema": {"module." + k: t + 1 for k, t in sd.items()}, "optimizer": opt.state_dict(),
            "step": step, "config_hash": "c" * 64, "run_id": "r", "rng": {"torch": torch.get_rng_state()}}


_KILLED_WRITE = r"""
import io, os, sys, torch
from pathlib import Path
import scorelab.training as T

def dying_save(obj, f):  # the process is killed half way through writing the file
    buf = io.BytesIO()
    real_save(obj, buf)
    data = buf.getvalue()
    with open(f, "wb") as out:
        out.write(data[: len(data) // 2])
        out.flush()
        os.fsync(out.fileno())
    os._exit(9)

real_save, torch.save = torch.save, dying_save
v = T.VariantConfig.model_validate({"sde": {"type": "vp"}, "parameterization": {"type": "eps"},
                                    "net": {"type": "mlp", "hidden": 64, "layers": 2},
                                    "samplers": [{"method": "ddim", "steps": [4]}]})
sd = T.build_model(v, (2,)).state_dict()
if sys.argv[1] == "state":
    T.save_state(Path(sys.argv[2]), model=sd, ema={}, optimizer={}, step=999, config_hash="c" * 64, run_id="r", rng={})
else:
    T.export_model({"ema": {"module." + k: t for k, t in sd.items()}, "step": 999, "config_hash": "c" * 64,
                    "run_id": "r"}, v, (2,), Path(sys.argv[2]))
"""


def test_write_killed_midway_leaves_the_previous_checkpoint_and_model(tmp_path):
    """A process killed half way through writing state.pt or model.pt: the previous file loads unchanged."""
    save_state(tmp_path, **_state(5))
    v = VariantConfig.model_validate({**VARIANTS["vp"], "net": TINY})
    model_path = export_model(_state(5), v, (2,), tmp_path / "model.pt")
    before = {f: (tmp_path / f).read_bytes() for f in (STATE_FILE, "model.pt")}
    for kind, target in (("state", tmp_path), ("model", model_path)):
        died = subprocess.run([sys.executable, "-c", _KILLED_WRITE, kind, str(target)], capture_output=True,
                              text=True, timeout=120)
        assert died.returncode == 9, died.stderr
    assert (tmp_path / (STATE_FILE + ".tmp")).stat().st_size > 0, "the cut write happened (to the temporary file)"
    for f, data in before.items():
        assert (tmp_path / f).read_bytes() == data
    assert load_state(tmp_path, "c" * 64)["step"] == 5
    assert load_trained(model_path).step == 5
    save_state(tmp_path, **_state(6))  # the next write replaces the leftover temporary file
    assert load_state(tmp_path, "c" * 64)["step"] == 6 and not (tmp_path / (STATE_FILE + ".tmp")).exists()


def test_write_failing_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """The same in-process (disk full half way): the error surfaces, no temporary file stays behind."""
    save_state(tmp_path, **_state(5))
    real_save = torch.save

    def failing_save(obj, f):
        buf = io.BytesIO()
        real_save(obj, buf)
        Path(f).write_bytes(buf.getvalue()[:1000])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_state(tmp_path, **_state(6))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]
    assert load_state(tmp_path, "c" * 64)["step"] == 5


def _flip_inside(path: Path, needle: bytes) -> None:
    """Flip one byte inside the stored bytes of a tensor: the file still unpacks, its numbers changed."""
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0
    data[at + len(needle) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_truncated_or_altered_checkpoint_is_refused_naming_the_file(tmp_path):
    state = _state(5)
    path = save_state(tmp_path, **state)
    good = path.read_bytes()
    weight = next(t for t in state["model"].values() if t.numel() >= 64)

    path.write_bytes(good[: len(good) * 2 // 3])  # cut short
    with pytest.raises(CheckpointCorruptError, match=rf"checkpoint {re.escape(str(path))} is unreadable"):
        load_state(tmp_path, "c" * 64)

    path.write_bytes(good)
    _flip_inside(path, weight.numpy().tobytes())  # bit rot in the weights
    with pytest.raises(CheckpointCorruptError, match=rf"{re.escape(str(path))} is unreadable"):
        load_state(tmp_path, "c" * 64)

    blob = torch.load(io.BytesIO(good), weights_only=True)  # edited and saved again by other code
    blob["step"] = 6
    torch.save(blob, path)
    with pytest.raises(CheckpointCorruptError, match="do not match the sha256 recorded when it was written"):
        load_state(tmp_path, "c" * 64)

    path.write_bytes(good)
    assert load_state(tmp_path, "c" * 64)["step"] == 5


def test_truncated_or_altered_model_file_is_refused_naming_the_file(tmp_path):
    state = _state(5)
    v = VariantConfig.model_validate({**VARIANTS["vp"], "net": TINY})
    path = export_model(state, v, (2,), tmp_path / "model.pt")
    good = path.read_bytes()
    path.write_bytes(good[:-200])
    with pytest.raises(CheckpointCorruptError, match=rf"model file {re.escape(str(path))} is unreadable"):
        load_trained(path)
    path.write_bytes(good)
    ema_weight = next(t for k, t in state["ema"].items() if t.numel() >= 64)
    _flip_inside(path, ema_weight.numpy().tobytes())
    with pytest.raises(CheckpointCorruptError, match=rf"model file {re.escape(str(path))} is unreadable"):
        load_trained(path)
    blob = torch.load(io.BytesIO(good), weights_only=True)
    blob["weights"] = {k: t * 1.01 for k, t in blob["weights"].items()}
    torch.save(blob, path)
    with pytest.raises(CheckpointCorruptError, match="do not match the sha256"):
        load_trained(path)
    path.write_bytes(good)
    assert load_trained(path).step == 5


# -- 3. a DVC stage killed midway ---------------------------------------------------------------


def _dvc_env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def _dvc_popen(repo: Path, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "a") as f:  # a file, not a pipe: nobody reads it while the stage runs
        return subprocess.Popen([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=_dvc_env(),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=_dvc_env(),
                          capture_output=True, text=True, timeout=900)


def _locked(repo: Path) -> set[str]:
    lock = repo / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.exists() else set()


def _wait_until(predicate, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _wait_settled(folder: Path, quiet_s: float = 5, timeout: float = 60) -> None:
    """Wait until nothing under folder has changed for quiet_s seconds."""
    def state():
        return sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file())

    last, since, deadline = state(), time.time(), time.time() + timeout
    while time.time() < deadline and time.time() - since < quiet_s:
        time.sleep(0.5)
        now = state()
        if now != last:
            last, since = now, time.time()


def _registered_step(storage: Path) -> int:
    """The step of the latest checkpoint Ray Train's snapshot names as registered: a relaunch resumes from it
    or from a later one the snapshot lists as pending."""
    latest = [json.loads(p.read_text()).get("latest_checkpoint_result")
              for p in storage.rglob("checkpoint_manager_snapshot.json")]
    return max((int(x["metrics"]["step"]) for x in latest if x), default=0)


def _chunks(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("chunk-*.npz")}


def test_dvc_repro_killed_in_train_then_in_sample_resumes_to_the_uninterrupted_result(tmp_path):
    """`dvc repro sample@vp` SIGKILLed during training, then interrupted (SIGINT, as Ctrl-C) during sampling:
    neither stage is recorded as done, each rerun resumes (training from its checkpoint, sampling from its
    finished chunks), and the end result equals an uninterrupted run: the weights to float rounding, the
    samples of those weights bit for bit."""
    from scorelab.generate import load_samples

    repo, log = tmp_path / "repo", tmp_path / "dvc.log"
    steps = 600
    tiny_repo(repo, steps)
    uri = f"sqlite:///{repo / 'mlflow.db'}"

    # the train stage, SIGKILLed after its first registered checkpoint
    first = _dvc_popen(repo, log, "repro", "sample@vp")
    try:
        registered = _wait_for_registered_checkpoint(repo / "outputs" / "ray")
        assert registered, log.read_text()[-3000:]
        kill_group(first)
        first.wait(timeout=60)
    finally:
        kill_group(first)
    assert "prepare" in _locked(repo) and "train@vp" not in _locked(repo)
    status = _dvc(repo, "status", "train@vp")
    assert "train@vp" in status.stdout, status.stdout
    # Ray's workers and its Train controller outlive their raylet by a moment and may still register a checkpoint
    _wait_settled(repo / "outputs" / "ray")
    registered = _registered_step(repo / "outputs" / "ray")  # later ones on disk may not be registered yet
    on_disk = {int(load_state(s.parent, None)["step"]) for s in (repo / "outputs" / "ray").rglob(STATE_FILE)}
    client, runs = runs_in(uri)
    reached = max(logged_steps(client, runs[0].info.run_id), default=0)

    # the rerun resumes training, then the sample stage is interrupted once it has written a chunk
    started = time.perf_counter()
    second = _dvc_popen(repo, log, "repro", "sample@vp")
    samples = repo / "outputs" / "samples" / "vp"
    try:
        assert _wait_until(lambda: len(_chunks(samples)) >= 3, second, 600), log.read_text()[-3000:]
        train_rerun_s = time.perf_counter() - started
        os.killpg(second.pid, signal.SIGINT)
        try:
            second.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("dvc repro did not stop within 60 s of SIGINT")
    finally:
        kill_group(second)
    assert second.returncode != 0
    assert "train@vp" in _locked(repo) and "sample@vp" not in _locked(repo)
    assert "sample@vp" in _dvc(repo, "status", "sample@vp").stdout
    client, runs = runs_in(uri)
    checkpointed = int(runs[0].data.tags["resumed_from_step"])
    assert len(runs) == 1 and checkpointed >= registered > 0 and checkpointed in on_disk, (registered, on_disk)
    logged = logged_steps(client, runs[0].info.run_id)
    assert sorted(logged) == list(range(10, steps + 1, 10)), "every loss point once, the redone steps' included"
    kept = _chunks(samples)
    assert 3 <= len(kept) < 2 * 2 * 40, "interrupted midway"

    started = time.perf_counter()
    third = _dvc(repo, "repro", "sample@vp")
    sample_rerun_s = time.perf_counter() - started
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "Running stage 'train@vp'" not in third.stdout and "Running stage 'sample@vp'" in third.stdout
    assert {"train@vp", "sample@vp"} <= _locked(repo)
    assert "up to date" in _dvc(repo, "status", "sample@vp").stdout
    after = _chunks(samples)
    assert len(after) == 2 * 2 * 40 and all(after[k] == t for k, t in kept.items()), "finished chunks kept as they were"
    summary = json.loads((samples / "summary.json").read_text())
    assert sum(r["chunks_reused"] for r in summary) == len(kept)  # chunk files are whole or absent

    # the same stages uninterrupted, elsewhere: identical weights and samples
    ref = tmp_path / "ref"
    (ref / "data").mkdir(parents=True)
    (ref / "data" / "prepared").symlink_to(repo / "data" / "prepared")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(train_cmd(repo / "params.yaml", ref) + ["--out", str(ref / "train")], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = load_trained(repo / "outputs" / "train" / "vp" / "model.pt")
    straight = load_trained(ref / "train" / "model.pt")
    assert straight.step == resumed.step == steps
    # Bit for bit is what test_training's stopped-and-resumed test asserts, and what every run of this one has
    # measured since dropout is reseeded per micro-batch; one run before that (this MLP has no dropout)
    # measured 4e-7, with no cause found, so this end-to-end check keeps a float-rounding margin
    weight_diff = max((t - resumed.model.state_dict()[k]).abs().max().item()
                      for k, t in straight.model.state_dict().items())
    assert weight_diff < 1e-5, weight_diff
    done = subprocess.run([sys.executable, str(REPO / "pipeline" / "sample.py"), "--params", "params.yaml", "--variant",
                           "vp", "--model", "outputs/train/vp/model.pt", "--out", str(ref / "samples"),
                           "--no-progress"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for setting in ("euler_maruyama-100", "ddim-10"):
        for seed in (0, 1):
            np.testing.assert_array_equal(load_samples(samples, setting, seed),
                                          load_samples(ref / "samples", setting, seed))
    report(f"dvc repro SIGKILLed in train@vp: checkpoints on disk {sorted(on_disk)} (registered: {registered}), "
           f"loss logged up to step {reached}: the rerun resumed at step {checkpointed}, "
           f"{max(reached - checkpointed, 0)}+ "
           f"steps redone, and reached sampling in {train_rerun_s:.1f}s (incl. DVC and Ray start-up)")
    report(f"dvc repro interrupted in sample@vp: {len(kept)} of 160 chunks kept, the rest drawn by the rerun in "
           f"{sample_rerun_s:.1f}s; samples bit-identical to an uninterrupted sampling run; weights within "
           f"{weight_diff:.1e} (max abs) of an uninterrupted training run")


# -- 4. the MLflow server restarted during training ----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mlflow(port: int, store: Path) -> subprocess.Popen:
    store.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri",
         f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_mlflow_server_restart_mid_run_loses_no_metrics_and_no_run(tmp_path):
    """The tracking server is killed (SIGKILL) once training has logged, and started again on the same
    port and store: training goes on while the metrics wait in MLflow's background queue and its
    retries, then every metric point lands, in the one run."""
    from mlflow.tracking import MlflowClient

    port, store = _free_port(), tmp_path / "server"
    url = f"http://127.0.0.1:{port}"
    server = _start_mlflow(port, store)
    proc = None
    try:
        wait_for_mlflow(url, server)
        steps, log_every, batch = 600, 10, 64
        p = make_params(tmp_path, "toy2d", {"vp": {**VARIANTS["vp"], "net": TINY}},
                        {"steps": steps, "batch_size": batch, "checkpoint_every": 100, "log_every": log_every})
        p["mlflow"] = {"tracking_uri": url, "experiment": "faults"}
        log = tmp_path / "train.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(train_cmd(write_params(tmp_path, p), tmp_path), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        client = MlflowClient(url)

        def first_point_logged() -> bool:
            try:
                runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
                return bool(runs) and bool(logged_steps(client, runs[0].info.run_id))
            except Exception:
                return False

        assert _wait_until(first_point_logged, proc, 300), log.read_text()[-3000:]
        down = time.perf_counter()
        kill_group(server)
        server.wait(timeout=30)
        time.sleep(15)  # an outage long enough that waiting for the server would show in the step times
        server = _start_mlflow(port, store)
        wait_for_mlflow(url, server)
        downtime = time.perf_counter() - down
        proc.wait(timeout=600)
        output = log.read_text()
        assert proc.returncode == 0, output[-3000:]
        assert "mlflow: giving up" not in output, "a metric batch was dropped"

        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED", "one run, finished: no duplicate"
        run_id = runs[0].info.run_id
        logged = logged_steps(client, run_id)
        assert sorted(set(logged)) == list(range(log_every, steps + 1, log_every)), "every loss point landed"
        assert "model/model.pt" in {a.path for a in client.list_artifacts(run_id, "model")}
        # the outage shows in the metrics: the window whose logging call waited for the server
        rates = client.get_metric_history(run_id, "images_per_s")
        stall = max(log_every * batch / m.value for m in rates)
        assert stall < downtime / 2, f"a logging window took {stall:.1f}s while the server was down {downtime:.1f}s"
        report(f"mlflow server down {downtime:.1f}s (kill to healthy): the longest logging window took {stall:.1f}s "
               f"(training did not wait for the server); 0 of {len(set(logged))} loss points lost, "
               f"{len(logged) - len(set(logged))} logged twice, 1 run")
    finally:
        if proc is not None:
            kill_group(proc)
        kill_group(server)


# -- 5. a Ray node removed during training ------------------------------------------------------


def test_ray_node_removed_mid_training_resumes_on_the_remaining_node(tmp_path):
    """Two nodes (head: 2 CPUs, worker node: 1 CPU), one training worker on each (SPREAD); the worker
    node is removed after a checkpoint: Ray Train restarts both workers on the head from that checkpoint
    and the run finishes, in one MLflow run on the tracking server."""
    import threading

    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from scorelab.training import train_variant

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_mlflow(port, tmp_path / "server")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    node = cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        cluster.wait_for_nodes()
        wait_for_mlflow(url, server)
        steps = 1500
        p = make_params(tmp_path, "toy2d", {"vp": {**VARIANTS["vp"], "net": TINY}},
                        {"steps": steps, "batch_size": 64, "checkpoint_every": 50, "log_every": 10},
                        ray={"address": cluster.address, "placement_strategy": "SPREAD", "max_failures": 2})
        p["mlflow"] = {"tracking_uri": url, "experiment": "faults-node"}
        params = parse_params(p)
        prepare(params.data, params.seed)
        outcome: dict = {}

        def target():
            try:
                outcome["result"] = train_variant(params, "vp", root=tmp_path, data_dir=params.data.dataset_dir,
                                                  out_dir=tmp_path / "out")
            except BaseException as e:  # surfaced below
                outcome["error"] = e

        thread = threading.Thread(target=target)
        thread.start()
        registered = _wait_for_registered_checkpoint(tmp_path / "ray")
        assert 0 < registered < steps, "no checkpoint registered before the end"
        removed = time.perf_counter()
        cluster.remove_node(node)
        client, restarted_s, reached = MlflowClient(url), None, 0
        while thread.is_alive() and time.perf_counter() - removed < 500:
            if restarted_s is None:  # the restarted workers tag the run with the step they resumed from
                runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
                if runs and int(runs[0].data.tags.get("resumed_from_step", 0)) > 0:
                    restarted_s = time.perf_counter() - removed
                    reached = max(logged_steps(client, runs[0].info.run_id), default=0)
            time.sleep(0.5)
        thread.join(timeout=10)
        finished_s = time.perf_counter() - removed
        assert not thread.is_alive()
        assert "error" not in outcome, outcome.get("error")
        assert outcome["result"].steps == steps
        assert restarted_s is not None, "the restarted workers never tagged the run"

        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        tags = runs[0].data.tags
        resumed = int(tags["resumed_from_step"])
        assert resumed >= registered and tags["ray.num_nodes"] == "1", tags
        logged = logged_steps(client, runs[0].info.run_id)
        assert sorted(logged) == list(range(10, steps + 1, 10)), "every loss point once: the redone steps' not again"
        report(f"Ray node removed after the checkpoint at step {registered}: workers restarted on the remaining "
               f"node from step {resumed} {restarted_s:.1f}s after the removal; {max(reached - resumed, 0)}+ steps "
               f"redone (their loss points not logged again); finished {finished_s:.1f}s after the removal")
    finally:
        ray.shutdown()
        cluster.shutdown()
        kill_group(server)
