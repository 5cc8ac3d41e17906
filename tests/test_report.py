"""The report stage on fake but well-formed stage outputs, with a real local MLflow store.

Image-style inputs (domain_fd, kid, precision, recall, bits/dim) for three variants whose training runs
have loss histories in a sqlite store; the report is built twice on them (a re-run must update the one
comparison run). A 2-D case (sliced_w2, test log-likelihood) runs without MLflow. Expected best settings
are computed here from the inputs.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from scorelab import tracking
from scorelab.config import parse_params
from scorelab.report import ReportError, build_report, comparison_run_key
from scorelab.report_data import read_trials

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("comparison.md", "fid_vs_nfe.png", "fid_vs_nfe.csv", "loss_curves.png", "loss_curves.csv", "samples.png",
           "metrics.json")

IMAGE_VARIANTS = {
    "ddpm": {"sde": {"type": "ddpm"}, "parameterization": {"type": "eps"},
             "samplers": [{"method": "ancestral", "steps": [1000]}, {"method": "ddim", "steps": [10, 20, 50]}]},
    "vp": {"sde": {"type": "vp"}, "parameterization": {"type": "eps"},
           "samplers": [{"method": "ode"}, {"method": "dpm_solver", "steps": [10, 20]},
                        {"method": "ddim", "steps": [10]}]},
    "ve": {"sde": {"type": "ve"}, "parameterization": {"type": "score", "scale_by_sigma": True},
           "samplers": [{"method": "pc", "steps": [1000]}, {"method": "heun", "steps": [10, 20]}]},
}
# setting key -> (method, steps, nfe) as the evaluate stage reports them
IMAGE_SETTINGS = {
    "ddpm": {"ancestral-1000": ("ancestral", 1000, 1000), "ddim-10": ("ddim", 10, 10), "ddim-20": ("ddim", 20, 20),
             "ddim-50": ("ddim", 50, 50)},
    "vp": {"ode-adaptive": ("ode", None, 143.7), "dpm_solver-10": ("dpm_solver", 10, 10),
           "dpm_solver-20": ("dpm_solver", 20, 20), "ddim-10": ("ddim", 10, 10)},
    "ve": {"pc-1000": ("pc", 1000, 2000), "heun-10": ("heun", 10, 19), "heun-20": ("heun", 20, 39)},
}
TOY_VARIANTS = {
    "vp": IMAGE_VARIANTS["vp"],
    "subvp": {"sde": {"type": "subvp"}, "parameterization": {"type": "eps"},
              "samplers": [{"method": "euler_maruyama", "steps": [100, 1000]}]},
}
TOY_SETTINGS = {
    "vp": {"ode-adaptive": ("ode", None, 98.3), "dpm_solver-10": ("dpm_solver", 10, 10),
           "dpm_solver-20": ("dpm_solver", 20, 20), "ddim-10": ("ddim", 10, 10)},
    "subvp": {"euler_maruyama-100": ("euler_maruyama", 100, 100),
              "euler_maruyama-1000": ("euler_maruyama", 1000, 1000)},
}
SWEEP_TUNED = {"sde": {"type": "vp"}}  # the sweep's winner `tuned`: a vp, sampled with vp's samplers


def write_inputs(root: Path, settings: dict, *, image: bool, run_ids: dict[str, str] | None = None,
                 seed: int = 0, nan_setting: tuple[str, str] | None = None) -> dict:
    """Train metrics, eval metrics and grids for each variant; returns the eval dicts written."""
    rng = np.random.default_rng(seed)
    primary = "domain_fd" if image else "sliced_w2"
    others = ("kid", "precision", "recall") if image else ("mmd", "data_loglik")
    baseline = {f"{primary}_mean": 0.05, f"{primary}_std": 0.01,
                **{k: v for m in others for k, v in ((f"{m}_mean", 0.5), (f"{m}_std", 0.02))}}
    written = {}
    for i, (variant, table) in enumerate(settings.items()):
        train_dir = root / "outputs" / "train" / variant
        train_dir.mkdir(parents=True, exist_ok=True)
        (train_dir / "metrics.json").write_text(json.dumps({
            "steps": 2000 + i, "seconds": 100.5 + 60 * i, "final_loss": 0.03 + 0.01 * i,
            "mlflow_run_id": (run_ids or {}).get(variant, f"missing{variant}")}))
        block = {}
        for key, (method, steps, nfe) in table.items():
            s = {"method": method, "steps": steps, "nfe": nfe,
                 f"{primary}_mean": float(rng.uniform(0.2, 5.0)), f"{primary}_std": float(rng.uniform(0.01, 0.1))}
            for m in others:
                s[f"{m}_mean"], s[f"{m}_std"] = float(rng.uniform(0, 1)), float(rng.uniform(0, 0.05))
            if (variant, key) == nan_setting:
                s[f"{primary}_mean"] = math.nan  # a diverged sampler: never the best
            block[key] = s
            grid = root / "outputs" / "samples" / variant / key / "grid.png"
            grid.parent.mkdir(parents=True, exist_ok=True)
            import matplotlib.image as mpimg

            mpimg.imsave(grid, rng.uniform(size=(34, 34)), cmap="gray")
        sde = (IMAGE_VARIANTS.get(variant) or TOY_VARIANTS.get(variant) or SWEEP_TUNED)["sde"]["type"]
        data = {"variant": variant, "sde": sde,
                "n_per_seed": 256 if image else 1000, "seeds": 3, "baseline": baseline, "settings": block,
                "inception_fid": None, "inception_fid_reason": "no Inception weights offline"}
        if image:
            data["bits_per_dim"] = {"mean": 1.5 + 0.1 * i, "stderr": 0.01, "n": 500, "dequantization": "uniform"}
        else:  # as the evaluate stage writes it, with a few more keys than the report needs
            data["test_loglik"] = {"mean": -2.8 - 0.1 * i, "stderr": None if i else 0.02, "n": 500,
                                   "units": "nats", "data_mean": -2.5}
            data["primary_metric"] = "sliced_w2"
            data["baseline"] = {**baseline, "description": "1000 random train points per seed against the test split"}
        eval_dir = root / "outputs" / "eval" / variant
        eval_dir.mkdir(parents=True, exist_ok=True)
        (eval_dir / "metrics.json").write_text(json.dumps(data))
        written[variant] = data
    return written


def expected_best(evals: dict, primary: str) -> dict[str, tuple[str, float]]:
    out = {}
    for variant, data in evals.items():
        finite = {k: s[f"{primary}_mean"] for k, s in data["settings"].items() if math.isfinite(s[f"{primary}_mean"])}
        key = min(finite, key=finite.get)
        out[variant] = (key, finite[key])
    return out


def make_params(variants: dict, source: str = "digits", tracking_uri: str = "") -> dict:
    return {"seed": 0, "data": {"source": source}, "mlflow": {"tracking_uri": tracking_uri}, "variants": variants}


@pytest.fixture(scope="module")
def image_case(tmp_path_factory):
    """Three image variants with MLflow training runs; the report built twice."""
    root = tmp_path_factory.mktemp("image")
    params = parse_params(make_params(IMAGE_VARIANTS))
    uri = tracking.resolve_tracking_uri("", root)
    exp = tracking.experiment_id(uri, "scorelab-digits", root)
    run_ids, losses = {}, {}
    for i, name in enumerate(IMAGE_VARIANTS):
        run_id = tracking.start_or_resume_run(uri, exp, f"key-{name}", name, {"variant": name})
        logger = tracking.RunLogger(uri, run_id)
        losses[name] = [1.0 / (1 + step / 100) + 0.1 * i for step in range(50, 501, 50)]
        for step, loss in zip(range(50, 501, 50), losses[name]):
            logger.metrics({"loss": loss}, step=step)
        logger.finish()
        run_ids[name] = run_id
    evals = write_inputs(root, IMAGE_SETTINGS, image=True, run_ids=run_ids)
    first = build_report(params, root=root)
    second = build_report(params, root=root)
    return {"root": root, "params": params, "uri": uri, "exp": exp, "run_ids": run_ids, "evals": evals,
            "best": expected_best(evals, "domain_fd"), "first": first, "result": second}


def test_every_output_is_written(image_case):
    reports = image_case["root"] / "reports"
    for name in OUTPUTS:
        assert (reports / name).is_file() and (reports / name).stat().st_size > 0, name
    assert not [p for p in reports.iterdir() if p.name.startswith(".")], "no temporary files left behind"
    import matplotlib.image as mpimg

    for name in ("fid_vs_nfe.png", "loss_curves.png", "samples.png"):
        assert mpimg.imread(reports / name).ndim == 3
    assert image_case["result"]["files"]["comparison"] == reports / "comparison.md"
    assert image_case["result"]["primary_metric"] == "domain_fd"
    assert image_case["result"]["notes"] == []


def test_comparison_md_has_every_variant_setting_baseline_and_best(image_case):
    md = (image_case["root"] / "reports" / "comparison.md").read_text()
    for variant, table in IMAGE_SETTINGS.items():
        assert f"| {variant} |" in md
        for key in table:
            assert key in md
    assert "real vs real (baseline)" in md and "0.05 ± 0.01" in md
    assert "3 seeds × N = 256 samples per seed" in md and "256 × 3" in md
    assert "**" not in md.split("## Pairwise comparisons")[0].split("\n", 3)[3], "nothing bolded as best"
    for variant, (key, value) in image_case["best"].items():
        assert f"{key} (lowest mean)" in md, variant
        s = image_case["evals"][variant]["settings"][key]
        assert f"{s['domain_fd_mean']:.4g} ± {s['domain_fd_std']:.2g}" in md
    # without bootstrap replicates (an older evaluation) no difference is claimed
    assert "Not computed: fewer than two seeds with a finite domain_fd" in md
    # every metric as mean ± std (no intervals in these inputs)
    s = image_case["evals"]["vp"]["settings"]["dpm_solver-20"]
    for m in ("domain_fd", "kid", "precision", "recall"):
        assert f"{s[m + '_mean']:.4g} ± {s[m + '_std']:.2g}" in md, m
    assert "143.7" in md, "the adaptive ODE's mean NFE"
    assert "bits/dim" in md and "1.5 ± 0.01" in md and "uniform" in md
    assert "2000" in md and "100.5 s" in md and "220 s (3.7 min)" in md, "training steps and time"
    assert "not computed" in md and "no Inception weights offline" in md
    for fig in ("](fid_vs_nfe.png)", "](loss_curves.png)", "](samples.png)", "](fid_vs_nfe.csv)"):
        assert fig in md
    best_ve = image_case["best"]["ve"][0]
    assert f"](../outputs/samples/ve/{best_ve}/grid.png)" in md, "grids linked by relative path"
    assert image_case["result"]["mlflow_run_id"] in md


def test_metrics_json_holds_the_minima(image_case):
    metrics = json.loads((image_case["root"] / "reports" / "metrics.json").read_text())
    assert image_case["result"]["metrics"] == metrics
    assert metrics["baseline_domain_fd"] == 0.05
    for i, (variant, (key, value)) in enumerate(image_case["best"].items()):
        assert metrics[variant]["setting"] == key
        assert metrics[variant]["domain_fd"] == value
        s = image_case["evals"][variant]["settings"][key]
        assert metrics[variant]["low"] is None is metrics[variant]["high"], "these evaluations carry no interval"
        assert metrics[variant]["nfe"] == pytest.approx(s["nfe"])
        assert metrics[variant]["bits_per_dim"] == pytest.approx(1.5 + 0.1 * i)
        assert metrics[variant]["train_s"] == pytest.approx(100.5 + 60 * i)
        assert metrics[variant]["loss"] == pytest.approx(0.03 + 0.01 * i)
    assert image_case["result"]["best"] == {v: k for v, (k, _) in image_case["best"].items()}


def _leaves(tree) -> list:
    return [x for v in tree.values() for x in _leaves(v)] if isinstance(tree, dict) else [tree]


def test_the_headline_stays_small_enough_for_dvc_exp_show(image_case):
    """reports/metrics.json is the one file dvc.yaml declares as metrics, and `dvc exp show` prints a column per
    leaf: eight per variant and the baseline (the default's 5 variants and tuned: 49), each a scalar, whatever
    the number of settings and seeds (here 3 to 4 settings of 3 seeds each)."""
    metrics = json.loads((image_case["root"] / "reports" / "metrics.json").read_text())
    leaves = _leaves(metrics)
    assert len(leaves) <= 8 * len(IMAGE_VARIANTS) + 1
    assert all(not isinstance(x, (list, dict)) for x in leaves)
    assert max(len(v) for v in metrics.values() if isinstance(v, dict)) == 8


def test_loss_curves_csv_holds_the_logged_losses(image_case):
    with open(image_case["root"] / "reports" / "loss_curves.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == set(IMAGE_VARIANTS)
    vp = [(int(r["step"]), float(r["loss"])) for r in rows if r["variant"] == "vp"]
    assert vp == [(step, pytest.approx(1.0 / (1 + step / 100) + 0.1)) for step in range(50, 501, 50)]


def test_csv_has_one_row_per_variant_and_setting(image_case):
    with open(image_case["root"] / "reports" / "fid_vs_nfe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["variant", "method", "setting", "nfe", "value", "std"]
    assert sorted((r["variant"], r["setting"]) for r in rows) == sorted(
        (v, k) for v, table in IMAGE_SETTINGS.items() for k in table)
    by_key = {(r["variant"], r["setting"]): r for r in rows}
    s = image_case["evals"]["ve"]["settings"]["heun-10"]
    assert float(by_key["ve", "heun-10"]["value"]) == s["domain_fd_mean"]
    assert float(by_key["ve", "heun-10"]["std"]) == s["domain_fd_std"]
    assert by_key["ve", "heun-10"]["nfe"] == "19" and by_key["ve", "heun-10"]["method"] == "heun"


def test_one_comparison_run_with_artifacts_and_tagged_training_runs(image_case):
    client = tracking.client(image_case["uri"])
    key = comparison_run_key(list(IMAGE_VARIANTS))
    runs = client.search_runs([image_case["exp"]], filter_string=f"tags.`{tracking.RUN_KEY_TAG}` = '{key}'")
    assert len(runs) == 1, "a re-run updates the same comparison run"
    assert len(client.search_runs([image_case["exp"]], filter_string="attributes.run_name = 'comparison'")) == 1
    run = runs[0]
    assert run.info.run_id == image_case["first"]["mlflow_run_id"] == image_case["result"]["mlflow_run_id"]
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= set(OUTPUTS)
    for variant, (best_key, value) in image_case["best"].items():
        assert run.data.metrics[f"best_domain_fd/{variant}"] == pytest.approx(value)
        train_run = client.get_run(image_case["run_ids"][variant])
        assert train_run.data.tags["best_setting"] == best_key
        assert train_run.data.metrics["best_domain_fd"] == pytest.approx(value)
    assert len(client.search_runs([image_case["exp"]])) == len(IMAGE_VARIANTS) + 1


def test_two_d_data_without_mlflow(tmp_path):
    params = parse_params(make_params(TOY_VARIANTS, source="toy2d"))
    evals = write_inputs(tmp_path, TOY_SETTINGS, image=False, seed=1, nan_setting=("vp", "ddim-10"))
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "loss_curves.png").write_bytes(b"stale")
    result = build_report(params, root=tmp_path, log_to_mlflow=False)

    reports = tmp_path / "reports"
    assert result["primary_metric"] == "sliced_w2" and result["mlflow_run_id"] is None
    assert not (reports / "loss_curves.png").exists(), "a stale figure from an earlier run is removed"
    assert not (tmp_path / "mlflow.db").exists(), "MLflow is not touched"
    for name in set(OUTPUTS) - {"loss_curves.png"}:
        assert (reports / name).is_file(), name
    md = (reports / "comparison.md").read_text()
    assert "Training loss" in md and "Skipped: MLflow was not contacted" in md
    assert "test log-likelihood" in md and "| -2.8 ± 0.02 | 500 |" in md
    assert "| -2.9 | 500 |" in md, "a null stderr: the mean alone"
    assert "true density on the same points" in md and "| -2.5 |" in md
    assert "Baseline: 1000 random train points per seed against the test split." in md
    assert "N = 1000 samples per seed" in md
    metrics = json.loads((reports / "metrics.json").read_text())
    for variant, (key, value) in expected_best(evals, "sliced_w2").items():
        assert key != "ddim-10" or variant != "vp", "a NaN result is never the best"
        assert metrics[variant]["setting"] == key and metrics[variant]["sliced_w2"] == value
        assert f"{key} (lowest mean)" in md
    assert metrics["vp"]["test_loglik"] == pytest.approx(-2.8)
    with open(reports / "fid_vs_nfe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(map(len, TOY_SETTINGS.values()))
    assert [r["value"] for r in rows if r["setting"] == "ddim-10"] == [""]


def test_unreachable_tracking_server_is_a_note_not_a_crash(tmp_path):
    params = parse_params(make_params(TOY_VARIANTS, source="toy2d", tracking_uri="http://127.0.0.1:9"))
    write_inputs(tmp_path, TOY_SETTINGS, image=False)
    path = tmp_path / "outputs" / "eval" / "subvp" / "metrics.json"
    data = json.loads(path.read_text())
    data["baseline"]["sliced_w2_mean"] = 0.07  # evaluated at another N: one baseline row per variant
    path.write_text(json.dumps(data))
    result = build_report(params, root=tmp_path)
    md = (tmp_path / "reports" / "comparison.md").read_text()
    assert "unreachable" in md and "Nothing logged to MLflow" in md
    assert "| real vs real (vp) |" in md and "| real vs real (subvp) |" in md
    assert result["metrics"]["baseline_sliced_w2"] == pytest.approx(0.06)
    assert not (tmp_path / "reports" / "loss_curves.png").exists()
    assert (tmp_path / "reports" / "loss_curves.csv").read_text() == "variant,step,loss\n", "the header alone"
    assert (tmp_path / "reports" / "samples.png").is_file()
    assert any("unreachable" in n for n in result["notes"])


def test_missing_eval_metrics_names_the_file_and_writes_nothing(tmp_path):
    params = parse_params(make_params(IMAGE_VARIANTS))
    write_inputs(tmp_path, IMAGE_SETTINGS, image=True)
    (tmp_path / "outputs" / "eval" / "vp" / "metrics.json").unlink()
    with pytest.raises(ReportError) as e:
        build_report(params, root=tmp_path, log_to_mlflow=True)
    message = str(e.value)
    assert "outputs/eval/vp/metrics.json" in message and "evaluate stage" in message
    assert "\n" not in message
    assert e.value.missing == [tmp_path.resolve() / "outputs" / "eval" / "vp" / "metrics.json"]
    assert not (tmp_path / "reports").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_grid_and_bad_json_are_report_errors(tmp_path):
    params = parse_params(make_params(IMAGE_VARIANTS))
    evals = write_inputs(tmp_path, IMAGE_SETTINGS, image=True)
    best = expected_best(evals, "domain_fd")["ddpm"][0]
    grid = tmp_path / "outputs" / "samples" / "ddpm" / best / "grid.png"
    grid.unlink()
    with pytest.raises(ReportError, match=rf"outputs/samples/ddpm/{best}/grid.png \(made by the sample stage"):
        build_report(params, root=tmp_path, log_to_mlflow=False)
    (tmp_path / "outputs" / "train" / "ve" / "metrics.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"outputs/train/ve/metrics.json: invalid JSON at line 1"):
        build_report(params, root=tmp_path, log_to_mlflow=False)
    assert not (tmp_path / "reports").exists()


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "pipeline" / "report.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_script_exit_codes(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(make_params(TOY_VARIANTS, source="toy2d")))

    missing = run_script("--params", str(params_file), "--root", str(tmp_path), "--no-mlflow")
    assert missing.returncode == 1, missing.stderr
    assert "outputs/train/vp/metrics.json" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1

    write_inputs(tmp_path, TOY_SETTINGS, image=False)
    ok = run_script("--params", str(params_file), "--root", str(tmp_path), "--no-mlflow")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(tmp_path.resolve() / "reports" / "comparison.md")

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**make_params(TOY_VARIANTS), "sed": 1}))
    assert run_script("--params", str(bad), "--root", str(tmp_path)).returncode == 2


def test_a_diverged_setting_is_shown_as_diverged_not_scored(tmp_path):
    """The evaluate stage writes a setting the sample stage's guard marked (issue 20) without metrics."""
    params = parse_params(make_params(TOY_VARIANTS, source="toy2d"))
    evals = write_inputs(tmp_path, TOY_SETTINGS, image=False, seed=2)
    path = tmp_path / "outputs" / "eval" / "vp" / "metrics.json"
    data = json.loads(path.read_text())
    data["settings"]["ddim-10"] = {"method": "ddim", "steps": 10, "nfe": 10, "seeds": 3, "seed_ids": [0, 1, 2],
                                   "diverged": True, "diverged_seeds": [0, 2], "max_abs": 1.3e5,
                                   "diverged_above": 100.0}
    data["diverged"] = ["ddim-10"]
    path.write_text(json.dumps(data))
    build_report(params, root=tmp_path, log_to_mlflow=False)
    md = (tmp_path / "reports" / "comparison.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| vp | ddim | 10 |"))
    assert "**diverged** (not scored)" in row and "(best)" not in row
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    finite = {k: s["sliced_w2_mean"] for k, s in evals["vp"]["settings"].items() if k != "ddim-10"}
    assert metrics["vp"]["setting"] == min(finite, key=finite.get)
    with open(tmp_path / "reports" / "fid_vs_nfe.csv", newline="") as f:
        assert [r["value"] for r in csv.DictReader(f) if r["setting"] == "ddim-10" and r["variant"] == "vp"] == [""]


