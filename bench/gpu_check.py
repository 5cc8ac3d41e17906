"""One-GPU check of the real stages: train (fp32 and bf16), preemption and resume, sampling, in one command.

    .venv/bin/python bench/gpu_check.py [--out docs/bench] [--work DIR]      # needs a CUDA device
    .venv/bin/python bench/gpu_check.py --cpu-smoke --out /tmp/x             # the same path, tiny, on the CPU

Everything goes through the stage scripts (pipeline/prepare.py, train.py, sample.py) as subprocesses, with
params files it writes into a work folder (a temporary one unless --work), the way a user runs them. The
script itself hosts one local Ray (all CPUs, the GPU) that every stage attaches to through ray.address
(token authentication with a token of its own, passed to the stages in the environment), so no stage pays
for starting Ray. What it does:

1. the card's practical matmul rates: square torch.mm in fp32, TF32 and bf16 (the best of a few sizes);
2. trains, through Ray Train on 1 GPU worker, in fp32 and then bf16 (train.bf16: autocast):
   - `digits`: the default of params.yaml (digits at 8x8, variant --variant, its U-Net, batch 128);
   - `cifar32`: presets/cifar10.yaml's DDPM network (35.7M parameters, attention at 16x16, dropout 0.1,
     hflip, batch 128) on random 32x32 RGB images (a folder of PNGs through data.source: folder; only the
     throughput matters);
   images/s is read back from the images_per_s metric the loop logs to MLflow, over the logging windows after
   the first (the first holds CUDA start-up); model FLOP utilisation = images/s x the forward+backward FLOPs
   of one image's loss (torch.utils.flop_counter on the trained model) / the measured matmul rate;
3. preemption: the cifar32 fp32 run again, in a storage folder of its own, SIGTERMed once its log shows
   --preempt-at of the steps done; checks the stage exits 143 naming the step it checkpointed, that the rerun
   resumes there (MLflow tag resumed_from_step) and ends at the configured step with every loss point logged
   once, and compares its weights with the uninterrupted run of step 2 (same configuration): bit for bit is
   required on the CPU (--cpu-smoke), reported on the GPU (its kernels need not be deterministic);
4. samples --sample-n digits (seed 0, --sample-method/--sample-steps) from the digits fp32 model through the
   sample stage on the GPU (ray.use_gpu: sample.gpu_batch_size a chunk), then a short run of the same model and
   sampler on one CPU worker (ray.use_gpu: false, one task, one thread), and prints the ratio of samples/s.
   Samples/s = samples / the chunks' sampler time (the stage's manifest; includes the first chunk's warm-up),
   and "steady" = the same over the chunks after the first.

The defaults (digits 300 steps, cifar32 300 steps at batch 128 per precision, 10k samples) are sized for
8 minutes on one GPU; the script prints its total against that budget. Writes <out>/gpu_check.csv
(--cpu-smoke: gpu_check_cpu_smoke.csv) and prints markdown tables with the machine, date and command.
Goals (a benchmark: reported, never the exit status): bf16 MFU >= 30% on cifar32; GPU samples/s >= 50x one
CPU worker's. Exit status: 0 when every stage ran on the device it should and the preemption checks held,
1 otherwise, 2 without a CUDA device (unless --cpu-smoke).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
PREEMPTED_EXIT = 143  # pipeline/train.py: stopped by SIGTERM after checkpointing the step it was at
GOAL_MFU_BF16 = 0.30
GOAL_SAMPLE_RATIO = 50.0


@dataclass(frozen=True)
class Sizes:
    """What one run costs: the GPU defaults fit in 8 minutes on one H200; the smoke in 1-2 on 2 CPU cores."""

    digits_steps: int
    digits_log_every: int
    cifar_steps: int
    cifar_log_every: int
    cifar_batch: int
    cifar_images: int  # random 32x32 PNGs (10% of them become the test split)
    cifar_net: dict[str, Any] | None  # None: the cifar10 preset's DDPM U-Net
    sample_n: int
    cpu_sample_n: int
    cpu_sample_batch: int  # chunk size of the CPU runs: a multiple of the CPU's 64-sample network call (else padded)
    gpu_batch_size: int
    cpus_per_worker: int
    matmul_sizes: tuple[int, ...]
    matmul_seconds: float
    stage_timeout_s: float


def sizes_for(args: argparse.Namespace) -> Sizes:
    if args.cpu_smoke:
        return Sizes(digits_steps=6, digits_log_every=2, cifar_steps=60, cifar_log_every=5, cifar_batch=16,
                     cifar_images=64,
                     cifar_net={"type": "unet", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                "attn_resolutions": [16], "dropout": 0.1},
                     sample_n=args.sample_n or 128, cpu_sample_n=128, cpu_sample_batch=64, gpu_batch_size=64,
                     cpus_per_worker=1, matmul_sizes=(256, 512), matmul_seconds=0.2, stage_timeout_s=300)
    cpus = os.cpu_count() or 2
    return Sizes(digits_steps=args.digits_steps, digits_log_every=max(1, args.digits_steps // 12),
                 cifar_steps=args.cifar_steps, cifar_log_every=max(1, args.cifar_steps // 10),
                 cifar_batch=args.cifar_batch, cifar_images=640, cifar_net=None,
                 sample_n=args.sample_n or 10_000, cpu_sample_n=1024, cpu_sample_batch=256,
                 gpu_batch_size=args.gpu_batch_size, cpus_per_worker=max(1, min(8, cpus // 2)),
                 matmul_sizes=(2048, 4096, 8192), matmul_seconds=1.0, stage_timeout_s=600)


# ---------------------------------------------------------------------------------------------
# Running the stages


class CheckFailed(RuntimeError):
    """A stage failed or a check did not hold: one line for the summary."""


@dataclass
class StageRun:
    rc: int
    seconds: float
    stdout: Path
    stderr: Path

    def tail(self, n: int = 2500) -> str:
        return (self.stdout.read_text()[-n:] + "\n--- stderr ---\n" + self.stderr.read_text()[-n:]).strip()


class Work:
    """The work folder: params files, data, Ray storage, MLflow store, stage outputs and their logs."""

    def __init__(self, root: Path, env: dict[str, str], timeout_s: float):
        self.root, self.env, self.timeout_s = root, env, timeout_s
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.uri = f"sqlite:///{root / 'mlflow.db'}"

    def _cmd(self, script: str, args: list[str]) -> list[str]:
        return [sys.executable, str(REPO / "pipeline" / script), *args]

    def start(self, name: str, script: str, *args: str) -> tuple[subprocess.Popen, StageRun]:
        out, err = self.logs / f"{name}.out", self.logs / f"{name}.err"
        with open(out, "w") as fo, open(err, "w") as fe:  # files, not pipes: a full pipe would stall the stage
            proc = subprocess.Popen(self._cmd(script, list(args)), stdout=fo, stderr=fe, cwd=self.root, env=self.env,
                                    start_new_session=True)
        return proc, StageRun(-1, 0.0, out, err)

    def run(self, name: str, script: str, *args: str, expect: int | None = 0) -> StageRun:
        say(f"  {script} {' '.join(args)}")
        tick = time.perf_counter()
        proc, run = self.start(name, script, *args)
        try:
            run.rc = proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise CheckFailed(f"{name}: {script} ran past {self.timeout_s:g}s (logs: {run.stdout}, {run.stderr})")
        run.seconds = time.perf_counter() - tick
        if expect is not None and run.rc != expect:
            raise CheckFailed(f"{name}: {script} exited {run.rc} (expected {expect}):\n{run.tail()}")
        return run

    def params(self, name: str, p: dict[str, Any]) -> Path:
        import yaml

        path = self.root / f"params-{name}.yaml"
        path.write_text(yaml.safe_dump(p, sort_keys=False))
        return path


def _rel(path: str) -> str:
    """path relative to the repository when inside it (the command as run from the root)."""
    p = Path(path).absolute()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def say(line: str) -> None:
    print(line, flush=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a stage this script started (start_new_session: its pid is its process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def ray_head(num_cpus: int, num_gpus: int) -> Iterator[tuple[str, dict[str, str]]]:
    """A local Ray in this process for every stage to attach to: (its GCS address, the stages' environment).
    Ray's token authentication stays on, with a token of this run's own in the environment (not written to
    ~/.ray), unless the caller set RAY_AUTH_MODE or a token already."""
    env = dict(os.environ)
    if "RAY_AUTH_MODE" not in env:
        env["RAY_AUTH_MODE"] = "token"
        if not (env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH")):
            env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN") if k in env})
    import ray  # after the environment: Ray reads its authentication mode once, when first imported
    ctx = ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                   logging_level="WARNING", log_to_driver=False)
    try:
        yield ctx.address_info["gcs_address"], env
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Params files


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def digits_params(work: Work, args, sz: Sizes, address: str, gpu: bool, bf16: bool, tag: str) -> dict[str, Any]:
    """params.yaml's digits default, one variant, on 1 worker (1 GPU), with this run's paths."""
    base = _yaml(Path(args.params))
    variant = {**base["variants"][args.variant],
               "samplers": [{"method": args.sample_method, "steps": [args.sample_steps]}]}
    return {
        "seed": base.get("seed", 0),
        "data": {**base.get("data", {}), "out_dir": str(work.root / "data")},
        "train": {**base.get("train", {}), "steps": sz.digits_steps, "log_every": sz.digits_log_every,
                  "checkpoint_every": sz.digits_steps, "sample_every": 0, "bf16": bf16},
        "ray": _ray(base, work, address, gpu, sz, tag),
        "mlflow": {"tracking_uri": work.uri, "experiment": f"gpu-check-{tag}"},
        "sample": {**base.get("sample", {}), "seeds": [0], "workers": 1, "gpu_batch_size": sz.gpu_batch_size},
        "demo": base.get("demo", {}),
        "variants": {args.variant: variant},
    }


def cifar_params(work: Work, args, sz: Sizes, address: str, gpu: bool, bf16: bool, tag: str) -> dict[str, Any]:
    """presets/cifar10.yaml's ddpm variant and train section on random 32x32 RGB images."""
    preset = _yaml(REPO / "presets" / "cifar10.yaml")
    variant = dict(preset["variants"]["ddpm"])
    if sz.cifar_net is not None:
        variant["net"] = sz.cifar_net
    # The train stage draws its final sample grid (64 images) on the driver's CPU with the cheapest sampler:
    # 2 DDIM steps keep that to seconds for a 35.7M-parameter network.
    variant["samplers"] = [{"method": "ddim", "steps": [2]}]
    return {
        "seed": preset.get("seed", 0),
        "data": {"source": "folder", "folder": str(work.root / "random32"), "image_size": 32, "test_fraction": 0.1,
                 "hflip": True, "out_dir": str(work.root / "data")},
        "train": {**preset["train"], "steps": sz.cifar_steps, "batch_size": sz.cifar_batch,
                  "log_every": sz.cifar_log_every, "checkpoint_every": sz.cifar_steps, "sample_every": 0, "bf16": bf16},
        "ray": _ray(preset, work, address, gpu, sz, tag),
        "mlflow": {"tracking_uri": work.uri, "experiment": f"gpu-check-{tag}"},
        "demo": preset.get("demo", {}),
        "variants": {"ddpm": variant},
    }


def _ray(base: dict[str, Any], work: Work, address: str, gpu: bool, sz: Sizes, tag: str) -> dict[str, Any]:
    return {"address": address, "num_workers": 1, "cpus_per_worker": sz.cpus_per_worker, "use_gpu": gpu,
            "placement_strategy": "PACK", "storage_path": str(work.root / "ray" / tag), "max_failures": 0}


def write_random_images(folder: Path, n: int, seed: int = 0) -> None:
    """n random 32x32 RGB PNGs: the shape of CIFAR-10, none of its content."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


# ---------------------------------------------------------------------------------------------
# Measurements


def matmul_peaks(device: str, sizes: tuple[int, ...], seconds: float) -> dict[str, tuple[float, int]]:
    """{precision: (GFLOP/s, size)}: square torch.mm in fp32 (TF32 off), TF32 and bf16 on the GPU; on the CPU
    (--cpu-smoke, fp32 only) the fp32 rate stands for bf16 too."""
    import torch

    import benchlib

    out = {}
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        out["fp32"] = benchlib.peak_matmul(sizes, seconds, device, torch.float32)
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            out["tf32"] = benchlib.peak_matmul(sizes, seconds, device, torch.float32)
            out["bf16"] = benchlib.peak_matmul(sizes, seconds, device, torch.bfloat16)
        else:
            out["bf16"] = out["fp32"]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def train_flops_per_image(model_path: Path) -> tuple[float, int]:
    """(forward+backward FLOPs of one image's training loss, parameters) of a trained model, counted on the CPU
    by torch.utils.flop_counter (matmuls, convolutions, attention; not norms or activations)."""
    import torch

    import benchlib
    from scorelab.checkpoint import load_trained
    from scorelab.losses import dsm_loss
    from scorelab.nets import count_parameters

    trained = load_trained(model_path)
    model = trained.model.train()
    x0 = torch.rand(2, *trained.data_shape) * 2 - 1
    loss = trained.variant.loss
    flops = benchlib.count_flops(lambda: dsm_loss(model, model.sde, x0, weighting=loss.weighting,
                                                  reduction=loss.reduction).loss.backward())
    return flops / 2, count_parameters(model.net)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def steady_rate(uri: str, run_id: str, batch: int) -> tuple[float, int]:
    """(images/s, windows used): the images of the logging windows after the first (which holds CUDA start-up)
    over their time, from the images_per_s each window logged; every window when there is only one."""
    windows, prev = [], 0
    for step, rate in metric_history(uri, run_id, "images_per_s"):
        windows.append(((step - prev) * batch, (step - prev) * batch / max(rate, 1e-12)))
        prev = step
    use = windows[1:] or windows
    return sum(w[0] for w in use) / sum(w[1] for w in use), len(use)


def mean_metric(uri: str, run_id: str, key: str) -> float:
    values = [v for _, v in metric_history(uri, run_id, key)[1:]] or [v for _, v in metric_history(uri, run_id, key)]
    return sum(values) / len(values) if values else float("nan")


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run(run_id).data.tags


# ---------------------------------------------------------------------------------------------
# The three parts


def train_one(work: Work, name: str, params: dict[str, Any], variant: str, peaks, device: str) -> dict[str, Any]:
    """One train stage run, timed from its MLflow windows; the row for the CSV."""
    path = work.params(name, params)
    out = work.root / "out" / name
    run = work.run(name, "train.py", "--params", str(path), "--variant", variant, "--root", str(work.root),
                   "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    run_id = metrics["mlflow_run_id"]
    ran_on = run_tags(work.uri, run_id).get("device", "")  # the worker's torch device, as the loop tags it
    if ran_on and ran_on != device:
        raise CheckFailed(f"{name}: the train worker ran on {ran_on}, expected {device}")
    batch = params["train"]["batch_size"]
    rate, windows = steady_rate(work.uri, run_id, batch)
    flops, n_params = train_flops_per_image(out / "model.pt")
    gflops = rate * flops / 1e9
    bf16 = params["train"]["bf16"]
    row = {"what": "train", "net": name.split("-")[0], "precision": "bf16" if bf16 else "fp32",
           "device": ran_on or f"{device} (untagged)",
           "steps": metrics["steps"], "batch": batch, "parameters": n_params, "gflop_per_image": round(flops / 1e9, 4),
           "images_per_s": round(rate, 1), "windows": windows, "gflops": round(gflops, 1),
           "mfu_bf16": round(gflops / peaks["bf16"][0], 4), "frac_fp32_peak": round(gflops / peaks["fp32"][0], 4),
           "frac_tf32_peak": round(gflops / peaks["tf32"][0], 4) if "tf32" in peaks else "",
           "time_frac_data": round(mean_metric(work.uri, run_id, "time_frac_data"), 3),
           "time_frac_forward_backward": round(mean_metric(work.uri, run_id, "time_frac_forward_backward"), 3),
           "time_frac_optimizer": round(mean_metric(work.uri, run_id, "time_frac_optimizer"), 3),
           "stage_s": round(run.seconds, 1)}
    say(f"  -> {row['images_per_s']:.0f} img/s, {gflops:.0f} GFLOP/s: {row['mfu_bf16']:.1%} of the bf16 matmul rate, "
        f"{row['frac_fp32_peak']:.1%} of fp32 ({run.seconds:.0f}s stage)")
    return row


def wait_for_progress(log: Path, proc: subprocess.Popen, step: int, timeout_s: float) -> int:
    """The step of the first progress line ("[v] step K/N | ...") at or past `step`; 0 if the stage exited
    or the time ran out first."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        found = [int(s) for s in re.findall(r"\] step (\d+)/", log.read_text())]
        if found and max(found) >= step:
            return max(found)
        time.sleep(0.1)
    return 0


def preempt_and_resume(work: Work, params: dict[str, Any], variant: str, reference: Path, at: float,
                       device: str, exact: bool) -> dict[str, Any]:
    """SIGTERM the train stage once `at` of its steps are done, rerun it, and check nothing was lost."""
    import torch

    from scorelab.checkpoint import load_trained

    name = "cifar32-fp32-preempt"
    steps, every = params["train"]["steps"], params["train"]["log_every"]
    path = work.params(name, params)
    out = work.root / "out" / name
    cmd = ["--params", str(path), "--variant", variant, "--root", str(work.root), "--out", str(out)]
    say(f"  train.py {' '.join(cmd)}  (SIGTERM after step {math.ceil(at * steps)} of {steps})")
    proc, first = work.start(name, "train.py", *cmd)
    try:
        seen = wait_for_progress(first.stdout, proc, math.ceil(at * steps), work.timeout_s)
        if not seen:
            raise CheckFailed(f"{name}: the stage exited ({proc.poll()}) or stalled before step "
                              f"{math.ceil(at * steps)}:\n{first.tail()}")
        tick = time.perf_counter()
        proc.send_signal(signal.SIGTERM)  # the driver alone, as a scheduler preempting the job does
        try:
            first.rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"{name}: still running 180s after SIGTERM:\n{first.tail()}") from None
        stop_s = time.perf_counter() - tick
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    said = re.search(rf"stopped by SIGTERM at step (\d+) of {steps}", first.stderr.read_text())
    if first.rc != PREEMPTED_EXIT or not said:
        raise CheckFailed(f"{name}: after SIGTERM the stage exited {first.rc}, expected {PREEMPTED_EXIT} naming the "
                          f"checkpointed step (was the SIGTERM too late? it came after step {seen} of {steps}):\n"
                          f"{first.tail()}")
    stopped = int(said[1])
    if (out / "model.pt").exists():
        raise CheckFailed(f"{name}: the preempted launch wrote {out / 'model.pt'}")
    say(f"  -> SIGTERM after step {seen}: checkpointed step {stopped}, exited {first.rc} {stop_s:.1f}s after the "
        "signal; rerunning")
    second = work.run(f"{name}-resume", "train.py", *cmd)
    metrics = json.loads((out / "metrics.json").read_text())
    run_id = metrics["mlflow_run_id"]
    resumed = int(run_tags(work.uri, run_id).get("resumed_from_step", -1))
    final = load_trained(out / "model.pt")
    logged = [s for s, _ in metric_history(work.uri, run_id, "loss")]
    expected = sorted(set(range(every, steps + 1, every)) | {steps})
    a, b = final.model.state_dict(), load_trained(reference).model.state_dict()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a) if a.keys() == b.keys() else math.inf
    bit_equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    problems = []
    if not 0 < resumed == stopped:
        problems.append(f"resumed_from_step {resumed}, expected the checkpointed step {stopped} > 0")
    if metrics["steps"] != steps or final.step != steps:
        problems.append(f"the resumed run ended at step {metrics['steps']} (model {final.step}), expected {steps}")
    if logged != expected:
        problems.append(f"loss logged at steps {logged}, expected each of {expected} once")
    if exact and not bit_equal:
        problems.append(f"resumed weights differ from the uninterrupted run's (max |diff| {diff:.3g})")
    row = {"what": "preempt", "net": "cifar32", "precision": "fp32", "device": device, "steps": steps,
           "sigterm_after_step": seen, "exit_code": first.rc, "checkpointed_step": stopped,
           "resumed_from_step": resumed, "final_step": final.step, "metric_points_ok": logged == expected,
           "bit_equal": bit_equal, "max_abs_diff": f"{diff:.3g}", "stop_s": round(stop_s, 1),
           "resume_stage_s": round(second.seconds, 1), "ok": not problems}
    say(f"  -> resumed from step {resumed}, finished {final.step}/{steps}; loss points complete: "
        f"{logged == expected}; weights equal to the uninterrupted run's bit for bit: {bit_equal} "
        f"(max |diff| {diff:.3g})")
    if problems:
        raise CheckFailed(f"{name}: " + "; ".join(problems), row)
    return row


