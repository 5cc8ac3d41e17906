"""Training-recipe ablations of scorelab's `ddpm` variant at the quality benchmark's budget (3,600 steps x 128):
what else, besides the learning rate and the EMA, moves the domain FD of DPM-Solver++ at NFE 10 and 20, and how
far the same recipe moves with its training seed alone.

    .venv/bin/python bench/recipe_ablations.py [--configs base min_snr5 ...] [--train-seeds 0 1 2] [--steps 3600]
        [--lr 1e-3] [--profiles 0.10 0.15] [--nfe 10 20] [--ancestral 100] [--n 1000] [--seeds 100 101 102]
        [--threads 1] [--out docs/bench]

Each configuration changes one thing of the variant `ddpm` of params.yaml trained as
bench/quality_vs_diffusers.py's chosen recipe (lr 1e-3, constant after warm-up, bf16 autocast, benchlib's data
stream and generators): the loss weighting, the lr schedule, the noise schedule, dropout, the parameterization,
Adam's betas, how training times are drawn, or the batch size at equal images seen (CONFIGS below). One entry is
the peer: diffusers' recipe (benchlib.DiffusersTrainer) at its chosen lr, sampled by its own DPM-Solver++ from the
same x_T. The base recipe and the peer are trained with three seeds by default (params.yaml's `seed` and the two
after it: initialisation, data order, training noise), the other configurations with one (--train-seeds sets the
seeds of every configuration); the evaluator stays the one of params.yaml's seed. The spread of one recipe over
its seeds is the yardstick for the differences between recipes. Every candidate EMA (the classic one and each power
profile) is scored on seeds that the quality benchmark never scores (100-102 by default: 100 is its selection
seed), with its evaluator (domain FD against the full data set, N per seed); with --ancestral also by its own
library's ancestral sampler at that many steps (scorelab's `ancestral`; the peer's DDPMScheduler with the training
scheduler's config, its variance noise drawn from scorelab's stream of the seed, as bench/quality_vs_diffusers.py's
shared noise). The loss weightings are written
here as a factor w on DDPM's simple loss ||eps - eps_theta||^2 (std2):
  min_snr5:            w = min(SNR, 5) / SNR (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
                       Weighting Strategy", for an eps network), SNR = alpha^2 / std^2: less weight at low noise;
  snr_over_1_plus_snr: w = SNR / (1 + SNR): less weight at high noise.
Training is deterministic at a given thread count: a configuration run twice gives the same scores to the last
digit. Configurations are independent: two processes with different --configs or --train-seeds (at 1 thread
each) share 2 cores. Writes <out>/recipe_ablations.csv (one row per configuration, training seed, candidate EMA
and NFE).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

# name: what changes (weighting: a factor on the simple loss, below; train / sde / net: fields of those sections)
CONFIGS = {
    "base": {"yardstick": True},
    "min_snr5": {"weighting": "min_snr5"},
    "snr_over_1_plus_snr": {"weighting": "snr_over_1_plus_snr"},
    "cosine_lr_2e-3": {"lr": 2e-3, "train": {"lr_schedule": "cosine"}},
    "cosine_noise_schedule": {"sde": {"schedule": "cosine"}},
    "dropout_0.1": {"net": {"dropout": 0.1}},
    "edm_preconditioning": {"parameterization": {"type": "edm", "sigma_data": 0.75}},  # the digits' std in [-1, 1]
    "adam_betas_0.95": {"adam_betas": (0.95, 0.999)},  # diffusers' train_unconditional.py
    "stratified_times": {"stratified_times": True},
    "batch_64_equal_images": {"batch_size": 64},  # twice the steps, the same images seen
    # the peer for scale: diffusers' recipe at its chosen lr of the quality benchmark, sampled by its own
    # DPMSolverMultistepScheduler from the same x_T
    "diffusers_recipe_2e-3": {"peer": True, "lr": 2e-3, "yardstick": True},
}
YARDSTICK_SEEDS = 3  # trainings of the base recipe and of the peer, by default: their spread is the yardstick
WEIGHTINGS = {  # benchlib.ScorelabTrainer's loss_weight; none (the variant's std2 loss) for the other configurations
    "min_snr5": lambda snr: torch.clamp(5.0 / snr, max=1.0),
    "snr_over_1_plus_snr": lambda snr: snr / (1 + snr),
}


def configured_params(params, change: dict):
    """params with the variant `ddpm` and `train:` changed as a CONFIGS entry says."""
    variant = params.variants["ddpm"]
    update = {key: getattr(variant, key).model_copy(update=change[key]) for key in ("sde", "net") if key in change}
    if "parameterization" in change:
        from scorelab.variant_config import EDMParam

        update["parameterization"] = EDMParam(**change["parameterization"])
    if update:
        params.variants["ddpm"] = variant.model_copy(update=update)
    if "train" in change:
        params = params.model_copy(update={"train": params.train.model_copy(update=change["train"])})
    return params


def new_trainer(params, change: dict, batch: int, steps: int, shape, bf16: bool, args):
    """The configuration's trainer: scorelab's (benchlib.ScorelabTrainer) or, for the peer, diffusers' recipe."""
    lr = change.get("lr", args.lr)
    if change.get("peer"):
        net = params.variants["ddpm"].net
        peer = benchlib.DiffusersTrainer(params, image_size=shape[-1], batch_size=batch, lr=lr, bf16=bf16,
                                         channels=net.channels, channel_mult=tuple(net.channel_mult),
                                         layers_per_block=net.num_res_blocks)
        peer.set_total(steps)
        return peer
    return benchlib.ScorelabTrainer(params, "ddpm", batch_size=batch, lr=lr, steps=steps, bf16=bf16,
                                    profiles=tuple(args.profiles), loss_weight=WEIGHTINGS.get(change.get("weighting")),
                                    stratified_times=change.get("stratified_times", False),
                                    adam_betas=change.get("adam_betas", (0.9, 0.999)))