def test_pairwise_comparisons_call_ties_and_significant_differences(tmp_path):
    """Evaluations with bootstrap replicates: ddpm and vp differ by 0.02 with paired noise of sd ~0.03 (a tie),
    ve is 2 higher (significant against both), and every variant is significantly above the baseline."""
    evals = write_inputs(tmp_path, IMAGE_SETTINGS, image=True)
    rng = np.random.default_rng(5)
    shared = rng.normal(0, 0.2, 200)  # the same resampled rows move every variant alike
    lowest = {"ddpm": 1.0, "vp": 1.02, "ve": 3.0}
    for variant, data in evals.items():
        data.update(primary_metric="domain_fd", intervals={"level": 0.95},
                    bootstrap={"replicates": 200, "seed": 0, "n": 256, "seed_ids": [0, 1, 2]})
        for i, s in enumerate(data["settings"].values()):
            s["domain_fd_mean"] = lowest[variant] + i  # the first setting is the lowest-mean one
            reps = s["domain_fd_mean"] + shared + rng.normal(0, 0.02, 200)
            s["domain_fd_replicates"] = reps.tolist()
            s["domain_fd_ci"] = list(np.quantile(reps, [0.025, 0.975]))
        base_reps = 0.05 + rng.normal(0, 0.01, 200)
        data["baseline"].update(n=256, domain_fd_replicates=base_reps.tolist(), domain_fd_ci=[0.03, 0.07])
        (tmp_path / "outputs" / "eval" / variant / "metrics.json").write_text(json.dumps(data))
    result = build_report(parse_params(make_params(IMAGE_VARIANTS)), root=tmp_path, log_to_mlflow=False)
    verdicts = {(r.a.name, r.b.name): r.verdict() for r in result["pairwise"].rows}
    assert verdicts == {("ddpm", "vp"): "tie", ("ddpm", "ve"): "ddpm lower", ("vp", "ve"): "vp lower",
                        ("ddpm", "real vs real (baseline)"): "real vs real (baseline) lower",
                        ("vp", "real vs real (baseline)"): "real vs real (baseline) lower",
                        ("ve", "real vs real (baseline)"): "real vs real (baseline) lower"}
    md = (tmp_path / "reports" / "comparison.md").read_text()
    assert "Holm's procedure at α = 0.05 over all 6 comparisons" in md
    assert "Significant differences between variants (domain_fd): ddpm below ve; vp below ve." in md
    assert "Significantly above the real-vs-real baseline: ddpm, vp, ve" in md
    assert "| ddpm (ancestral-1000, NFE 1000) | vp (ode-adaptive, NFE 143.7) | -0.02 |" in md
    assert "N = 256 held-out real samples per seed" in md
    ddpm = evals["ddpm"]["settings"]["ancestral-1000"]
    headline = result["metrics"]["ddpm"]
    assert headline["domain_fd"] == ddpm["domain_fd_mean"]
    assert [headline["low"], headline["high"]] == ddpm["domain_fd_ci"]

    # evaluations that resampled differently are not paired by their replicates (and these hold no per-seed values)
    data = evals["ve"]
    data["bootstrap"]["n"] = 512
    (tmp_path / "outputs" / "eval" / "ve" / "metrics.json").write_text(json.dumps(data))
    result = build_report(parse_params(make_params(IMAGE_VARIANTS)), root=tmp_path, log_to_mlflow=False)
    assert result["pairwise"].rows == [] and "fewer than two seeds" in result["pairwise"].skipped


