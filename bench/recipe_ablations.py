"""Training-recipe ablations of scorelab's `ddpm` variant at the quality benchmark's budget (3,600 steps x 128):
what else, besides the learning rate and the EMA, moves the domain FD of DPM-Solver++ at NFE 10 and 20.

    .venv/bin/python bench/recipe_ablations.py [--configs base min_snr5 ...] [--steps 3600] [--lr 1e-3]
        [--profiles 0.10 0.15] [--nfe 10 20] [--n 1000] [--seeds 100 101 102] [--threads 1] [--out docs/bench]

Each configuration changes one thing of the variant `ddpm` of params.yaml trained as
bench/quality_vs_diffusers.py's chosen recipe (lr 1e-3, constant after warm-up, bf16 autocast, benchlib's data
stream and generators): the loss weighting, the lr schedule, the noise schedule or dropout (CONFIGS below). Every
candidate EMA (the classic one and each power profile) is scored on seeds that the quality benchmark never scores
(100-102 by default: 100 is its selection seed), with its evaluator (domain FD against the full data set, N per
seed). The loss weightings are written here as a factor w on DDPM's simple loss ||eps - eps_theta||^2 (std2):
  min_snr5:            w = min(SNR, 5) / SNR (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
                       Weighting Strategy", for an eps network), SNR = alpha^2 / std^2: less weight at low noise;
  snr_over_1_plus_snr: w = SNR / (1 + SNR): less weight at high noise.
Training is deterministic: a configuration run twice gives the same scores to the last digit. Configurations are
independent: two processes with different --configs (at 1 thread each) share 2 cores. Writes
<out>/recipe_ablations.csv (one row per configuration, candidate EMA and NFE).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

# name: what changes (weighting: a factor on the simple loss, below; train / sde / net: fields of those sections)
CONFIGS = {
    "base": {},
    "min_snr5": {"weighting": "min_snr5"},
    "snr_over_1_plus_snr": {"weighting": "snr_over_1_plus_snr"},
    "cosine_lr_2e-3": {"lr": 2e-3, "train": {"lr_schedule": "cosine"}},
    "cosine_noise_schedule": {"sde": {"schedule": "cosine"}},
    "dropout_0.1": {"net": {"dropout": 0.1}},
}
WEIGHTINGS = {  # benchlib.ScorelabTrainer's loss_weight; none (the variant's std2 loss) for the other configurations
    "min_snr5": lambda snr: torch.clamp(5.0 / snr, max=1.0),
    "snr_over_1_plus_snr": lambda snr: snr / (1 + snr),
}


def configured_params(params, change: dict):
    """params with the variant `ddpm` and `train:` changed as a CONFIGS entry says."""
    variant = params.variants["ddpm"]
    update = {key: getattr(variant, key).model_copy(update=change[key]) for key in ("sde", "net") if key in change}
    if update:
        params.variants["ddpm"] = variant.model_copy(update=update)
    if "train" in change:
        params = params.model_copy(update={"train": params.train.model_copy(update=change["train"])})
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(benchlib.REPO / "params.yaml"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=3600)
    parser.add_argument("--lr", type=float, default=1e-3, help="unless the configuration sets its own")
    parser.add_argument("--profiles", type=float, nargs="*", default=[0.10, 0.15])
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20])
    benchlib.add_scoring_args(parser, seeds=[100, 101, 102])
    args = parser.parse_args(argv)

    from scorelab.runtime import resolve_bf16
    from scorelab.sampling import sample

    torch.set_num_threads(args.threads)
    m = benchlib.machine()
    print(benchlib.machine_line(m), flush=True)
    bf16, _ = resolve_bf16("auto", torch.device("cpu"))
    rows = []
    with benchlib.tmpdir("bench-recipe-") as tmp_name:
        tmp = Path(tmp_name)
        fd = None
        for name in args.configs:
            change = CONFIGS[name]
            params = configured_params(benchlib.load_params(args.params, tmp / "data"), change)
            if fd is None:
                fd = benchlib.DomainFD(params, tmp / "fd", epochs=args.classifier_epochs, reference="full")
                torch.set_num_threads(args.threads)
            trainer = benchlib.ScorelabTrainer(params, "ddpm", lr=change.get("lr", args.lr), steps=args.steps,
                                               bf16=bf16, profiles=tuple(args.profiles),
                                               loss_weight=WEIGHTINGS.get(change.get("weighting")))
            trainer.model.train()
            start, loss = time.perf_counter(), float("nan")
            while trainer.steps < args.steps:
                loss = trainer.step()
            seconds = time.perf_counter() - start
            for candidate, model in trainer.candidates().items():
                for nfe in args.nfe:
                    with torch.no_grad():
                        values = [fd(sample(model, model.sde, (args.n, *fd.shape), method="dpm_solver", steps=nfe,
                                            seed=seed).x) for seed in args.seeds]
                    mean, std = benchlib.mean_std(values)
                    rows.append({"config": name, "candidate": candidate, "sampler": "dpm_solver", "nfe": nfe,
                                 "n": args.n, "fd_mean": round(mean, 3), "fd_std": round(std, 3),
                                 "fd_per_seed": " ".join(f"{v:.3f}" for v in values), "train_s": round(seconds, 1),
                                 "final_loss": round(loss, 5), "steps": trainer.steps,
                                 **{f"machine_{k}": v for k, v in m.items()}})
                line = ", ".join(f"NFE {r['nfe']} {r['fd_mean']:.3f}" for r in rows[-len(args.nfe):])
                print(f"| {name} | {candidate} | {line} |", flush=True)
            benchlib.write_csv(Path(args.out) / "recipe_ablations.csv", rows)  # after each configuration
    return 0


if __name__ == "__main__":
    sys.exit(main())
