"""Training throughput through Ray Train on this machine: images/s for 1 and 2 workers on the default
digits network, in float32 and (where the CPU has bfloat16 kernels) with train.bf16, and where each step's
time goes (data, forward/backward incl. DDP all-reduce, optimizer + EMA, logging, checkpointing), read back
from the MLflow metrics the loop logs.

    .venv/bin/python bench/train_throughput.py [--steps 120] [--variant vp] [--out docs/bench]

Writes <out>/train_throughput.csv and prints a markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--variant", default="vp")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", default=str(REPO / "docs" / "bench"))
    args = parser.parse_args(argv)

    import ray
    import yaml
    from mlflow.tracking import MlflowClient

    from scorelab.config import parse_params
    from scorelab.data import prepare
    from scorelab.training import train_variant

    raw = yaml.safe_load(Path(args.params).read_text())
    from scorelab.runtime import bf16_problem

    # (workers, CPUs = threads per worker, bf16 autocast)
    settings = [(1, 1.0, False), (1, 2.0, False), (2, 1.0, False), (2, 1.0, True)]
    problem = bf16_problem(torch.device("cpu"))
    if problem:
        print(f"no bf16 rows: {problem}", flush=True)
        settings = [s for s in settings if not s[2]]
    rows = []
    ray.init(address="local", num_cpus=2, logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            for workers, cpus, bf16 in settings:
                p = dict(raw)
                p["data"] = {**raw.get("data", {}), "out_dir": str(tmp / "data")}
                p["train"] = {**raw.get("train", {}), "steps": args.steps, "log_every": max(1, args.steps // 3),
                              "checkpoint_every": max(1, args.steps // 2), "sample_every": 0, "bf16": bf16}
                p["ray"] = {**raw.get("ray", {}), "num_workers": workers, "cpus_per_worker": cpus,
                            "storage_path": str(tmp / f"ray-{workers}-{cpus}-{bf16}")}
                p["mlflow"] = {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                               "experiment": f"bench-{workers}-{cpus}-{bf16}"}
                p["variants"] = {args.variant: raw["variants"][args.variant]}
                p.pop("tune", None)  # a bench of training alone: no sweep, so no tuned variant to check
                params = parse_params(p)
                if not (params.data.dataset_dir / "manifest.json").exists():
                    prepare(params.data, params.seed)
                result = train_variant(params, args.variant, root=tmp, data_dir=params.data.dataset_dir,
                                       out_dir=tmp / "out" / f"{workers}-{cpus}-{bf16}")
                client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
                history = client.get_metric_history(result.run_id, "images_per_s")
                steady = [m.value for m in history[1:]] or [m.value for m in history]  # first window warms up
                fracs = {}
                for k in ("data", "forward_backward", "optimizer", "log", "checkpoint"):
                    values = [m.value for m in client.get_metric_history(result.run_id, f"time_frac_{k}")]
                    fracs[k] = sum(values) / len(values)  # the mean over logging windows
                rows.append({"workers": workers, "threads_per_worker": int(cpus), "bf16": bf16,
                             "images_per_s": sum(steady) / len(steady), **{f"frac_{k}": v for k, v in fracs.items()},
                             "fit_seconds": round(result.seconds, 1)})
                print(rows[-1], flush=True)
    finally:
        ray.shutdown()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train_throughput.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\n{date.today()} · {cpu} · {torch.get_num_threads()} threads · torch {torch.__version__} · "
          f"{args.steps} steps of variant {args.variant}, global batch {params.train.batch_size}\n")
    print("| workers | threads/worker | bf16 | images/s | data | fwd+bwd (+all-reduce) | optimizer+EMA | logging | "
          "checkpoint | fit() s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['threads_per_worker']} | {'yes' if r['bf16'] else 'no'} | "
              f"{r['images_per_s']:.0f} | {r['frac_data']:.1%} | "
              f"{r['frac_forward_backward']:.1%} | {r['frac_optimizer']:.1%} | {r['frac_log']:.1%} | "
              f"{r['frac_checkpoint']:.1%} | {r['fit_seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