def test_pairwise_comparisons_over_seeds(tmp_path):
    """No replicates (evaluate.bootstrap 0): paired t-tests over the seeds. Per-seed values share a large seed
    effect, so ddpm (1.0) and vp (1.01) tie, ve (+2) is significantly higher; the baseline is below all."""
    evals = write_inputs(tmp_path, IMAGE_SETTINGS, image=True)
    luck = [0.0, 3.0, -2.0, 1.0, 0.5]  # each seed's own luck, shared by every variant
    noise = np.random.default_rng(3).normal(0, 0.01, (4, 5))
    lowest = {"ddpm": 1.0, "vp": 1.01, "ve": 3.0}
    for j, (variant, data) in enumerate(evals.items()):
        data.update(primary_metric="domain_fd", intervals={"level": 0.95}, bootstrap=None)
        for i, s in enumerate(data["settings"].values()):
            values = [lowest[variant] + i + x + e for x, e in zip(luck, noise[j])]
            s["domain_fd_mean"] = float(np.mean(values))
            s["per_seed"] = {str(k): {"domain_fd": v} for k, v in enumerate(values)}
        data["baseline"]["per_seed"] = {str(k): {"domain_fd": 0.05 + x + e} for k, (x, e) in enumerate(zip(luck, noise[3]))}
        data["baseline"]["domain_fd_mean"] = float(np.mean([v["domain_fd"] for v in data["baseline"]["per_seed"].values()]))
        (tmp_path / "outputs" / "eval" / variant / "metrics.json").write_text(json.dumps(data))
    result = build_report(parse_params(make_params(IMAGE_VARIANTS)), root=tmp_path, log_to_mlflow=False)
    cmp = result["pairwise"]
    assert cmp.method == "seeds" and cmp.seeds == ("0", "1", "2", "3", "4")
    verdicts = {(r.a.name, r.b.name): r.verdict() for r in cmp.rows}
    assert verdicts[("ddpm", "vp")] == "tie" and verdicts[("ddpm", "ve")] == "ddpm lower"
    assert verdicts[("vp", "ve")] == "vp lower"
    assert all(verdicts[(v, "real vs real (baseline)")] == "real vs real (baseline) lower" for v in lowest)
    md = (tmp_path / "reports" / "comparison.md").read_text()
    assert "paired Student-t interval over seeds 0, 1, 2, 3, 4" in md


