"""The DVC pipeline for real: `dvc repro` of prepare and one training stage in a copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_dvc_repro_prepares_and_trains_then_is_a_no_op(tmp_path):
    repo = tmp_path / "repo"
    _copy_repo(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"] = {"source": "toy2d", "out_dir": "data/prepared", "toy": {"n_train": 1000, "n_test": 200}}
    params["train"].update({"steps": 6, "batch_size": 16, "checkpoint_every": 3, "log_every": 3, "warmup_steps": 0})
    params["variants"] = {"vp": {**params["variants"]["vp"], "net": {"type": "mlp", "hidden": 32, "layers": 2}}}
    params["variants"]["vp"]["samplers"] = [{"method": "dpm_solver", "steps": [10]}]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    first = _dvc(repo, "repro")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert (repo / "data" / "prepared" / "toy2d" / "manifest.json").exists()
    for name in ("model.pt", "config.json", "samples_final.png", "metrics.json"):
        assert (repo / "outputs" / "train" / "vp" / name).exists(), name
    assert json.loads((repo / "outputs" / "train" / "vp" / "metrics.json").read_text())["steps"] == 6
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {"prepare", "train@vp"} <= set(lock["stages"])
    assert (repo / "mlflow.db").exists(), "the default MLflow store lives in the repository root"

    shown = _dvc(repo, "metrics", "show")
    assert shown.returncode == 0 and "outputs/train/vp/metrics.json" in shown.stdout

    again = _dvc(repo, "repro")
    assert again.returncode == 0
    assert "didn't change" in again.stdout or "up to date" in again.stdout
    assert "Running stage" not in again.stdout