def scorelab_sampler(model, shape, nfe: int, seed: int, method: str = "dpm_solver") -> torch.Tensor:
    from scorelab.sampling import sample

    return sample(model, model.sde, shape, method=method, steps=nfe, seed=seed).x


PEER_SCHEDULERS = {"dpm_solver": "dpm_solver", "ancestral": "ddpm"}  # scorelab's method -> diffusers' scheduler


def peer_sampler(peer):
    scheduler_config = peer.noise_scheduler.config

    def draw(model, shape, nfe: int, seed: int, method: str = "dpm_solver") -> torch.Tensor:
        return benchlib.sample_unet_from_seed(model, PEER_SCHEDULERS[method], scheduler_config, nfe, shape[0],
                                              shape[1:], seed).x
    return draw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(benchlib.REPO / "params.yaml"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=3600)
    parser.add_argument("--lr", type=float, default=1e-3, help="unless the configuration sets its own")
    parser.add_argument("--profiles", type=float, nargs="*", default=[0.10, 0.15])
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--ancestral", type=int, default=0,
                        help="also score each candidate with its library's ancestral sampler at this many steps (0: no)")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=None,
                        help="params.yaml's seed (initialisation, data order, noise) of each training; default: "
                             f"params.yaml's own, and {YARDSTICK_SEEDS} seeds from it for the yardsticks (the base "
                             "recipe and the peer). The evaluator is the same for all")
    benchlib.add_scoring_args(parser, seeds=[100, 101, 102])
    args = parser.parse_args(argv)

    from scorelab.runtime import resolve_bf16

    torch.set_num_threads(args.threads)
    m = benchlib.machine()
    print(benchlib.machine_line(m), flush=True)
    bf16, _ = resolve_bf16("auto", torch.device("cpu"))
    rows = []
    with benchlib.tmpdir("bench-recipe-") as tmp_name:
        tmp = Path(tmp_name)
        base = benchlib.load_params(args.params, tmp / "data")
        fd = benchlib.DomainFD(base, tmp / "fd", epochs=args.classifier_epochs, reference="full")
        torch.set_num_threads(args.threads)
        def seeds(change: dict) -> list[int]:
            return args.train_seeds or [base.seed + k for k in range(YARDSTICK_SEEDS if change.get("yardstick") else 1)]

        for name, train_seed in [(c, s) for c in args.configs for s in seeds(CONFIGS[c])]:
            change = CONFIGS[name]
            params = configured_params(base.model_copy(update={"seed": train_seed}, deep=True), change)
            batch = change.get("batch_size", params.train.batch_size)  # equal images: steps x batch fixed
            steps = args.steps * params.train.batch_size // batch
            trainer = new_trainer(params, change, batch, steps, fd.shape, bf16, args)
            trainer.model.train()
            start, loss = time.perf_counter(), float("nan")
            while trainer.steps < steps:
                loss = trainer.step()
            seconds = time.perf_counter() - start
            draw = peer_sampler(trainer) if change.get("peer") else scorelab_sampler
            settings = [("dpm_solver", nfe) for nfe in args.nfe]
            if args.ancestral:
                settings.append(("ancestral", args.ancestral))
            for candidate, model in trainer.candidates().items():
                for method, nfe in settings:
                    with torch.no_grad():
                        values = [fd(draw(model, (args.n, *fd.shape), nfe, seed, method)) for seed in args.seeds]
                    mean, std = benchlib.mean_std(values)
                    rows.append({"config": name, "train_seed": train_seed, "candidate": candidate,
                                 "sampler": method, "nfe": nfe, "n": args.n, "fd_mean": round(mean, 3),
                                 "fd_std": round(std, 3),
                                 "fd_per_seed": " ".join(f"{v:.3f}" for v in values), "train_s": round(seconds, 1),
                                 "final_loss": round(loss, 5), "steps": trainer.steps,
                                 **{f"machine_{k}": v for k, v in m.items()}})
                line = ", ".join(f"{r['sampler']} {r['nfe']} {r['fd_mean']:.3f}" for r in rows[-len(settings):])
                print(f"| {name} | seed {train_seed} | {candidate} | {line} |", flush=True)
            benchlib.write_csv(Path(args.out) / "recipe_ablations.csv", rows)  # after each configuration
    return 0


if __name__ == "__main__":
    sys.exit(main())