def sample_one(work: Work, name: str, params: dict[str, Any], variant: str, model: Path, n: int,
               batch: int | None, expect_device: str) -> dict[str, Any]:
    """One sample stage run of n samples (seed 0) on one worker; samples/s from its manifest."""
    from scorelab.generate import load_samples

    path = work.params(name, params)
    out = work.root / "out" / name
    args = ["--params", str(path), "--variant", variant, "--model", str(model), "--out", str(out), "--n", str(n),
            "--seeds", "0", "--workers", "1", "--root", str(work.root), "--no-progress"]
    if batch is not None:
        args += ["--batch-size", str(batch)]
    run = work.run(name, "sample.py", *args)
    (row,) = json.loads((out / "summary.json").read_text())
    manifest = json.loads((Path(row["path"]) / "manifest.json").read_text())
    chunks = manifest["chunks"]
    count = len(load_samples(out, row["setting"], 0))
    where = row.get("drawn_on", [])
    if count != n:
        raise CheckFailed(f"{name}: {count} samples on disk, expected {n}")
    if where and not all(w.endswith("/" + expect_device) for w in where):
        raise CheckFailed(f"{name}: chunks drawn on {where}, expected {expect_device}")
    later = chunks[1:]
    steady = (sum(c["end"] - c["start"] for c in later) / sum(c["seconds"] for c in later)) if later else float("nan")
    rate = count / sum(c["seconds"] for c in chunks)
    result = {"what": "sample", "net": "digits", "precision": "fp32", "device": expect_device, "role": name,
              "method": row["setting"], "nfe": manifest["nfe"], "n": count, "chunks": len(chunks),
              "chunk_size": chunks[0]["end"] - chunks[0]["start"], "samples_per_s": round(rate, 1),
              "samples_per_s_steady": round(steady, 1) if later else "", "stage_s": round(run.seconds, 1)}
    say(f"  -> {count} samples in {len(chunks)} chunk(s) on {', '.join(where) or expect_device}: {rate:.0f} samples/s"
        + (f", {steady:.0f} after the first chunk" if later else "") + f" ({run.seconds:.0f}s stage)")
    return result


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="the digits default")
    parser.add_argument("--variant", default="vp", help="digits variant of --params")
    parser.add_argument("--digits-steps", type=int, default=300)
    parser.add_argument("--cifar-steps", type=int, default=300)
    parser.add_argument("--cifar-batch", type=int, default=128)
    parser.add_argument("--sample-n", type=int, default=None, help="digits sampled on the GPU (default 10000)")
    parser.add_argument("--sample-method", default="dpm_solver")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--gpu-batch-size", type=int, default=4096, help="sample.gpu_batch_size")
    parser.add_argument("--preempt-at", type=float, default=0.4, help="fraction of the steps before SIGTERM")
    parser.add_argument("--out", default=str(REPO / "docs" / "bench"))
    parser.add_argument("--work", default=None, help="keep the work folder here (default: a temporary one)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the same path on the CPU at a tiny size (fp32 only), for testing the script")
    args = parser.parse_args(argv)

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or with --cpu-smoke to exercise it on the CPU",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchlib

    gpu = not args.cpu_smoke
    device = "cuda" if gpu else "cpu"
    sz = sizes_for(args)
    started = time.perf_counter()
    machine = benchlib.machine()
    card = torch.cuda.get_device_name(0) if gpu else f"no GPU (--cpu-smoke): {machine['cpu']}"
    command = shlex.join([_rel(sys.executable), _rel(__file__), *(sys.argv[1:] if argv is None else argv)])
    say(f"gpu_check: {card}; {machine['date']}; torch {machine['torch']}; {machine['cores']} CPU cores")

    say("matmul rates")
    peaks = matmul_peaks(device, sz.matmul_sizes, sz.matmul_seconds)
    rows: list[dict[str, Any]] = [{"what": "peak_matmul", "precision": k, "device": device, "gflops": round(v, 1),
                                   "size": n} for k, (v, n) in peaks.items()]
    say("  " + ", ".join(f"{k} {v:.0f} GFLOP/s (n={n})" for k, (v, n) in peaks.items()))

    tmp = None
    if args.work:
        root = Path(args.work).resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gpu-check-")
        root = Path(tmp.name)
    failure = None
    try:
        with ray_head(num_cpus=max(2, os.cpu_count() or 2), num_gpus=1 if gpu else 0) as (address, env):
            work = Work(root, env, sz.stage_timeout_s)
            try:
                precisions = [False, True] if gpu else [False]
                say("data")
                p = digits_params(work, args, sz, address, gpu, False, "digits-fp32")
                work.run("prepare-digits", "prepare.py", "--params", str(work.params("prepare-digits", p)))
                write_random_images(root / "random32", sz.cifar_images)
                c = cifar_params(work, args, sz, address, gpu, False, "cifar32-fp32")
                work.run("prepare-cifar32", "prepare.py", "--params", str(work.params("prepare-cifar32", c)))

                for bf16 in precisions:
                    tag = "bf16" if bf16 else "fp32"
                    say(f"train digits ({args.variant}), {tag}, {sz.digits_steps} steps")
                    rows.append(train_one(work, f"digits-{tag}",
                                          digits_params(work, args, sz, address, gpu, bf16, f"digits-{tag}"),
                                          args.variant, peaks, device))
                    say(f"train cifar32 (cifar10 preset ddpm), {tag}, {sz.cifar_steps} steps at batch {sz.cifar_batch}")
                    rows.append(train_one(work, f"cifar32-{tag}",
                                          cifar_params(work, args, sz, address, gpu, bf16, f"cifar32-{tag}"),
                                          "ddpm", peaks, device))

                say("preemption: cifar32 fp32 again, SIGTERM mid-way, rerun")
                try:
                    rows.append(preempt_and_resume(
                        work, cifar_params(work, args, sz, address, gpu, False, "cifar32-fp32-preempt"), "ddpm",
                        root / "out" / "cifar32-fp32" / "model.pt", args.preempt_at, device, exact=not gpu))
                except CheckFailed as e:
                    if len(e.args) > 1:
                        rows.append(e.args[1])
                    failure = str(e.args[0])
                    say(f"  FAILED: {failure}")

                model = root / "out" / "digits-fp32" / "model.pt"
                say(f"sample {sz.sample_n} digits, {args.sample_method}-{args.sample_steps}, "
                    f"{'on the GPU' if gpu else 'on the CPU (smoke)'}")
                fast = sample_one(work, "sample-gpu" if gpu else "sample-smoke",
                                  digits_params(work, args, sz, address, gpu, False, "digits-fp32"), args.variant,
                                  model, sz.sample_n, None if gpu else sz.gpu_batch_size, device)
                say(f"sample {sz.cpu_sample_n} digits on one CPU worker (1 thread)")
                slow = sample_one(work, "sample-cpu-worker",
                                  digits_params(work, args, sz, address, False, False, "digits-fp32"), args.variant,
                                  model, sz.cpu_sample_n, sz.cpu_sample_batch, "cpu")
                fast["x_cpu_worker"] = round(fast["samples_per_s"] / slow["samples_per_s"], 2)
                if fast["samples_per_s_steady"] != "" and slow["samples_per_s_steady"] != "":
                    fast["x_cpu_worker_steady"] = round(fast["samples_per_s_steady"] / slow["samples_per_s_steady"], 2)
                rows += [fast, slow]
            except CheckFailed as e:
                failure = str(e.args[0])
                say(f"FAILED: {failure}")
            except Exception as e:  # still write what was measured: device time is scarce
                import traceback

                traceback.print_exc()
                failure = f"{type(e).__name__}: {e}"
        if failure and (root / "logs").is_dir():  # the stages' stdout and stderr, for the post-mortem
            import shutil

            logs = Path(args.out) / ("gpu_check_logs" if gpu else "gpu_check_cpu_smoke_logs")
            shutil.rmtree(logs, ignore_errors=True)
            shutil.copytree(root / "logs", logs)
            say(f"stage logs copied to {logs}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    total = time.perf_counter() - started

    out = Path(args.out)
    csv_path = out / ("gpu_check.csv" if gpu else "gpu_check_cpu_smoke.csv")
    for r in rows:
        r.setdefault("card", card)
    benchlib.write_csv(csv_path, rows)
    print_tables(rows, card, machine, command, total, gpu, csv_path)
    if failure:
        say(f"\ngpu_check: FAILED: {failure.splitlines()[0]}")
        return 1
    return 0


def print_tables(rows: list[dict[str, Any]], card: str, machine: dict[str, Any], command: str, total: float,
                 gpu: bool, csv_path: Path) -> None:
    say(f"\n### GPU check: {card}\n\n{machine['date']} · torch {machine['torch']} · {machine['cores']} CPU cores · "
        f"`{command}` · {total:.0f} s in all · raw: `{csv_path}`\n")
    peaks = [r for r in rows if r["what"] == "peak_matmul"]
    say("torch.mm: " + ", ".join(f"{r['precision']} {r['gflops']:.0f} GFLOP/s" for r in peaks) + "\n")
    train = [r for r in rows if r["what"] == "train"]
    if train:
        say("| net | precision | on | params | batch | steps | img/s | GFLOP/img (fwd+bwd) | GFLOP/s | MFU (bf16 mm) "
            "| of fp32 mm | of TF32 mm | fwd+bwd share |")
        say("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in train:
            tf32 = f"{r['frac_tf32_peak']:.1%}" if r["frac_tf32_peak"] != "" else "-"
            say(f"| {r['net']} | {r['precision']} | {r['device']} | {r['parameters'] / 1e6:.2f}M | {r['batch']} | "
                f"{r['steps']} | {r['images_per_s']:.0f} | {r['gflop_per_image']:.3f} | {r['gflops']:.0f} | "
                f"{r['mfu_bf16']:.1%} | {r['frac_fp32_peak']:.1%} | {tf32} | {r['time_frac_forward_backward']:.0%} |")
    for r in (r for r in rows if r["what"] == "preempt"):
        say(f"\nPreemption ({r['net']} {r['precision']}, {r['steps']} steps): SIGTERM after step "
            f"{r['sigterm_after_step']}, exit {r['exit_code']} having checkpointed step {r['checkpointed_step']}; "
            f"rerun resumed from step {r['resumed_from_step']} and ended at {r['final_step']}; every loss point "
            f"logged once: {r['metric_points_ok']}; weights equal to the uninterrupted run's: {r['bit_equal']} "
            f"(max |diff| {r['max_abs_diff']}); {'ok' if r['ok'] else 'FAILED'}")
    samples = [r for r in rows if r["what"] == "sample"]
    if samples:
        say("\n| sampling | device | sampler | NFE | samples | chunk | samples/s | after 1st chunk | stage s |")
        say("|---|---|---|---|---|---|---|---|---|")
        for r in samples:
            steady = f"{r['samples_per_s_steady']:.0f}" if r["samples_per_s_steady"] != "" else "-"
            say(f"| {r['role']} | {r['device']} | {r['method']} | {r['nfe']} | {r['n']} | {r['chunk_size']} | "
                f"{r['samples_per_s']:.0f} | {steady} | {r['stage_s']:.0f} |")
    say("")
    bf16_cifar = [r for r in train if r["net"] == "cifar32" and r["precision"] == "bf16"]
    if bf16_cifar:
        mfu = bf16_cifar[0]["mfu_bf16"]
        say(f"goal: bf16 MFU >= {GOAL_MFU_BF16:.0%} on cifar32: {mfu:.1%}, "
            f"{'met' if mfu >= GOAL_MFU_BF16 else 'NOT met'}")
    elif not gpu:
        say("goal: bf16 MFU: not judged (--cpu-smoke runs fp32 only)")
    fast = next((r for r in samples if "x_cpu_worker" in r), None)
    if fast is not None:
        ratio = fast.get("x_cpu_worker_steady") or fast["x_cpu_worker"]
        judged = f"{'met' if ratio >= GOAL_SAMPLE_RATIO else 'NOT met'}" if gpu else "not judged (--cpu-smoke)"
        say(f"goal: GPU samples/s >= {GOAL_SAMPLE_RATIO:.0f}x one CPU worker's: {fast['x_cpu_worker']:.1f}x over all "
            f"chunks" + (f", {fast['x_cpu_worker_steady']:.1f}x after the first chunk" if 'x_cpu_worker_steady' in fast
                         else "") + f": {judged}")
    if gpu:
        say(f"budget: {total:.0f} s of the 480 s allowed: {'within' if total <= 480 else 'OVER'}")


if __name__ == "__main__":
    sys.exit(main())
