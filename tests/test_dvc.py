"""The DVC pipeline for real: `dvc repro` of prepare and one training stage in a copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def _copy_repo(dest: Path) -> None:
    """The project's files as a fresh clone plus uncommitted work would hold them: never what a run of the
    DAG left in the working tree (dvc.lock, the report's outputs), which would make the copy's stages look
    already done."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if name == "dvc.lock" or name.startswith(("reports/", "outputs/")):
            continue
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_dvc_repro_runs_the_whole_dag_then_is_a_no_op(tmp_path):
    """The tiny 2-D profile through every stage: prepare, featurizer, train, sample, evaluate, report."""
    repo = tmp_path / "repo"
    _copy_repo(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"] = {"source": "toy2d", "out_dir": "data/prepared", "toy": {"n_train": 1000, "n_test": 300}}
    params["train"].update({"steps": 6, "batch_size": 16, "checkpoint_every": 3, "log_every": 3, "warmup_steps": 0})
    mlp = {"type": "mlp", "hidden": 32, "layers": 2}
    params["variants"] = {
        "vp": {**params["variants"]["vp"], "net": mlp, "samplers": [{"method": "dpm_solver", "steps": [5, 10]}]},
        "ve": {**params["variants"]["ve"], "net": mlp, "samplers": [{"method": "heun", "steps": [5]}]},
    }
    params["tune"] = {
        "space": [{"sde": {"type": "vp", "beta_min": 0.1, "beta_max": 20.0}, "parameterization": {"type": "eps"},
                   "net": mlp},
                  {"sde": {"type": "ve", "sigma_min": 0.01, "sigma_max": "auto"},
                   "parameterization": {"type": "score", "scale_by_sigma": True}, "net": mlp}],
        "lr": [1.0e-3], "num_trials": 2, "max_concurrent": 2, "steps": 6, "batch_size": 16, "eval_every": 3,
        "grace_period": 3, "objective": {"sampler": {"method": "ddim", "steps": [5]}, "n_samples": 200},
        "samplers": [{"method": "ddim", "steps": [5]}],
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    first = _dvc(repo, "repro")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert (repo / "data" / "prepared" / "toy2d" / "manifest.json").exists()
    assert json.loads((repo / "outputs" / "featurizer" / "metrics.json").read_text())["skipped"]
    for name in ("vp", "ve"):
        for f in ("model.pt", "config.json", "samples_final.png", "metrics.json"):
            assert (repo / "outputs" / "train" / name / f).exists(), (name, f)
        evaluation = json.loads((repo / "outputs" / "eval" / name / "metrics.json").read_text())
        assert evaluation["seeds"] >= 3 and evaluation["baseline"]["sliced_w2_mean"] > 0
    assert set(json.loads((repo / "outputs" / "eval" / "vp" / "metrics.json").read_text())["settings"]) == {
        "dpm_solver-5", "dpm_solver-10"}
    for f in ("best_params.yaml", "model.pt", "trials.csv", "metrics.json", "objective_vs_params.png"):
        assert (repo / "outputs" / "tune" / f).exists(), f
    assert set(json.loads((repo / "outputs" / "eval" / "tuned" / "metrics.json").read_text())["settings"]) == {
        "ddim-5"}
    for f in ("comparison.md", "fid_vs_nfe.png", "samples.png", "metrics.json", "fid_vs_nfe.csv"):
        assert (repo / "reports" / f).exists(), f
    table = (repo / "reports" / "comparison.md").read_text()
    assert "dpm_solver" in table and "heun" in table and "tuned" in table

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {"prepare", "featurizer", "train@vp", "sample@ve", "evaluate@vp", "tune", "sample_tuned",
            "evaluate_tuned", "report"} <= set(lock["stages"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"vp", "ve", "comparison", "tune", "tune-trial000", "tune-trial001"}, \
        "one run per variant, the sweep with a nested run per trial, and the comparison"
    assert by_name["tune-trial000"].data.tags["mlflow.parentRunId"] == by_name["tune"].info.run_id
    history = client.get_metric_history(by_name["vp"].info.run_id, "eval_sliced_w2_dpm_solver")
    assert sorted(m.step for m in history) == [5, 10], "evaluation logged against NFE on the training run"
    # MLflow as the comparison surface: the model-training kind; one key at step = NFE in every variant's
    # run (the best setting at each NFE); each variant's weights as an mlflow.pyfunc model that samples
    assert len({r.info.experiment_id for r in runs}) == 1
    exp = client.get_experiment(by_name["vp"].info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    import mlflow
    import mlflow.pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")  # runs:/ URIs resolve through it
    try:
        for name, sampler in (("vp", "dpm_solver"), ("ve", "heun")):
            settings = json.loads((repo / "outputs" / "eval" / name / "metrics.json").read_text())["settings"]
            best = client.get_metric_history(by_name[name].info.run_id, "eval_sliced_w2_best")
            assert sorted(m.step for m in best) == sorted(round(r["nfe"]) for r in settings.values()), name
            model = mlflow.pyfunc.load_model(f"runs:/{by_name[name].info.run_id}/sampler")
            x = model.predict({"n": 8, "sampler": sampler, "steps": 5})
            assert x.shape == (8, 2) and np.isfinite(x).all(), name
    finally:
        mlflow.set_tracking_uri(None)

    shown = _dvc(repo, "metrics", "show")
    assert shown.returncode == 0 and "reports/metrics.json" in shown.stdout

    again = _dvc(repo, "repro")
    assert again.returncode == 0
    assert "Running stage" not in again.stdout, again.stdout