# ---------------------------------------------------------------------------------------------
# The sweep (params.tune): its trials, sweep.png, and `tuned` against the hand-set vp at equal NFE

SWEEP_TUNE = {  # a valid tune: section: every SDE type of the space has a hand-set variant (vp, ve)
    "space": [{"sde": {"type": "vp", "beta_max": [10.0, 20.0]}},
              {"sde": {"type": "ve", "sigma_min": 0.01, "sigma_max": 50.0},
               "parameterization": {"type": "score", "scale_by_sigma": True}}],
    "lr": [2e-3, 1e-3], "num_trials": 4, "steps": 200, "eval_every": 100, "grace_period": 100,
    "objective": {"sampler": {"method": "ddim", "steps": [10]}, "n_samples": 256, "seeds": 2},
    "samplers": IMAGE_VARIANTS["vp"]["samplers"],
}
# the tune stage's rows (scorelab.tune._rows), as its trials.csv spells them
SWEEP_TRIALS = [
    {"trial": 0, "label": "vp beta_max=10", "sde": "vp", "parameterization": "eps",
     "sde_params": json.dumps({"beta_max": 10.0}), "lr": 2e-3, "ema_decay": 0.999, "objective": 3.25,
     "objective_se": 0.125, "best_objective": 3.25, "objective_nfe": 10.0, "steps": 200, "max_steps": 200,
     "stopped_early": False, "status": "finished", "seconds": 61.5, "mlflow_run_id": "run0",
     "curve": json.dumps([[100, 4.0], [200, 3.25]]), "error": None},
    {"trial": 1, "label": "vp beta_max=20", "sde": "vp", "parameterization": "eps",
     "sde_params": json.dumps({"beta_max": 20.0}), "lr": 2e-3, "ema_decay": 0.999, "objective": 2.5,
     "objective_se": 0.25, "best_objective": 2.5, "objective_nfe": 10.0, "steps": 200, "max_steps": 200,
     "stopped_early": False, "status": "finished", "seconds": 58.0, "mlflow_run_id": "run1",
     "curve": json.dumps([[100, 3.5], [200, 2.5]]), "error": None},
    {"trial": 2, "label": "ve sigma_max=50", "sde": "ve", "parameterization": "score",
     "sde_params": json.dumps({"sigma_max": 50.0, "sigma_min": 0.01}), "lr": 2e-3, "ema_decay": 0.999,
     "objective": 9.0, "objective_se": None, "best_objective": 9.0, "objective_nfe": 19.0, "steps": 100,
     "max_steps": 200, "stopped_early": True, "status": "stopped_early", "seconds": 30.25,
     "mlflow_run_id": "run2", "curve": json.dumps([[100, 9.0]]), "error": None},
    {"trial": 3, "label": "vp beta_max=10", "sde": "vp", "parameterization": "eps",
     "sde_params": json.dumps({"beta_max": 10.0}), "lr": 1e-3, "ema_decay": 0.999, "objective": None,
     "objective_se": None, "best_objective": None, "objective_nfe": None, "steps": 0, "max_steps": 200,
     "stopped_early": False, "status": "error", "seconds": 1.5, "mlflow_run_id": "run3",
     "curve": json.dumps([]), "error": "RuntimeError: CUDA out of memory"},
]
SWEEP_METRICS = {
    "best_objective": 2.5, "best_objective_se": 0.25, "objective_metric": "domain_fd", "best_trial": 1,
    "best_label": "vp beta_max=20", "best_sde": "vp", "best_lr": 2e-3, "trials": 4, "search": "grid",
    "finished": 2, "stopped_early": 1, "failed": 1, "objective_sampler": "ddim", "objective_nfe": 10,
    "objective_n_samples": 256, "objective_seeds": 2, "objective_se_median": 0.1875,
    "rung_agreement": [{"step": 100, "agree": 1, "pairs": 1, "rate": 1.0}], "seconds": 152.3,
    "sweep": "sweep-abc", "mlflow_run_id": "parent", "best_run_id": "run1", "samplers_from": "tune.samplers",
    "handset": "vp",
}
SWEEP_SETTINGS = {**IMAGE_SETTINGS, "tuned": IMAGE_SETTINGS["vp"]}
LUCK = [0.0, 3.0, -2.0, 1.0, 0.5]  # each seed's own luck, shared by every variant (the same noise)
TIE_NOISE = [0.01, -0.01, 0.01, -0.01, 0.0]  # tuned - vp at a tie: mean 0 whatever the seed effect
HIGHER_AT = "ddim-10"  # where tuned is clearly higher (worse) than vp


