"""Quality per compute on digits: scorelab against Hugging Face diffusers' own DDPM recipe, trained for the
same wall-clock budget in the same process, alternating, then sampled with DDIM and DPM-Solver++ at the
same NFE and scored with the evaluate stage's domain Frechet distance.

    .venv/bin/python bench/quality_vs_diffusers.py [--budget 240] [--slice 20] [--nfe 10 20 50]
        [--seeds 0 1 2] [--n 256] [--variant ddpm] [--threads 2] [--save-model PATH] [--out docs/bench]

scorelab: the variant of params.yaml (default `ddpm`: eps loss, EMA 0.995, Adam 2e-3 with warm-up,
batch 128) trained by the pieces of scorelab.training (benchlib.ScorelabTrainer); sampled with
scorelab.sampling.sample (ddim, dpm_solver). diffusers: UNet2DModel with the same widths and blocks per
level, train_unconditional.py's defaults (benchlib.DiffusersTrainer) at the same batch and data stream;
sampled with DDIMScheduler and DPMSolverMultistepScheduler built from its training scheduler's config.
Both start each seed from the same x_T. Writes <out>/quality_vs_diffusers.csv (one row per sampler and
NFE: both sides' mean and std over seeds, the ratio) and quality_vs_diffusers_train.csv, and prints
markdown tables.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

SAMPLERS = {"ddim": ("ddim", "ddim"), "dpm_solver++": ("dpm_solver", "dpm_solver")}  # name: (scorelab, diffusers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(benchlib.REPO / "params.yaml"))
    parser.add_argument("--variant", default="ddpm", help="scorelab's variant of params.yaml (an eps model)")
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds for each side")
    parser.add_argument("--slice", type=float, default=20.0, help="seconds per turn when alternating")
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=256, help="samples per seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="default: params' train.batch_size, both sides")
    parser.add_argument("--diffusers-lr", type=float, default=None, help="default: the recipe's 1e-4")
    parser.add_argument("--classifier-epochs", type=int, default=12)
    parser.add_argument("--save-model", default=None, help="write scorelab's EMA model here (load_trained format)")
    parser.add_argument("--out", default=str(benchlib.REPO / "docs" / "bench"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    from scorelab.checkpoint import write_model
    from scorelab.sampling import sample

    with benchlib.tmpdir("bench-quality-") as tmp_name:
        tmp = Path(tmp_name)
        params = benchlib.load_params(args.params, tmp / "data")
        fd = benchlib.DomainFD(params, tmp, epochs=args.classifier_epochs)
        torch.set_num_threads(args.threads)  # build_featurizer restores the count it found; be explicit
        ours = benchlib.ScorelabTrainer(params, args.variant, args.batch_size)
        vcfg = params.variants[args.variant]
        if vcfg.parameterization.type != "eps" or vcfg.net is None or vcfg.net.type != "unet":
            raise SystemExit(f"variant {args.variant!r}: an eps-parameterised U-Net is needed for this comparison")
        shape = fd.shape
        peer = benchlib.DiffusersTrainer(params, image_size=shape[-1], batch_size=ours.batch_size, lr=args.diffusers_lr,
                                         channels=vcfg.net.channels, channel_mult=tuple(vcfg.net.channel_mult),
                                         layers_per_block=vcfg.net.num_res_blocks)
        m = benchlib.machine()
        print(benchlib.machine_line(m), flush=True)
        print(f"parameters: scorelab {ours.num_params():,}, diffusers {peer.num_params():,}; batch {ours.batch_size}; "
              f"budget {args.budget:.0f} s each in {args.slice:.0f} s slices", flush=True)
        train = benchlib.train_alternating([ours, peer], args.budget, args.slice)

        if args.save_model:
            path = Path(args.save_model)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_model(ours.sampling_model().state_dict(), vcfg, shape, path, step=ours.steps,
                        config_hash="bench-quality_vs_diffusers")

        model = ours.sampling_model()
        unet = peer.sampling_model()

        def peer_eps(x, t):
            return unet(x, t, return_dict=False)[0]

        rows, per = [], {}
        for name, (ours_method, peer_kind) in SAMPLERS.items():
            for nfe in args.nfe:
                for side in ("scorelab", "diffusers"):
                    values, nfes, seconds = [], [], 0.0
                    for seed in args.seeds:
                        tick = time.perf_counter()
                        if side == "scorelab":
                            out = sample(model, ours.sde, (args.n, *shape), method=ours_method, steps=nfe, seed=seed)
                        else:
                            z = benchlib.prior_noise(args.n, shape, seed)
                            out = benchlib.sample_diffusers(peer_eps, benchlib.diffusers_scheduler(
                                peer_kind, peer.noise_scheduler.config), nfe, z, seed)
                        seconds += time.perf_counter() - tick
                        values.append(fd(out.x))
                        nfes.append(out.nfe)
                    mean, std = benchlib.mean_std(values)
                    per[(name, nfe, side)] = (mean, std, values)
                    print(f"{side:9s} {name:12s} NFE {nfes[0]:3d}: domain FD {mean:.2f} ± {std:.2f} "
                          f"({seconds:.1f} s)", flush=True)
                    rows.append({"side": side, "sampler": name, "nfe": nfes[0], "seeds": len(values), "n": args.n,
                                 "fd_mean": round(mean, 3), "fd_std": round(std, 3),
                                 "fd_per_seed": " ".join(f"{v:.3f}" for v in values), "sample_seconds": round(seconds, 2)})
        base = fd.baseline(args.n, args.seeds)
        b_mean, b_std = benchlib.mean_std(base)
        rows.append({"side": "real-vs-real", "sampler": "", "nfe": 0, "seeds": len(base), "n": args.n,
                     "fd_mean": round(b_mean, 3), "fd_std": round(b_std, 3),
                     "fd_per_seed": " ".join(f"{v:.3f}" for v in base), "sample_seconds": ""})

    ratios = []
    for nfe in args.nfe:
        for name in SAMPLERS:
            (a, sa, va), (b, sb, vb) = per[(name, nfe, "scorelab")], per[(name, nfe, "diffusers")]
            ratios.append({"nfe": nfe, "pair": f"{name} vs {name}", "scorelab": a, "scorelab_std": sa, "diffusers": b,
                           "diffusers_std": sb, "ratio": a / b, "ratio_per_seed": [x / y for x, y in zip(va, vb)]})
        best_a = min(SAMPLERS, key=lambda s: per[(s, nfe, "scorelab")][0])
        best_b = min(SAMPLERS, key=lambda s: per[(s, nfe, "diffusers")][0])
        a, sa, va = per[(best_a, nfe, "scorelab")]
        b, sb, vb = per[(best_b, nfe, "diffusers")]
        ratios.append({"nfe": nfe, "pair": f"best: {best_a} vs {best_b}", "scorelab": a, "scorelab_std": sa,
                       "diffusers": b, "diffusers_std": sb, "ratio": a / b,
                       "ratio_per_seed": [x / y for x, y in zip(va, vb)]})
    for r in ratios:
        target = 0.7 if r["nfe"] <= 20 else 1.0
        r["target"] = target
        r["met"] = r["ratio"] <= target
        rows.append({"side": "ratio scorelab/diffusers", "sampler": r["pair"], "nfe": r["nfe"], "seeds": len(args.seeds),
                     "n": args.n, "fd_mean": round(r["ratio"], 3),
                     "fd_std": round(float(torch.tensor(r["ratio_per_seed"]).std()) if len(args.seeds) > 1 else math.nan, 3),
                     "fd_per_seed": " ".join(f"{v:.3f}" for v in r["ratio_per_seed"]), "sample_seconds": "",
                     "target": target, "met": r["met"]})

    out = Path(args.out)
    benchlib.write_csv(out / "quality_vs_diffusers.csv", rows)
    train_rows = [{"side": k, **{kk: round(vv, 2) for kk, vv in v.items()},
                   "params": (ours if k == "scorelab" else peer).num_params(), "batch": ours.batch_size,
                   **{f"machine_{mk}": mv for mk, mv in m.items()}} for k, v in train.items()]
    benchlib.write_csv(out / "quality_vs_diffusers_train.csv", train_rows)

    print(f"\n{benchlib.machine_line(m)}\n")
    print("| side | parameters | training s | steps | images/s |")
    print("|---|---|---|---|---|")
    for r in train_rows:
        print(f"| {r['side']} | {r['params']:,} | {r['seconds']:.0f} | {r['steps']} | {r['images_per_s']:.0f} |")
    print(f"\nthroughput ratio scorelab/diffusers: {train['scorelab']['images_per_s'] / train['diffusers']['images_per_s']:.2f}\n")
    print("| sampler | NFE | scorelab domain FD | diffusers domain FD | ratio | target | met |")
    print("|---|---|---|---|---|---|---|")
    for r in ratios:
        print(f"| {r['pair']} | {r['nfe']} | {r['scorelab']:.2f} ± {r['scorelab_std']:.2f} | "
              f"{r['diffusers']:.2f} ± {r['diffusers_std']:.2f} | {r['ratio']:.2f} | ≤ {r['target']} | "
              f"{'yes' if r['met'] else 'no'} |")
    print(f"| real-vs-real baseline (N = {args.n}) | | {b_mean:.2f} ± {b_std:.2f} | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
