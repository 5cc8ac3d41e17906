"""The DVC pipeline for real: `dvc repro` of prepare and one training stage in a copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = {"type": "mlp", "hidden": 64, "layers": 2}


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


def tiny_repo(repo: Path, train_steps: int) -> dict:
    """A copy of the repository whose params.yaml is the 2-D mixture, one variant `vp` with a small MLP trained
    train_steps steps on 2 Ray workers, two sampler settings, 2000 samples x 2 seeds in chunks of 50."""
    _copy_repo(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"] = {"source": "toy2d", "out_dir": "data/prepared", "toy": {"n_train": 2000, "n_test": 300}}
    params["train"].update({"steps": train_steps, "batch_size": 64, "checkpoint_every": 50, "log_every": 10,
                            "warmup_steps": 0, "sample_every": 0})
    params["ray"].update({"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0, "storage_path": "outputs/ray"})
    params["variants"] = {"vp": {**params["variants"]["vp"], "net": TINY, "samplers": [
        {"method": "euler_maruyama", "steps": [100]}, {"method": "ddim", "steps": [10]}]}}
    params["sample"] = {"n": 2000, "seeds": [0, 1], "batch_size": 50, "workers": 1}
    params["tune"] = {  # as the whole-DAG test below: valid for 2-D data, and not run here
        "space": [{"sde": {"type": "vp", "beta_min": 0.1, "beta_max": 20.0}, "parameterization": {"type": "eps"},
                   "net": TINY}],
        "lr": [1.0e-3], "num_trials": 1, "max_concurrent": 1, "steps": 6, "batch_size": 16, "eval_every": 3,
        "grace_period": 3, "objective": {"sampler": {"method": "ddim", "steps": [5]}, "n_samples": 200},
        "samplers": [{"method": "ddim", "steps": [5]}],
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def _dvc(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_dvc_repro_runs_the_whole_dag_then_is_a_no_op(tmp_path):
    """The tiny 2-D profile through every stage: prepare, featurizer, train, sample, evaluate, report."""
    repo = tmp_path / "repo"
    _copy_repo(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"] = {"source": "toy2d", "out_dir": "data/prepared", "toy": {"n_train": 1000, "n_test": 300}}
    params["train"].update({"steps": 6, "batch_size": 16, "checkpoint_every": 3, "log_every": 3, "warmup_steps": 0})
    # 6 training steps leave samples far outside the data, which the divergence guard would mark (it has its own
    # tests in test_generate and test_evaluate): here every setting is scored
    params["sample"]["diverged_above"] = 1.0e12
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
    for f in ("best_variant.yaml", "trials.csv", "metrics.json", "objective_vs_params.png"):
        assert (repo / "outputs" / "tune" / f).exists(), f
    tuned_train = json.loads((repo / "outputs" / "train" / "tuned" / "metrics.json").read_text())
    assert tuned_train["steps"] == 6, "the winner is retrained at the train: budget, not the trial's"
    assert set(json.loads((repo / "outputs" / "eval" / "tuned" / "metrics.json").read_text())["settings"]) == {
        "ddim-5"}
    for f in ("comparison.md", "fid_vs_nfe.png", "samples.png", "metrics.json", "fid_vs_nfe.csv"):
        assert (repo / "reports" / f).exists(), f
    table = (repo / "reports" / "comparison.md").read_text()
    assert "dpm_solver" in table and "heun" in table and "tuned" in table

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {"prepare", "featurizer", "train@vp", "sample@ve", "evaluate@vp", "tune", "train_tuned", "sample_tuned",
            "evaluate_tuned", "report"} <= set(lock["stages"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"vp", "ve", "tuned", "comparison", "tune", "tune-trial000", "tune-trial001"}, \
        "one run per variant (the retrained winner too), the sweep with a nested run per trial, and the comparison"
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

    # sample.n changed: every variant is sampled again, the sweep's winner too, and nothing is retrained
    params["sample"]["n"] = params["sample"]["n"] + 8
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _dvc(repo, "status", "--json")
    assert status.returncode == 0, status.stderr
    changed = set(json.loads(status.stdout))
    assert {"sample@vp", "sample@ve", "sample_tuned"} <= changed, changed
    assert not changed & {"train@vp", "train@ve", "tune", "train_tuned"}, changed


# Appended to the copy's sampling.py: a change to sampling alone, which moves every sample by +1e-3.
_SHIFTED_SAMPLER = """

_unshifted_sample = sample


def sample(*args, **kwargs):
    drawn = _unshifted_sample(*args, **kwargs)
    return SampleResult(x=drawn.x + 1e-3, nfe=drawn.nfe)
