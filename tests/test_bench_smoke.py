"""Each benchmark entry point runs at a tiny size, so the scripts cannot rot (their numbers are not checked)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_train_throughput_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--steps", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from scorelab.runtime import bf16_problem

    settings = 3 + (bf16_problem(torch.device("cpu")) is None)  # float32 1x1, 1x2, 2x1; bf16 2x1 where it runs
    assert (tmp_path / "train_throughput.csv").read_text().count("\n") == 1 + settings


def test_gpu_train_runs_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_train.py"), "--steps", "2", "--cpu-smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = (tmp_path / "gpu_train.csv").read_text().splitlines()
    assert rows[0].startswith("what,bf16,method") and len(rows) == 1 + 3  # training + DDIM + DPM-Solver++


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_quality_vs_diffusers_runs(tmp_path):
    _run("quality_vs_diffusers.py", "--steps", "3", "--scorelab-lrs", "2e-3", "--diffusers-lrs", "1e-3", "3e-3",
         "--ema-profiles", "0.1", "--nfe", "2", "--ancestral", "3", "--seeds", "0", "1", "--n", "16", "--select-n", "8",
         "--select-nfe", "2", "--slice", "0.2", "--threads", "1", "--classifier-epochs", "1",
         "--save-model", str(tmp_path / "model.pt"), "--out", str(tmp_path))
    import csv

    rows = list(csv.DictReader(open(tmp_path / "quality_vs_diffusers.csv")))
    scores = {(r["budget"], r["side"], r["sampler"], r["nfe"]): r for r in rows if r["budget"] and "ratio" not in r["side"]}
    # 3 models (scorelab, diffusers at equal images, diffusers at equal time) x (DDIM-2, DPM-Solver++-2, ancestral-3)
    assert len(scores) == 9 and sum(r["side"] == "real-vs-real" for r in rows) == 1
    ratios = [r for r in rows if r["side"] == "ratio scorelab/diffusers"]
    assert [(r["budget"], r["nfe"]) for r in ratios] == [("images", "2"), ("images", "best"), ("wall", "2"), ("wall", "best")]
    for r in ratios:  # each ratio is of the rows it names (scorelab's equal-time model is its equal-images one)
        (a, na), (b, nb) = (pair.rsplit("-", 1) for pair in r["sampler"].split(" vs "))
        ours, peer = scores[("images", "scorelab", a, na)], scores[(r["budget"], "diffusers", b, nb)]
        assert float(r["mean"]) == pytest.approx(float(ours["mean"]) / float(peer["mean"]), rel=2e-3)
        per_seed = [float(v) for v in r["per_seed"].split()]
        lo, hi = map(float, r["per_seed_mean_ci95"].split())  # about the mean of the two seeds' ratios
        assert lo < sum(per_seed) / 2 < hi and hi - lo > abs(per_seed[0] - per_seed[1])
    train = list(csv.DictReader(open(tmp_path / "quality_vs_diffusers_train.csv")))
    assert [(r["budget"], r["side"], r["lr"]) for r in train] == [
        ("images", "scorelab", "0.002"), ("images", "diffusers", "0.001"), ("images", "diffusers", "0.003"),
        ("wall", "diffusers", train[1 if train[1]["chosen"] == "True" else 2]["lr"])]
    assert train[0]["selection"].split()[0].startswith("ema=") and "power-0.10=" in train[0]["selection"]
    assert [r["chosen"] for r in train[1:3]].count("True") == 1
    from scorelab.checkpoint import load_trained

    assert load_trained(tmp_path / "model.pt").variant.sde.type == "ddpm"


def test_quality_vs_diffusers_refuses_a_scored_selection_seed(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "quality_vs_diffusers.py"), "--seeds", "0", "1",
                           "--select-seed", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--select-seed 1" in proc.stderr and not any(tmp_path.iterdir())


def test_overheads_runs(tmp_path):
    _run("overheads.py", "--variants", "ddpm", "--sample-batch", "4", "--steps", "2", "--methods", "ddim", "heun",
         "--train-steps", "2", "--repeats", "1", "--matmul-seconds", "0.02", "--threads", "1", "--out", str(tmp_path))
    text = (tmp_path / "overheads.csv").read_text()
    # peak, 2 FLOP counts, the training step with the fused and the per-tensor Adam, 2 samplers
    assert text.count("\n") == 1 + 1 + 2 + 2 + 2


def test_samplers_one_net_runs(tmp_path):
    _run("samplers_one_net.py", "--train-seconds", "1", "--nfe", "3", "--seeds", "0", "--n", "16", "--ode-tol", "0.1",
         "--scorelab-methods", "ddim", "heun", "pc", "--diffusers-schedulers", "ddim", "euler", "heun",
         "--threads", "1", "--classifier-epochs", "1", "--out", str(tmp_path))
    rows = (tmp_path / "samplers_one_net.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 + 1 + 3 + 1  # scorelab methods, the ODE, diffusers schedulers, the baseline


@pytest.mark.timeout(1200)
def test_gpu_check_runs_on_cpu(tmp_path):
    """bench/gpu_check.py --cpu-smoke: the train, preemption and sample stages through one Ray, at a tiny size.
    Several stage processes on 2 cores: minutes, not seconds."""
    import csv

    import torch

    script = str(REPO / "bench" / "gpu_check.py")
    if not torch.cuda.is_available():  # without --cpu-smoke it refuses, in one line, where there is no GPU
        refused = subprocess.run([sys.executable, script, "--out", str(tmp_path)], capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "no CUDA device" in refused.stderr and not list(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, script, "--cpu-smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=1100)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "gpu_check_cpu_smoke.csv")))
    train = [r for r in rows if r["what"] == "train"]
    assert sorted((r["net"], r["precision"]) for r in train) == [("cifar32", "fp32"), ("digits", "fp32")]
    assert all(float(r["images_per_s"]) > 0 and float(r["gflop_per_image"]) > 0 and float(r["mfu_bf16"]) > 0
               for r in train)
    (pre,) = [r for r in rows if r["what"] == "preempt"]
    assert pre["exit_code"] == "143" and pre["ok"] == "True" and pre["metric_points_ok"] == "True"
    assert 0 < int(pre["resumed_from_step"]) == int(pre["checkpointed_step"]) < int(pre["final_step"]) \
        == int(pre["steps"])
    assert pre["bit_equal"] == "True", "resumed on the CPU: the same weights as the uninterrupted run"
    samples = {r["role"]: r for r in rows if r["what"] == "sample"}
    assert int(samples["sample-smoke"]["n"]) == 128 and int(samples["sample-cpu-worker"]["n"]) == 128
    assert float(samples["sample-smoke"]["samples_per_s"]) > 0 and float(samples["sample-smoke"]["x_cpu_worker"]) > 0
    assert "goal: GPU samples/s >= 50x one CPU worker's" in proc.stdout


def test_lr_schedules_runs(tmp_path):
    _run("lr_schedules.py", "--configs", "cosine:3", "linear:2:0.5", "--n", "16", "--seeds", "0", "1",
         "--classifier-epochs", "1", "--out", str(tmp_path))
    rows = (tmp_path / "lr_schedules.csv").read_text().splitlines()
    assert len(rows) == 1 + 1 + 2 * 4  # header, the baseline, 2 configs x (ddpm's 2 + vp's 2 settings)
    assert rows[-1].startswith("vp,linear,2,0.5,dpm_solver-20,20,")


def test_ancestral_draws_runs(tmp_path):
    _run("ancestral_draws.py", "--steps", "2", "--sample-steps", "3", "--n", "8", "--seeds", "0", "1",
         "--classifier-epochs", "1", "--out", str(tmp_path))
    import csv

    rows = {r["setting"]: r for r in csv.DictReader(open(tmp_path / "ancestral_draws.csv"))}
    assert len(rows) == 7 and all(len(r["fd_per_seed"].split()) == 2 for r in rows.values())
    # The same algorithm with the same noise: diffusers' DDPMScheduler fed scorelab's stream scores what scorelab's
    # sampler does (the samples agree to float rounding, the uint8 quantisation of the evaluator aside)
    ours = [float(v) for v in rows["scorelab ancestral"]["fd_per_seed"].split()]
    theirs = [float(v) for v in rows["DDPMScheduler trailing, scorelab's noise"]["fd_per_seed"].split()]
    assert theirs == pytest.approx(ours, rel=2e-3)


def test_recipe_ablations_runs(tmp_path):
    _run("recipe_ablations.py", "--configs", "min_snr5", "diffusers_recipe_2e-3", "--train-seeds", "0", "1",
         "--steps", "2", "--profiles", "0.1", "--nfe", "2", "--ancestral", "3", "--n", "8", "--seeds", "100", "101",
         "--classifier-epochs", "1", "--out", str(tmp_path))
    import csv

    rows = list(csv.DictReader(open(tmp_path / "recipe_ablations.csv")))
    ours = [(seed, candidate, sampler) for seed in "01" for candidate in ("ema", "power-0.10")
            for sampler in ("dpm_solver", "ancestral")]
    peer = [(seed, "ema", sampler) for seed in "01" for sampler in ("dpm_solver", "ancestral")]
    assert [(r["config"], r["train_seed"], r["candidate"], r["sampler"]) for r in rows] == [
        ("min_snr5", *row) for row in ours] + [("diffusers_recipe_2e-3", *row) for row in peer]
    assert all(len(r["fd_per_seed"].split()) == 2 for r in rows)
    assert rows[0]["fd_per_seed"] != rows[4]["fd_per_seed"], "another training seed trains another network"
    assert rows[-2]["fd_per_seed"] != rows[-1]["fd_per_seed"], "the peer's ancestral rows are its DDPMScheduler's"


def test_recipe_ablations_trains_the_yardsticks_with_three_seeds(tmp_path):
    _run("recipe_ablations.py", "--configs", "min_snr5", "diffusers_recipe_2e-3", "--steps", "1", "--profiles",
         "--nfe", "2", "--n", "8", "--seeds", "100", "--classifier-epochs", "1", "--out", str(tmp_path))
    import csv

    rows = list(csv.DictReader(open(tmp_path / "recipe_ablations.csv")))
    assert [(r["config"], r["train_seed"]) for r in rows] == [
        ("min_snr5", "0"), ("diffusers_recipe_2e-3", "0"), ("diffusers_recipe_2e-3", "1"), ("diffusers_recipe_2e-3", "2")]


def test_recipe_ablations_base_step_is_the_trainers(tmp_path):
    """With the weight 1, the ablations' weighted loss is benchlib.ScorelabTrainer's own (losses.dsm_loss, std2):
    the same parameters after a few steps; the min-SNR weight changes them."""
    sys.path.insert(0, str(REPO / "bench"))
    import benchlib
    import recipe_ablations as ra

    params = benchlib.load_params(REPO / "params.yaml", tmp_path / "data")
    trainers = [benchlib.ScorelabTrainer(params, "ddpm", lr=1e-3, steps=50, loss_weight=weight)
                for weight in (None, torch.ones_like, ra.WEIGHTINGS["min_snr5"])]
    for _ in range(3):
        for trainer in trainers:
            trainer.step()
    ref, same, other = (torch.cat([p.detach().flatten() for p in t.model.parameters()]) for t in trainers)
    torch.testing.assert_close(same, ref, rtol=1e-5, atol=1e-6)
    assert (other - ref).abs().max() > 1e-4


def test_stratified_chain_times_cover_every_stratum_once():
    """recipe_ablations' stratified_times: B times of the 1000-level chain, one in each B-th of its levels, and over
    many batches every level drawn equally often (the marginal of an iid uniform draw)."""
    sys.path.insert(0, str(REPO / "bench"))
    import benchlib
    from scorelab.sde import get_sde

    sde = get_sde("ddpm", num_steps=1000)
    chain = sde.discrete_times()
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(chain))
    for _ in range(400):
        level = torch.searchsorted(chain.float(), benchlib.stratified_chain_times(sde, 125, gen))
        assert torch.equal(torch.sort(level // 8).values, torch.arange(125)), "one level in each stratum of 8"
        counts += torch.bincount(level, minlength=len(chain))
    # 50 draws per level expected; a chi-square of 999 degrees of freedom lies below 1,150 with probability > 0.999
    chi2 = float(((counts - 50) ** 2 / 50).sum())
    assert chi2 < 1150, chi2