def write_trials(path: Path, rows: list[dict]) -> None:
    """trials.csv as the tune stage writes it (csv.DictWriter: None as an empty cell, True/False as words)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_sweep_inputs(root: Path) -> dict:
    """The image variants plus `tuned`, with per-seed values at vp's and tuned's settings, and the tune
    stage's trials.csv and metrics.json."""
    evals = write_inputs(root, SWEEP_SETTINGS, image=True, seed=7)
    for variant in ("vp", "tuned"):
        data = evals[variant]
        data.update(primary_metric="domain_fd", intervals={"level": 0.95}, bootstrap=None)
        for i, (key, s) in enumerate(data["settings"].items()):
            shift = (1.0 if key == HIGHER_AT else 0.0) if variant == "tuned" else 0.0
            noise = TIE_NOISE if variant == "tuned" else [0.0] * len(LUCK)
            values = [1.0 + i + shift + x + e for x, e in zip(LUCK, noise)]
            s["domain_fd_mean"] = float(np.mean(values))
            s["per_seed"] = {str(k): {"domain_fd": v} for k, v in enumerate(values)}
        (root / "outputs" / "eval" / variant / "metrics.json").write_text(json.dumps(data))
    write_trials(root / "outputs" / "tune" / "trials.csv", SWEEP_TRIALS)
    (root / "outputs" / "tune" / "metrics.json").write_text(json.dumps(SWEEP_METRICS))
    return evals


