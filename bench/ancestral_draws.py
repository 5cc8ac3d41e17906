"""Ancestral (DDPM) sampling at 100 steps on one scorelab network, seven ways: scorelab's `ancestral` with and without
x0 clipping, and diffusers' DDPMScheduler with "trailing" or "leading" spacing, with and without clip_sample. The
"trailing", unclipped DDPMScheduler is scorelab's algorithm (tests/test_sampling.py matches them sample for sample
with the same noise): fed scorelab's noise it scores what scorelab does; drawing its own noise, the row shows how
far the draws alone move the score.

    .venv/bin/python bench/ancestral_draws.py [--steps 3600] [--lr 1e-3] [--profile 0.10] [--n 1000]
        [--seeds 0 1 2] [--threads 1] [--out docs/bench]

The network: variant `ddpm` trained in-process (benchlib.ScorelabTrainer) as bench/quality_vs_diffusers.py's
chosen recipe (lr, power EMA profile, bf16 where the CPU has it). Scored with that benchmark's evaluator (domain FD
against the full data set). Writes <out>/ancestral_draws.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

# name: ("scorelab", x0_threshold) or ("diffusers", DDPMScheduler keyword arguments[, "shared"]); "shared": its
# variance noise is scorelab's stream of the seed (benchlib.ddpm_variance_noise), so that row must equal the first
SETTINGS = {
    "scorelab ancestral": ("scorelab", "none"),
    "scorelab ancestral, clip": ("scorelab", "clip"),
    "DDPMScheduler trailing, scorelab's noise": ("diffusers", {"timestep_spacing": "trailing", "clip_sample": False},
                                                 "shared"),
    "DDPMScheduler trailing": ("diffusers", {"timestep_spacing": "trailing", "clip_sample": False}),
    "DDPMScheduler trailing, clip_sample": ("diffusers", {"timestep_spacing": "trailing"}),
    "DDPMScheduler leading, clip_sample (its default)": ("diffusers", {}),
    "DDPMScheduler leading": ("diffusers", {"clip_sample": False}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(benchlib.REPO / "params.yaml"))
    parser.add_argument("--steps", type=int, default=3600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--profile", type=float, default=0.10, help="sigma_rel of the power EMA sampled")
    parser.add_argument("--sample-steps", type=int, default=100)
    benchlib.add_scoring_args(parser, seeds=[0, 1, 2])
    args = parser.parse_args(argv)

    import diffusers

    from scorelab.runtime import resolve_bf16
    from scorelab.sampling import sample
    from scorelab.variant_config import profile_name

    torch.set_num_threads(args.threads)
    m = benchlib.machine()
    print(benchlib.machine_line(m), flush=True)
    rows = []
    with benchlib.tmpdir("bench-ancestral-") as tmp:
        params = benchlib.load_params(args.params, Path(tmp) / "data")
        fd = benchlib.DomainFD(params, Path(tmp), epochs=args.classifier_epochs, reference="full")
        torch.set_num_threads(args.threads)
        bf16, _ = resolve_bf16("auto", torch.device("cpu"))
        trainer = benchlib.ScorelabTrainer(params, "ddpm", lr=args.lr, steps=args.steps, bf16=bf16,
                                           profiles=(args.profile,))
        trainer.model.train()
        while trainer.steps < args.steps:
            trainer.step()
        model = trainer.candidates()[profile_name(args.profile)]
        shape = fd.shape

        def draw(setting, seed: int) -> torch.Tensor:
            lib, option, *shared = setting
            if lib == "scorelab":
                return sample(model, model.sde, (args.n, *shape), method="ancestral", steps=args.sample_steps,
                              seed=seed, x0_threshold=option).x
            scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", **option)
            z, noise = benchlib.seed_noise(args.n, shape, seed)
            return benchlib.sample_diffusers(lambda x, t: model.net(x, t.to(torch.float32)), scheduler,
                                             args.sample_steps, z, seed, noise=noise if shared else None).x

        with torch.no_grad():
            for name, setting in SETTINGS.items():
                tick = time.perf_counter()
                values = [fd(draw(setting, seed)) for seed in args.seeds]
                mean, std = benchlib.mean_std(values)
                rows.append({"setting": name, "steps": args.sample_steps, "n": args.n, "fd_mean": round(mean, 3),
                             "fd_std": round(std, 3), "fd_per_seed": " ".join(f"{v:.3f}" for v in values),
                             "seconds": round(time.perf_counter() - tick, 1), "trained_steps": trainer.steps,
                             **{f"machine_{k}": v for k, v in m.items()}})
                print(f"| {name} | {mean:.2f} ± {std:.2f} | {', '.join(f'{v:.2f}' for v in values)} |", flush=True)
    benchlib.write_csv(Path(args.out) / "ancestral_draws.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
