"""Which learning-rate schedule suits the digits default at its budget: the `ddpm` and `vp` variants of the
committed default (presets/digits.yaml) trained with each schedule and length, then scored as the evaluate stage
scores them (domain Frechet distance against the whole train split, N samples x 3 seeds, the held-out test
digits as the real-vs-real baseline).

    .venv/bin/python bench/lr_schedules.py [--configs constant:800 cosine:800 cosine:640 ...] [--n 448]

A config is schedule:steps[:final_lr_fraction]. Training is scorelab's loop in-process on one worker
(benchlib.ScorelabTrainer: the same loss, Adam, warm-up and EMA as train_loop; no Ray, no checkpoints), so the
numbers compare schedules with each other, not with the pipeline's wall time. Writes <out>/lr_schedules.csv
and prints a markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import benchlib  # noqa: E402

SETTINGS = {"ddpm": [("ancestral", 100), ("ddim", 20)], "vp": [("dpm_solver", 10), ("dpm_solver", 20)]}


def parse_config(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("constant", "cosine", "linear"):
        raise SystemExit(f"--configs: {text!r} is not schedule:steps[:final_lr_fraction] "
                         "(schedule constant, cosine or linear)")
    return {"lr_schedule": parts[0], "steps": int(parts[1]), "final_lr_fraction": float(parts[2]) if len(parts) == 3
            else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(benchlib.REPO / "presets" / "digits.yaml"))
    parser.add_argument("--configs", nargs="+", default=["constant:800", "cosine:800", "constant:640", "cosine:640",
                                                         "linear:640"])
    parser.add_argument("--variants", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--n", type=int, default=448)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--classifier-epochs", type=int, default=12)
    parser.add_argument("--out", default=str(benchlib.REPO / "docs" / "bench"))
    args = parser.parse_args(argv)
    configs = [parse_config(c) for c in args.configs]

    from scorelab.sampling import sample

    m = benchlib.machine()
    rows = []
    with benchlib.tmpdir("scorelab-lr-") as tmp:
        tmp = Path(tmp)
        params = benchlib.load_params(args.params, tmp / "data")
        fd = benchlib.DomainFD(params, tmp, epochs=args.classifier_epochs, reference="train")
        base = benchlib.mean_std(fd.baseline(args.n, args.seeds, split="test"))
        rows.append({"variant": "real vs real", "lr_schedule": "", "steps": "", "final_lr_fraction": "", "setting": "",
                     "nfe": "", "fd_mean": base[0], "fd_std": base[1], "train_s": ""})
        print(f"real vs real: {base[0]:.2f} ± {base[1]:.2f}", flush=True)
        for cfg in configs:
            run_params = params.model_copy(update={"train": params.train.model_copy(update=cfg)})
            for name in args.variants:
                trainer = benchlib.ScorelabTrainer(run_params, name)
                start = time.perf_counter()
                trainer.model.train()
                while trainer.steps < trainer.train.steps:
                    trainer.step()
                train_s = time.perf_counter() - start
                model = trainer.sampling_model()
                for method, steps in SETTINGS[name]:
                    values, nfe = [], 0
                    for seed in args.seeds:
                        with torch.no_grad():
                            out = sample(model, model.sde, (args.n, *fd.shape), method=method, steps=steps, seed=seed)
                        values.append(fd(out.x))
                        nfe = out.nfe
                    mean, std = benchlib.mean_std(values)
                    rows.append({"variant": name, **cfg, "setting": f"{method}-{steps}", "nfe": nfe, "fd_mean": mean,
                                 "fd_std": std, "train_s": round(train_s, 1)})
                    print(f"{cfg['lr_schedule']}:{cfg['steps']}:{cfg['final_lr_fraction']} {name} {method}-{steps}: "
                          f"{mean:.2f} ± {std:.2f} (train {train_s:.0f} s)", flush=True)
    benchlib.write_csv(Path(args.out) / "lr_schedules.csv", rows)
    print(f"\n{benchlib.machine_line(m)}; N = {args.n} per seed, seeds {args.seeds}; domain FD (mean ± sd over "
          "seeds) against the whole train split\n")
    print("| variant | schedule | steps | final lr fraction | setting | NFE | domain FD | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['lr_schedule']} | {r['steps']} | "
              f"{r['final_lr_fraction']} | {r['setting']} | {r['nfe']} | {r['fd_mean']:.2f} ± {r['fd_std']:.2f} | "
              f"{r['train_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