def sweep_params(tracking_uri: str = "") -> object:
    return parse_params({**make_params(IMAGE_VARIANTS, tracking_uri=tracking_uri), "tune": SWEEP_TUNE})


@pytest.fixture(scope="module")
def sweep_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    evals = write_sweep_inputs(root)
    tracking.experiment_id(tracking.resolve_tracking_uri("", root), "scorelab-digits", root)  # the local store
    result = build_report(sweep_params(), root=root)  # no training runs in it: notes, no loss curves
    return {"root": root, "evals": evals, "result": result,
            "md": (root / "reports" / "comparison.md").read_text()}


def test_read_trials_round_trips_the_tune_stages_rows(tmp_path):
    path = tmp_path / "trials.csv"
    write_trials(path, SWEEP_TRIALS)
    rows = read_trials(path)
    assert rows == SWEEP_TRIALS
    assert type(rows[0]["trial"]) is int and type(rows[0]["lr"]) is float and rows[0]["stopped_early"] is False
    assert rows[2]["stopped_early"] is True and rows[2]["objective_se"] is None and rows[3]["error"].startswith("Runtime")
    bad = [{**SWEEP_TRIALS[0], "steps": "many"}]
    write_trials(path, bad)
    with pytest.raises(ReportError, match=r"trials.csv: line 2, column steps: invalid literal"):
        read_trials(path)


