"""One GPU through Ray Train: the default digits variant for a few hundred steps, bf16 off and on.

    .venv/bin/python bench/gpu_train.py [--steps 300] [--variant vp] [--cpu-smoke]

Prints images/s for fp32 and bf16 autocast and writes <out>/gpu_train.csv. --cpu-smoke runs the
same path on the CPU for a few steps (no bf16), so the script is exercised where no GPU exists.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--variant", default="vp")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=str(REPO / "docs" / "bench"))
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU, fp32 only, for testing the script")
    args = parser.parse_args(argv)

    import ray
    import torch
    import yaml
    from mlflow.tracking import MlflowClient

    from scorelab.config import parse_params
    from scorelab.data import prepare
    from scorelab.training import train_variant

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke to exercise the script on the CPU", file=sys.stderr)
        return 2
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
                params = parse_params(p)
                if not (params.data.dataset_dir / "manifest.json").exists():
                    prepare(params.data, params.seed)
                result = train_variant(params, args.variant, root=tmp, data_dir=params.data.dataset_dir,
                                       out_dir=tmp / "out" / str(bf16))
                history = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_metric_history(result.run_id,
                                                                                             "images_per_s")
                steady = [m.value for m in history[1:]] or [m.value for m in history]
                rows.append({"bf16": bf16, "images_per_s": sum(steady) / len(steady),
                             "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"})
                print(rows[-1], flush=True)
    finally:
        ray.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gpu_train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
