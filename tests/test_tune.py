"""The Ray Tune sweep: real Ray Tune running real Ray Train trials, tracked in a real MLflow store.

Each sweep starts its own local Ray (its start-up and Ray Train's per-trial start-up are most of the
time), on toy 2-D data whose objective is the sliced W2 distance to the test split.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from scorelab.config import ConfigError, parse_params, with_tuned_variant
from scorelab.data import prepare, read_split
from scorelab.tune import plan_trials, rung_agreement, run_sweep, suggest_sigma_max

REPO = Path(__file__).resolve().parents[1]

VP = {"sde": {"type": "vp", "beta_max": 20.0}}
VE_AUTO = {"sde": {"type": "ve", "sigma_min": 0.01, "sigma_max": "auto"},
           "parameterization": {"type": "score", "scale_by_sigma": True}}


def make_params(tmp: Path, tune: dict) -> dict:
    return {
        "seed": 0,
        "data": {"source": "toy2d", "out_dir": str(tmp / "data"),
                 "toy": {"kind": "gaussian_mixture", "n_train": 2000, "n_test": 500}},
        "train": {"steps": 10, "batch_size": 64, "warmup_steps": 0, "log_every": 25},
        "ray": {"num_workers": 1, "storage_path": str(tmp / "ray"), "max_failures": 0},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "variants": {"vp": {**VP, "parameterization": {"type": "eps"}, "samplers": [{"method": "ddim", "steps": [10]}]}},
        "tune": {"ema_decay": [0.9], "max_concurrent": 2, "steps": 200, "eval_every": 100, "grace_period": 100,
                 "reduction_factor": 2, "objective": {"sampler": {"method": "ddim", "steps": [10]}, "n_samples": 500},
                 "samplers": [{"method": "ddim", "steps": [10, 20]}], **tune},
    }


def mlflow_runs(tmp: Path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return c, [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]


# -- the search space, refused before any trial ---------------------------------------------------


def test_invalid_space_is_refused_before_any_trial_naming_the_field(tmp_path):
    bad = make_params(tmp_path, {"space": [VP, {"sde": {"type": "ve", "sigma_min": 2.0, "sigma_max": [1.0, 50.0]}}],
                                 "num_trials": 2})
    with pytest.raises(ConfigError, match=r"tune\.space\.1\.sde\.sigma_max: must be > sigma_min \(2\.0\)"):
        parse_params(bad)

    # the stage refuses it the same way (exit 2), and no trial or Ray storage was made
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([sys.executable, str(REPO / "pipeline" / "tune.py"), "--params", str(path),
                           "--root", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "tune.space.1.sde.sigma_max: must be > sigma_min (2.0)" in proc.stderr
    assert not (tmp_path / "ray").exists()

    # other fields are named too: a sampler the objective cannot use on an SDE, a budget shorter than ASHA's
    with pytest.raises(ConfigError) as e:
        parse_params(make_params(tmp_path, {"space": [VP, {"sde": {"type": "vp", "sigma_max": 3.0}}],
                                            "objective": {"sampler": {"method": "ald", "steps": [10]}},
                                            "grace_period": 500}))
    text = str(e.value)
    assert "tune.space.1.sde.sigma_max: unknown key 'sigma_max'" in text
    assert "tune.objective.sampler.method: sampling method 'ald' is not defined for 'vp' SDEs" in text
    assert "tune.grace_period: must be <= tune.steps (200)" in text


def test_sigma_max_auto_is_checked_once_known(tmp_path):
    """"auto" passes validation; once the data gives its value, a sigma_min above it is refused."""
    p = parse_params(make_params(tmp_path, {"space": [{**VE_AUTO, "sde": {**VE_AUTO["sde"], "sigma_min": 5.0}}],
                                            "num_trials": 1}))
    assert plan_trials(p, sigma_max_auto=8.0)[0].sde["sigma_max"] == 8.0
    with pytest.raises(ConfigError, match=r"tune\.space\.0\.sde\.sigma_max: must be > sigma_min \(5\.0\).*auto = 3"):
        plan_trials(p, sigma_max_auto=3.0)


def test_suggest_sigma_max_is_the_largest_pairwise_distance():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [-3.0, -4.0]])
    assert suggest_sigma_max(x) == (10.0, 4)
    big = torch.randn(5000, 3, generator=torch.Generator().manual_seed(0))
    exact = float(torch.cdist(big.double(), big.double()).max())
    value, used = suggest_sigma_max(big, max_points=1000)
    assert used == 1000 and 0.6 * exact < value <= exact  # a subset gives a lower bound


def test_plan_covers_every_sde_setting_before_the_second_choices(tmp_path):
    p = parse_params(make_params(tmp_path, {"space": [{"sde": {"type": "vp", "beta_max": [10.0, 20.0]}}, VE_AUTO],
                                            "lr": [1e-2, 1e-3], "num_trials": 4}))
    plan = plan_trials(p, sigma_max_auto=6.0)
    assert [(t.sde["type"], t.sde.get("beta_max"), t.lr) for t in plan] == [
        ("vp", 10.0, 1e-2), ("vp", 20.0, 1e-2), ("ve", None, 1e-2), ("vp", 10.0, 1e-3)]
    assert plan[2].sde["sigma_max"] == 6.0 and plan[0].variant["train"] == {
        "steps": 200, "lr": 1e-2, "batch_size": None, "micro_batch_size": None, "warmup_steps": None,
        "lr_schedule": None, "final_lr_fraction": None,
        "grad_clip": None, "weight_decay": None}


def test_random_search_draws_distinct_configurations_with_the_seed(tmp_path):
    space = {"space": [{"sde": {"type": "vp", "beta_max": [5.0, 10.0, 15.0, 20.0]}}, VE_AUTO],
             "lr": [1e-2, 1e-3, 1e-4], "num_trials": 5, "search": "random"}
    plan = plan_trials(parse_params(make_params(tmp_path, space)), sigma_max_auto=6.0)
    picked = [(t.sde["type"], t.sde.get("beta_max"), t.lr) for t in plan]
    assert len(set(picked)) == 5 and [t.index for t in plan] == list(range(5))
    assert picked == [(t.sde["type"], t.sde.get("beta_max"), t.lr)
                      for t in plan_trials(parse_params(make_params(tmp_path, space)), sigma_max_auto=6.0)]
    grid = [(t.sde["type"], t.sde.get("beta_max"), t.lr)
            for t in plan_trials(parse_params(make_params(tmp_path, {**space, "search": "grid"})), 6.0)]
    assert picked != grid  # not the grid's first five (5 of 15 drawn: p = 1/3003 to equal it by chance)
    other = parse_params({**make_params(tmp_path, space), "seed": 1})
    assert [(t.sde["type"], t.sde.get("beta_max"), t.lr) for t in plan_trials(other, 6.0)] != picked


def test_sigma_max_auto_times_a_factor(tmp_path):
    ve = {"sde": {"type": "ve", "sigma_min": 0.01, "sigma_max": ["auto", "auto*0.5", "auto * 2"]},
          "parameterization": {"type": "score", "scale_by_sigma": True}}
    plan = plan_trials(parse_params(make_params(tmp_path, {"space": [ve], "num_trials": 3})), sigma_max_auto=6.0)
    assert [t.sde["sigma_max"] for t in plan] == [6.0, 3.0, 12.0]
    with pytest.raises(ConfigError, match=r"tune\.space\.0\.sde\.sigma_max"):
        plan_trials(parse_params(make_params(tmp_path, {"space": [{**ve, "sde": {**ve["sde"], "sigma_max": "auto*0.001"}}],
                                                        "num_trials": 1})), sigma_max_auto=6.0)


def test_rung_agreement_counts_pairs_in_their_final_order():
    def row(trial, curve, status="finished"):
        return {"trial": trial, "status": status, "curve": json.dumps(curve)}

    rows = [row(0, [[100, 5.0], [200, 1.0]]), row(1, [[100, 4.0], [200, 2.0]]), row(2, [[100, 6.0], [200, 3.0]]),
            row(3, [[100, 9.0]], status="stopped_early")]
    # final order 0 < 1 < 2; at step 100: 1 < 0 < 2: pairs (0,1) swapped, (0,2) and (1,2) kept
    assert rung_agreement(rows, 200) == [{"step": 100, "agree": 2, "pairs": 3, "rate": 2 / 3}]
    assert rung_agreement(rows[:1], 200) == [{"step": 100, "agree": 0, "pairs": 0, "rate": None}]


def test_unset_tune_samplers_need_a_hand_set_variant_of_each_type(tmp_path):
    p = make_params(tmp_path, {"space": [VP, VE_AUTO], "num_trials": 2})
    del p["tune"]["samplers"]
    with pytest.raises(ConfigError, match=r"tune\.samplers: is unset.*'ve'"):
        parse_params(p)
    p["variants"]["ve"] = {**VE_AUTO, "sde": {"type": "ve", "sigma_max": 5.0},
                           "samplers": [{"method": "heun", "steps": [10]}]}
    params = parse_params(p)
    winner = tmp_path / "best_variant.yaml"
    winner.write_text(yaml.safe_dump({**VE_AUTO, "sde": {"type": "ve", "sigma_max": 7.0}, "train": {"lr": 1e-3}}))
    tuned = with_tuned_variant(params, winner).variants["tuned"]
    assert [s.method for s in tuned.samplers] == ["heun"] and tuned.sde.sigma_max == 7.0 and tuned.train.lr == 1e-3
    winner.write_text(yaml.safe_dump({**VE_AUTO, "sde": {"type": "ve", "sigma_max": -1.0}}))
    with pytest.raises(ConfigError, match=r"best_variant\.yaml: variants\.tuned\.sde.*sigma_max"):
        with_tuned_variant(params, winner)


# -- a real sweep -----------------------------------------------------------------------------------


def test_sweep_stops_trials_early_tracks_them_and_writes_a_valid_winner(tmp_path):
    """Two SDE types x two learning rates. Trials 2 and 3 (lr 1e-6) barely train; trial 2 (VP) is far
    behind every other trial at ASHA's first rung, and starts only after trial 0 or 1 has recorded its
    objective there, so ASHA stops it whatever the timing. Which of the others ASHA stops depends on
    which reaches the rung first."""
    p = make_params(tmp_path, {"space": [VP, VE_AUTO], "lr": [1e-2, 1e-6], "num_trials": 4})
    params = parse_params(p)
    prepare(params.data, params.seed)
    out = tmp_path / "outputs" / "tune"
    result = run_sweep(params, root=tmp_path, data_dir=params.data.dataset_dir, featurizer_dir=tmp_path / "none",
                       out_dir=out)

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [(r["sde"], float(r["lr"])) for r in rows] == [("vp", 1e-2), ("ve", 1e-2), ("vp", 1e-6), ("ve", 1e-6)]
    assert {r["status"] for r in rows} <= {"finished", "stopped_early"}
    assert rows[2]["status"] == "stopped_early" and rows[2]["steps"] == "100", rows
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    assert all(int(r["steps"]) < 200 for r in stopped)
    assert any(r["status"] == "finished" and r["steps"] == "200" for r in rows[:2])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trials"] == 4 and metrics["stopped_early"] == len(stopped) and not metrics["resumed"]
    assert metrics["objective_metric"] == "sliced_w2" and rows[metrics["best_trial"]]["status"] == "finished"
    x_train = read_split(params.data.dataset_dir, "train")
    assert metrics["sigma_max_auto"] == pytest.approx(suggest_sigma_max(x_train)[0])
    assert (out / "objective_vs_params.png").stat().st_size > 5000

    # the objective's noise: a standard error over its two seeds for every trial that reported one
    assert all(float(r["objective_se"]) > 0 for r in rows if r["objective"]), rows
    assert metrics["objective_seeds"] == 2 and metrics["objective_se_median"] > 0
    finished = [r for r in rows if r["status"] == "finished"]
    (rung,) = metrics["rung_agreement"]  # one checkpoint before the end: step 100
    assert rung["step"] == 100 and rung["pairs"] == len(finished) * (len(finished) - 1) // 2
    assert 0 <= rung["agree"] <= rung["pairs"]

    # the winner: its configuration, without the sweep's budget, read back as variant `tuned` of params
    tuned = with_tuned_variant(params, out / "best_variant.yaml").variants["tuned"]
    winner = rows[metrics["best_trial"]]
    assert tuned.sde.type == winner["sde"] and tuned.train.lr == float(winner["lr"])
    assert tuned.train.steps is None and tuned.train.batch_size is None  # params.train's budget applies
    assert [s.method for s in tuned.samplers] == ["ddim"] and tuned.ema.decay == 0.9  # tune.samplers
    assert metrics["samplers_from"] == "tune.samplers" and not (out / "model.pt").exists()

    # MLflow: one parent run, one nested run per trial with its params and objective curve, the winner tagged
    client, runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("scorelab.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params["tune.num_trials"] == "4" and float(parent.data.params["sigma_max_auto"]) > 0
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "best_variant.yaml", "trials.csv", "metrics.json", "objective_vs_params.png"}
    nested = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                    key=lambda r: int(r.data.tags["scorelab.trial"]))
    assert len(nested) == 4 and len(runs) == 5
    for run, row in zip(nested, rows):
        assert run.data.tags["sde"] == row["sde"] == run.data.params["variant.sde.type"]
        assert float(run.data.params["train.lr"]) == float(row["lr"])
        curve = [m.step for m in client.get_metric_history(run.info.run_id, "objective")]
        assert curve[:1] == [100] and max(curve) >= int(row["steps"])
        assert client.get_metric_history(run.info.run_id, "loss")
    best_runs = [r for r in nested if r.data.tags.get("scorelab.best") == "true"]
    assert [int(r.data.tags["scorelab.trial"]) for r in best_runs] == [metrics["best_trial"]]
    assert result.best["trial"] == metrics["best_trial"]


def test_digits_sweep_ranks_trials_by_the_domain_frechet_distance(tmp_path):
    """The image objective end to end, tiny: digits, the featurizer stage's classifier, two VP schedules.
    Unset tune.samplers: the winner samples like the hand-set `vp`."""
    from scorelab.featurizer import build_featurizer

    unet = {"type": "unet", "channels": 16, "channel_mult": [1], "num_res_blocks": 1, "attn_resolutions": []}
    p = {
        "seed": 0,
        "data": {"source": "digits", "out_dir": str(tmp_path / "data"), "image_size": 8, "test_fraction": 0.3},
        "train": {"steps": 10, "batch_size": 32, "warmup_steps": 0, "log_every": 10},
        "ray": {"num_workers": 1, "storage_path": str(tmp_path / "ray"), "max_failures": 0},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "variants": {"vp": {**VP, "parameterization": {"type": "eps"}, "net": unet,
                            "samplers": [{"method": "dpm_solver", "steps": [5, 10]}]}},
        "tune": {"space": [{"sde": {"type": "vp", "beta_max": [10.0, 20.0]}, "net": unet}], "num_trials": 2,
                 "max_concurrent": 2, "steps": 20, "batch_size": 32, "eval_every": 10, "grace_period": 20,
                 "objective": {"sampler": {"method": "dpm_solver", "steps": [5]}, "n_samples": 64, "seeds": 2}},
    }
    params = parse_params(p)
    prepare(params.data, params.seed)
    build_featurizer(params, root=tmp_path, out_dir=tmp_path / "featurizer", epochs=2)
    out = tmp_path / "outputs" / "tune"
    run_sweep(params, root=tmp_path, data_dir=params.data.dataset_dir, featurizer_dir=tmp_path / "featurizer",
              out_dir=out)

    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert metrics["objective_metric"] == "domain_fd" and metrics["objective_nfe"] == 5
    assert [json.loads(r["sde_params"])["beta_max"] for r in rows] == [10.0, 20.0]
    assert all(r["status"] == "finished" and 0 < float(r["objective"]) < 1e4 and float(r["objective_se"]) > 0
               for r in rows), rows
    assert [[s for s, _ in json.loads(r["curve"])] for r in rows] == [[10, 20], [10, 20]]
    assert metrics["rung_agreement"] == [{**metrics["rung_agreement"][0], "step": 10, "pairs": 1}]
    assert metrics["best_objective"] == min(float(r["objective"]) for r in rows)
    assert metrics["samplers_from"] == metrics["handset"] == "vp"
    tuned = with_tuned_variant(params, out / "best_variant.yaml").variants["tuned"]
    assert tuned.samplers == params.variants["vp"].samplers
    assert tuned.sde.beta_max == json.loads(rows[metrics["best_trial"]]["sde_params"])["beta_max"]


def _finished_trials(storage: Path) -> int:
    """Trials the Tune experiment state records as TERMINATED (what a restore keeps)."""
    done = 0
    for state in storage.glob("tune-*/experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError):  # being written
            continue
        done = max(done, sum(json.loads(t[0])["status"] == "TERMINATED" for t in trials))
    return done


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, how):
    """SIGKILL of the driver and its Ray (a lost machine), or SIGTERM to the driver (preemption: Tune stops
    the trials and saves its state, the stage exits 143 and writes nothing)."""
    p = make_params(tmp_path, {"space": [VP], "lr": [1e-2, 5e-3, 2e-3], "num_trials": 3, "max_concurrent": 1})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(p, sort_keys=False))
    prepare(parse_params(p).data, 0)
    cmd = [sys.executable, str(REPO / "pipeline" / "tune.py"), "--params", str(params_file), "--root", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while _finished_trials(tmp_path / "ray") < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if how == "SIGKILL":
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    else:
        tick = time.perf_counter()
        proc.terminate()
        assert proc.wait(timeout=120) == 143
        print(f"fault: SIGTERM to the tune stage: exit 143 after {time.perf_counter() - tick:.1f}s")
        assert not (tmp_path / "outputs" / "tune").exists()
    finished_before = _finished_trials(tmp_path / "ray")
    assert 1 <= finished_before < 3, "the sweep was not killed midway"

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "(resumed)" in second.stdout
    metrics = json.loads((tmp_path / "outputs" / "tune" / "metrics.json").read_text())
    assert metrics["resumed"] and metrics["trials"] == 3
    rows = list(csv.DictReader((tmp_path / "outputs" / "tune" / "trials.csv").open()))
    assert all(r["objective"] for r in rows)

    # every trial ran once, except one caught running by the kill, which resumed from its checkpoint
    client, runs = mlflow_runs(tmp_path)
    nested = sorted((r for r in runs if "scorelab.trial" in r.data.tags), key=lambda r: int(r.data.tags["scorelab.trial"]))
    assert len(nested) == 3 and len(runs) == 4
    launches = [int(r.data.tags["scorelab.launches"]) for r in nested]
    assert launches[:finished_before] == [1] * finished_before, launches
    assert all(n in (1, 2) for n in launches)
    assert len(list((tmp_path / "ray").glob("tune-*/experiment_state-*.json"))) >= 1
    assert len([d for d in (tmp_path / "ray").iterdir() if not d.name.endswith("-trials")]) == 1