"""


def test_a_sampling_only_code_change_redraws_the_samples(tmp_path):
    """The sample stage keeps finished chunks across runs so that an interrupted run resumes
    (tests/test_faults.py); after a change to the sampling code, the re-run stage must draw them anew
    rather than keep the old ones under a new lock. The copy runs its own src/ (PYTHONPATH), so editing
    it is a code change that both DVC and the chunks' fingerprint see."""
    from scorelab.generate import load_samples
    from scorelab.storage import sha256_file

    repo = tmp_path / "repo"
    params = tiny_repo(repo, train_steps=20)
    params["sample"].update({"n": 200, "seeds": [0], "batch_size": 100})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {"PYTHONPATH": str(repo / "src")}
    first = _dvc(repo, "repro", "sample@vp", env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    samples, model = repo / "outputs" / "samples" / "vp", repo / "outputs" / "train" / "vp" / "model.pt"
    settings = ("euler_maruyama-100", "ddim-10")
    before = {s: load_samples(samples, s, 0) for s in settings}
    model_sha = sha256_file(model)

    with open(repo / "src" / "scorelab" / "sampling.py", "a") as f:
        f.write(_SHIFTED_SAMPLER)
    # the sample stage alone (-s): the same model.pt, only the code that draws from it changed
    second = _dvc(repo, "repro", "-s", "sample@vp", env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Running stage 'sample@vp'" in second.stdout, second.stdout
    assert sha256_file(model) == model_sha
    summary = json.loads((samples / "summary.json").read_text())
    assert sum(r["chunks_reused"] for r in summary) == 0, "no chunk of the old code is kept"
    for s in settings:
        shift = load_samples(samples, s, 0) - before[s]
        assert abs(shift - 1e-3).max() < 1e-5, (s, abs(shift - 1e-3).max())

    third = _dvc(repo, "repro", "-s", "sample@vp", env=env)
    assert third.returncode == 0 and "Running stage" not in third.stdout, "the same code is up to date"


def _exp_rows(shown: list) -> dict[str, dict]:
    """`dvc exp show --json`: {experiment name: its data} for every experiment under the baseline."""
    rows = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                rows[rev["name"]] = rev["data"]
    return rows


def test_queued_experiments_show_their_headline_and_link_to_mlflow(tmp_path):
    """Two `dvc exp run --queue -S variants.vp.sde.beta_max=...` run by `dvc queue start` in DVC's temporary
    copies: `dvc exp show` holds both with the report's headline, `dvc metrics diff` names vp's change in a few
    lines, and the MLflow runs (in the real repository's store, not the deleted copies') carry the experiment."""
    repo = tmp_path / "repo"
    params = tiny_repo(repo, train_steps=20)
    params["sample"].update({"n": 200, "seeds": [0, 1], "batch_size": 100, "diverged_above": 1.0e12})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {"PYTHONPATH": "src"}  # relative: each stage runs the code of the copy it runs in
    git = ["git", "-c", "user.name=scorelab", "-c", "user.email=scorelab@example.com"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny"], cwd=repo, check=True)
    base = _dvc(repo, "repro", env=env)
    assert base.returncode == 0, base.stdout[-3000:] + base.stderr[-3000:]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "the tiny run"], cwd=repo, check=True)

    git_env = {**env, "GIT_AUTHOR_NAME": "scorelab", "GIT_AUTHOR_EMAIL": "scorelab@example.com",
               "GIT_COMMITTER_NAME": "scorelab", "GIT_COMMITTER_EMAIL": "scorelab@example.com"}
    for beta, name in ((10, "beta10"), (15, "beta15")):
        queued = _dvc(repo, "exp", "run", "--queue", "-n", name, "-S", f"variants.vp.sde.beta_max={beta}", env=git_env)
        assert queued.returncode == 0, queued.stderr[-2000:]
    started = _dvc(repo, "queue", "start", env=git_env)
    assert started.returncode == 0, started.stderr[-2000:]
    deadline = time.monotonic() + 1500
    while time.monotonic() < deadline:
        status = _dvc(repo, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(10)
    assert "Success" in status and "Failed" not in status, status + _dvc(repo, "queue", "logs", "beta10").stdout[-3000:]

    rows = _exp_rows(json.loads(_dvc(repo, "exp", "show", "--json").stdout))
    assert set(rows) == {"beta10", "beta15"}, rows.keys()
    for name, beta in (("beta10", 10), ("beta15", 15)):
        assert rows[name]["params"]["params.yaml"]["data"]["variants"]["vp"]["sde"]["beta_max"] == beta
        headline = rows[name]["metrics"]["reports/metrics.json"]["data"]
        assert set(headline["vp"]) == {"sliced_w2", "low", "high", "nfe", "setting", "test_loglik", "train_s", "loss"}
        assert headline["vp"]["sliced_w2"] > 0 and list(rows[name]["metrics"]) == ["reports/metrics.json"]
    headline = json.loads((repo / "reports" / "metrics.json").read_text())
    # train_tuned tracks every variant (the hand-set variant of the winner's type lends it its samplers, which
    # its preview grid and model.pt record), so it retrains, deterministically: the same scores, another time
    tuned = {k: v for k, v in headline["tuned"].items() if v is not None and k != "train_s"}  # exp show drops nulls
    retrained = rows["beta10"]["metrics"]["reports/metrics.json"]["data"]["tuned"]
    assert {k: v for k, v in retrained.items() if k != "train_s"} == tuned, \
        "the sweep re-ran or chose another winner: only vp's stages and train_tuned depend on variants.vp"

    diff = _dvc(repo, "metrics", "diff", "HEAD", "beta10", "--md")
    changed = [line for line in diff.stdout.splitlines() if line.startswith("| reports/")]
    assert changed and all("| vp." in line or "| tuned.train_s " in line for line in changed), diff.stdout
    print(_dvc(repo, "metrics", "show").stdout)
    print(diff.stdout)
    table = _dvc(repo, "exp", "show", "--only-changed", "--no-pager", env={"COLUMNS": "160"}).stdout
    print(table)

    from mlflow.tracking import MlflowClient

    assert not list(repo.glob(".dvc/tmp/exps/*/mlflow.db")), "no store left in the temporary copies"
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    tagged = {r.data.tags.get("dvc.exp_name") for r in runs if r.info.run_name == "vp"}
    assert {"beta10", "beta15"} <= tagged, tagged
    comparison = [r for r in runs if r.info.run_name == "comparison"]
    assert comparison and comparison[0].data.tags.get("dvc.exp_name") in {"beta10", "beta15"}
