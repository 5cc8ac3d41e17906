"""One GPU through Ray Train: the default digits variant for a few hundred steps, bf16 off and on.

    .venv/bin/python bench/gpu_train.py [--steps 300] [--variant vp] [--sample-batch 1024] [--cpu-smoke]

For fp32 and for bf16 autocast: training images/s through `TorchTrainer` (the mean of the logging
windows after the first), the model FLOP utilisation (images/s x the U-Net's forward+backward FLOPs per
image from torch's flop counter, against the card's measured bf16 torch.mm rate, and the fp32 rate),
then sampling with DDIM-20 and DPM-Solver++-20 from the trained EMA weights (images/s, counted NFE,
forward FLOP utilisation). Writes <out>/gpu_train.csv and prints a markdown table. --cpu-smoke runs the
same path on the CPU for a few steps (fp32 only, small batches), so the script is exercised where no
GPU exists.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--variant", default="vp")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sample-batch", type=int, default=1024)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "docs" / "bench"))
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU, fp32 only, for testing the script")
    args = parser.parse_args(argv)

    import ray
    import torch
    import yaml
    from mlflow.tracking import MlflowClient

    from scorelab.config import parse_params
    from scorelab.data import prepare
    from scorelab.sampling import sample
    from scorelab.checkpoint import load_trained
    from scorelab.training import train_variant

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchlib

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke to exercise the script on the CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu_smoke else "cuda"
    sizes = (256,) if args.cpu_smoke else (2048, 4096, 8192)
    seconds = 0.2 if args.cpu_smoke else 1.0
    peak_fp32 = benchlib.peak_matmul(sizes, seconds, device, torch.float32)[0]
    peak_bf16 = peak_fp32 if args.cpu_smoke else benchlib.peak_matmul(sizes, seconds, device, torch.bfloat16)[0]
    print(f"{device}: torch.mm peak fp32 {peak_fp32:.0f} GFLOP/s, bf16 {peak_bf16:.0f} GFLOP/s", flush=True)
    sample_batch = 8 if args.cpu_smoke else args.sample_batch
    sample_steps = 2 if args.cpu_smoke else args.sample_steps
    raw = yaml.safe_load(Path(args.params).read_text())
    modes = [False] if args.cpu_smoke else [False, True]
    rows = []
    ray.init(address="local", logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            for bf16 in modes:
                p = dict(raw)
                p["data"] = {**raw.get("data", {}), "out_dir": str(tmp / "data")}
                p["train"] = {**raw.get("train", {}), "steps": args.steps, "log_every": max(1, args.steps // 3),
                              "checkpoint_every": args.steps, "bf16": bf16}
                p["ray"] = {**raw.get("ray", {}), "num_workers": 1, "use_gpu": not args.cpu_smoke,
                            "cpus_per_worker": 1, "storage_path": str(tmp / f"ray-{bf16}")}
                p["mlflow"] = {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": f"gpu-bf16-{bf16}"}
                p["variants"] = {args.variant: raw["variants"][args.variant]}
                p.pop("tune", None)  # a bench of training alone: no sweep, so no tuned variant to check
                params = parse_params(p)
                if not (params.data.dataset_dir / "manifest.json").exists():
                    prepare(params.data, params.seed)
                result = train_variant(params, args.variant, root=tmp, data_dir=params.data.dataset_dir,
                                       out_dir=tmp / "out" / str(bf16))
                history = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_metric_history(result.run_id,
                                                                                             "images_per_s")
                steady = [m.value for m in history[1:]] or [m.value for m in history]
                train_rate = sum(steady) / len(steady)
                trained = load_trained(result.model_path, device=device)
                model, shape = trained.model, tuple(trained.data_shape)
                model.train()
                x = torch.randn(8, *shape, device=device)
                flops_train = benchlib.count_flops(lambda: model.net(x, torch.full((8,), 0.5, device=device)).square()
                                                   .mean().backward()) / 8
                model.eval()
                flops_fwd = benchlib.count_flops(lambda: model.net(x, torch.full((8,), 0.5, device=device))) / 8
                name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
                rows.append({"what": "train", "bf16": bf16, "method": "", "batch": params.train.batch_size, "nfe": "",
                             "images_per_s": train_rate, "gflops": train_rate * flops_train / 1e9,
                             "mfu_bf16_peak": train_rate * flops_train / 1e9 / peak_bf16,
                             "frac_fp32_peak": train_rate * flops_train / 1e9 / peak_fp32, "device": name})
                for method in ("ddim", "dpm_solver"):
                    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                        run = lambda: sample(model, model.sde, (sample_batch, *shape), method=method,  # noqa: E731
                                             steps=sample_steps, seed=0, device=device)
                        run()  # warm-up: kernels chosen, memory allocated
                        if device == "cuda":
                            torch.cuda.synchronize()
                        tick = time.perf_counter()
                        out = run()
                        if device == "cuda":
                            torch.cuda.synchronize()
                    rate = sample_batch / (time.perf_counter() - tick)
                    rows.append({"what": "sample", "bf16": bf16, "method": method, "batch": sample_batch,
                                 "nfe": out.nfe, "images_per_s": rate, "gflops": rate * out.nfe * flops_fwd / 1e9,
                                 "mfu_bf16_peak": rate * out.nfe * flops_fwd / 1e9 / peak_bf16,
                                 "frac_fp32_peak": rate * out.nfe * flops_fwd / 1e9 / peak_fp32, "device": name})
                for r in rows[-3:]:
                    print(r, flush=True)
    finally:
        ray.shutdown()
    out = Path(args.out)
    for r in rows:
        r.update({"peak_fp32_gflops": round(peak_fp32, 1), "peak_bf16_gflops": round(peak_bf16, 1)})
    benchlib.write_csv(out / "gpu_train.csv", rows)
    print(f"\n{rows[0]['device']}; torch.mm peak fp32 {peak_fp32:.0f}, bf16 {peak_bf16:.0f} GFLOP/s\n")
    print("| what | bf16 | method | batch | NFE | images/s | GFLOP/s | of bf16 peak (MFU) | of fp32 peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['bf16']} | {r['method']} | {r['batch']} | {r['nfe']} | {r['images_per_s']:.0f} | "
              f"{r['gflops']:.0f} | {r['mfu_bf16_peak']:.1%} | {r['frac_fp32_peak']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