def test_sweep_section_lists_every_trial_and_marks_the_winner(sweep_case):
    md = sweep_case["md"]
    assert "## The sweep" in md
    sweep = md.split("## The sweep")[1].split("\n## ")[0]
    assert "4 trials (grid search, 2 ran to the end, 1 stopped early by ASHA, 1 failed)" in sweep
    assert "256 samples per seed × 2 seeds drawn with ddim at NFE 10" in sweep
    assert "standard error over seeds is 0.1875" in sweep
    assert "at step 100, 1 of 1 pairs of trials that ran to the end were already in their final order (100%)" in sweep
    assert "The sweep took 152 s (2.5 min)" in sweep
    assert "retrained at the full `train:` budget (" in sweep and "sampled with the samplers of `tune.samplers`" in sweep
    for r in SWEEP_TRIALS:
        row = next(line for line in sweep.splitlines() if line.startswith(f"| {r['trial']} | {r['label']}"))
        assert f"| {r['status']} |" in row and f"| {r['steps']} / {r['max_steps']} |" in row
        assert ("(winner)" in row) == (r["trial"] == SWEEP_METRICS["best_trial"])
    assert "| 1 | vp beta_max=20 (winner) | 0.002 | 0.999 | 2.5 ± 0.25 | 200 / 200 | finished | 58.0 |" in sweep
    assert "| 9 |" in sweep and "| — |" in sweep, "no se: the mean alone; no objective: a dash"
    assert "trial 3: RuntimeError: CUDA out of memory" in sweep
    assert "](sweep.png)" in sweep


def test_sweep_png_is_written_and_logged(sweep_case):
    reports = sweep_case["root"] / "reports"
    png = reports / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    assert mpimg.imread(png).ndim == 3
    assert sweep_case["result"]["files"]["sweep"] == png
    assert not [p for p in reports.iterdir() if p.name.endswith(".tmp")], "no temporary files left behind"
    client = tracking.client(tracking.resolve_tracking_uri("", sweep_case["root"]))
    artifacts = {a.path for a in client.list_artifacts(sweep_case["result"]["mlflow_run_id"])}
    assert {"sweep.png", "trials.csv", "comparison.md", "metrics.json"} <= artifacts


def test_tuned_against_the_handset_at_equal_nfe(sweep_case):
    against = sweep_case["result"]["vs_handset"]
    assert against.handset == "vp" and against.untested == []
    verdicts = {r.a.setting: r for r in against.comparison.rows}
    assert list(verdicts) == list(IMAGE_SETTINGS["vp"])
    from scorelab.report_data import tuned_verdict

    assert {k: tuned_verdict(r) for k, r in verdicts.items()} == {
        k: "tuned higher" if k == HIGHER_AT else "tie" for k in IMAGE_SETTINGS["vp"]}
    assert verdicts[HIGHER_AT].diff.estimate == pytest.approx(1.0)
    assert against.higher() == [HIGHER_AT]
    md = sweep_case["md"]
    assert "### tuned against vp at equal NFE" in md and "paired Student-t interval over seeds 0, 1, 2, 3, 4" in md
    assert f"| {HIGHER_AT} | 10 |" in md and "| tuned higher |" in md
    assert (f"tuned is worse than vp beyond the noise: significantly higher at "
            f"{HIGHER_AT} (no worse than vp at 3 of 4 settings)") in md
    metrics = json.loads((sweep_case["root"] / "reports" / "metrics.json").read_text())
    assert metrics["tuned"]["vs_handset"] == "no worse than vp at 3 of 4 settings"
    assert "vs_handset" not in metrics["vp"]
    leaves = _leaves(metrics)  # one more leaf than the other variants' eight: still small for `dvc exp show`
    assert len(leaves) == 8 * len(SWEEP_SETTINGS) + 2 and all(not isinstance(x, (list, dict)) for x in leaves)


def test_no_handset_variant_is_said_and_skipped(tmp_path):
    write_sweep_inputs(tmp_path)
    path = tmp_path / "outputs" / "tune" / "metrics.json"
    path.write_text(json.dumps({**SWEEP_METRICS, "handset": None}))
    result = build_report(sweep_params(), root=tmp_path, log_to_mlflow=False)
    md = (tmp_path / "reports" / "comparison.md").read_text()
    assert "None: no hand-set variant of the winner's SDE type (vp) among the variants" in md
    assert result["vs_handset"].comparison is None and result["metrics"]["tuned"]["vs_handset"] is None


def test_missing_trials_csv_names_the_file_and_writes_nothing(tmp_path):
    write_sweep_inputs(tmp_path)
    (tmp_path / "outputs" / "tune" / "trials.csv").unlink()
    with pytest.raises(ReportError) as e:
        build_report(sweep_params(), root=tmp_path)
    message = str(e.value)
    assert "outputs/tune/trials.csv" in message and "python pipeline/tune.py --params params.yaml" in message
    assert e.value.missing == [tmp_path.resolve() / "outputs" / "tune" / "trials.csv"]
    assert not (tmp_path / "reports").exists() and not (tmp_path / "mlflow.db").exists()


def test_without_a_sweep_no_sweep_section_and_a_stale_sweep_png_is_removed(tmp_path):
    write_inputs(tmp_path, TOY_SETTINGS, image=False)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "sweep.png").write_bytes(b"stale")
    result = build_report(parse_params(make_params(TOY_VARIANTS, source="toy2d")), root=tmp_path, log_to_mlflow=False)
    assert "## The sweep" not in (tmp_path / "reports" / "comparison.md").read_text()
    assert not (tmp_path / "reports" / "sweep.png").exists() and result["vs_handset"] is None


def test_chosen_ema_and_its_scores_are_in_the_training_table_and_one_key_in_metrics_json(tmp_path):
    """A variant trained with EMA profiles: the training table shows the chosen EMA and every candidate's
    objective (the chosen one bold); reports/metrics.json gets one key, `ema`, for that variant alone."""
    params = parse_params(make_params(IMAGE_VARIANTS))
    write_inputs(tmp_path, IMAGE_SETTINGS, image=True)
    path = tmp_path / "outputs" / "train" / "vp" / "metrics.json"
    train = json.loads(path.read_text())
    path.write_text(json.dumps({**train, "ema_chosen": "power-0.10", "ema_select_seconds": 12.5,
                                "ema_scores": {"ema-0.995": [1.5, 0.04], "power-0.05": [1.25, 0.03],
                                               "power-0.10": [1.125, 0.05]}}))
    result = build_report(params, root=tmp_path, log_to_mlflow=False)
    md = (tmp_path / "reports" / "comparison.md").read_text()
    training = md.split("## Training")[1].split("\n## ")[0]
    assert "| EMA | EMA objective ± se |" in training
    vp_row = next(line for line in training.splitlines() if line.startswith("| vp |"))
    assert "| power-0.10 | ema-0.995 1.5 ± 0.04, power-0.05 1.25 ± 0.03, **power-0.10 1.125 ± 0.05** |" in vp_row
    ddpm_row = next(line for line in training.splitlines() if line.startswith("| ddpm |"))
    assert "| — | — |" in ddpm_row
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert result["metrics"] == metrics
    assert metrics["vp"]["ema"] == "power-0.10"
    assert all("ema" not in metrics[v] for v in IMAGE_VARIANTS if v != "vp")
    # a chosen EMA that was not scored is an error naming the key
    path.write_text(json.dumps({**train, "ema_chosen": "power-0.20", "ema_scores": {"ema-0.995": [1.5, 0.04]}}))
    with pytest.raises(ReportError, match=r"outputs/train/vp/metrics.json.ema_chosen: must name one of ema_scores"):
        build_report(params, root=tmp_path, log_to_mlflow=False)


def test_without_ema_profiles_the_training_table_has_no_ema_columns(image_case):
    md = (image_case["root"] / "reports" / "comparison.md").read_text()
    assert "| variant | steps | time | final loss | MLflow run |" in md and "EMA objective" not in md
