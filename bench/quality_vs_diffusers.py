"""Quality per image and per second on digits: scorelab against diffusers' DDPM recipe, each with its learning
rate tuned, at two budgets, in one fresh run.

    .venv/bin/python bench/quality_vs_diffusers.py [--steps 3600] [--scorelab-lrs 5e-4 1e-3 2e-3]
        [--diffusers-lrs 2e-3 4e-3 8e-3] [--nfe 10 20 50] [--ancestral 100] [--n 1000] [--seeds 0 1 2 3 4]
        [--ancestral-noise shared] [--bf16 auto] [--save-model PATH] [--out docs/bench]

1. The evaluator: the featurizer stage's DigitClassifier, trained on the train split only
   (scorelab.featurizer.build_featurizer); reference statistics from the full data set (train and test split);
   samples quantised to uint8 as the sample stage stores them. Real-vs-real: N images of the full data set per
   seed against the same reference.
2. Equal images seen: each side trains --steps steps at --batch-size (the same data stream) at every learning
   rate of its sweep. scorelab: the variant of params.yaml (default `ddpm`) with its schedule, its classic EMA
   and --ema-profiles power EMAs (Karras et al. 2024) kept beside it; diffusers: train_unconditional.py's recipe
   (AdamW, cosine with 500 warm-up steps over the run, EMAModel), with a U-Net of the same widths. Each side's
   best is the run (and for scorelab the EMA) of least selection score: domain FD of DPM-Solver++ at
   --select-nfe, mean, on --select-seed, which is not an evaluation seed (no winner's bias in the scores below).
3. Equal wall time: W = the training seconds of scorelab's best run; diffusers at its best learning rate trains
   for W seconds (its cosine aimed at the end of W from its measured step rate). scorelab's model at this budget
   is its equal-images one.
4. Every chosen model is sampled with DDIM and DPM-Solver++ at --nfe and ancestrally (DDPM) at --ancestral, each
   side with its own samplers (diffusers: its schedulers from the training scheduler's config, the pipelines'
   loop, so DDPMScheduler with its defaults: "leading" spacing and clip_sample), from the same x_T per seed,
   N = --n per seed, in float32 (bf16 applies to training only), and scored. With --ancestral-noise shared (the
   default) DDPMScheduler's variance noise is scorelab's per-sample stream of the seed too, so the two ancestral
   samplers share their noise as the deterministic ones share x_T: the comparison of two networks is then not
   swayed by which noise each drew (bench/ancestral_draws.py measures that effect: 0.4 of the score at N = 1000).

The default learning-rate grids bracket each side's best of a first run (scorelab 1e-3 of 1e-3 / 2e-3 / 4e-3,
diffusers 3e-3 of 3e-4 / 1e-3 / 3e-3: both at an edge); docs/BENCHMARKS.md section 1 has both runs.

--bf16 auto|true|false: bfloat16 autocast of both sides' forward passes in training (scorelab's train.bf16;
diffusers' --mixed_precision bf16); auto where this CPU has bf16 kernels.

Writes <out>/quality_vs_diffusers.csv (one row per budget, side, sampler and NFE: mean, std and per-seed values;
the baseline; one row per ratio) and quality_vs_diffusers_train.csv (one row per training run: learning rate,
seconds, steps, images/s, final loss, selection scores, whether chosen), and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

# label: (scorelab's sample method, diffusers' scheduler kind)
SAMPLERS = {"DDIM": ("ddim", "ddim"), "DPM-Solver++": ("dpm_solver", "dpm_solver"), "ancestral": ("ancestral", "ddpm")}
SELECT_SAMPLER = "DPM-Solver++"
# Done-when of the comparison: (budget, what) -> largest ratio scorelab/diffusers
TARGETS = {("images", 10): 0.8, ("images", 20): 0.8, ("images", "best"): 1.0, ("wall", 10): 0.6, ("wall", 20): 0.6}


class Side:
    """How one library's network is sampled: sample(model, label, nfe, n, seed) -> (x, nfe)."""

    def __init__(self, name: str, shape: tuple[int, ...], train_config=None, shared_noise: bool = True):
        self.name, self.shape, self.train_config = name, shape, train_config
        self.shared_noise = shared_noise  # DDPMScheduler's variance noise from scorelab's stream of the seed

    @torch.no_grad()
    def sample(self, model, label: str, nfe: int, n: int, seed: int) -> tuple[torch.Tensor, int]:
        ours, peer = SAMPLERS[label]
        if self.name == "scorelab":
            from scorelab.sampling import sample

            out = sample(model, model.sde, (n, *self.shape), method=ours, steps=nfe, seed=seed)
            return out.x, out.nfe
        out = benchlib.sample_unet_from_seed(model, peer, self.train_config, nfe, n, self.shape, seed,
                                             self.shared_noise)
        return out.x, out.nfe


def train_steps(trainer, steps: int, log_every: int) -> tuple[float, float]:
    """Train to `steps`; (seconds, last loss)."""
    trainer.model.train()
    start, loss = time.perf_counter(), float("nan")
    while trainer.steps < steps:
        loss = trainer.step()
        if log_every and trainer.steps % log_every == 0:
            print(f"    step {trainer.steps}/{steps}, loss {loss:.4f}, {time.perf_counter() - start:.0f} s", flush=True)
    return time.perf_counter() - start, loss


def selection_score(side: Side, model, fd, args) -> float:
    return statistics.fmean(fd(side.sample(model, SELECT_SAMPLER, nfe, args.select_n, args.select_seed)[0])
                            for nfe in args.select_nfe)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(benchlib.REPO / "params.yaml"))
    parser.add_argument("--variant", default="ddpm", help="scorelab's variant of params.yaml (an eps-parameterised U-Net)")
    parser.add_argument("--steps", type=int, default=3600, help="training steps of each side at equal images seen")
    parser.add_argument("--batch-size", type=int, default=None, help="default: params' train.batch_size, both sides")
    parser.add_argument("--scorelab-lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--diffusers-lrs", type=float, nargs="+", default=[2e-3, 4e-3, 8e-3])
    parser.add_argument("--ema-profiles", type=float, nargs="*", default=[0.05, 0.10, 0.15, 0.20],
                        help="sigma_rel of scorelab's power EMA profiles, chosen among with the classic EMA")
    parser.add_argument("--select-nfe", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--select-n", type=int, default=1000)
    parser.add_argument("--select-seed", type=int, default=100)
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50], help="DDIM and DPM-Solver++ steps")
    parser.add_argument("--ancestral", type=int, nargs="*", default=[100], help="ancestral (DDPM) steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ancestral-noise", choices=["shared", "own"], default="shared",
                        help="shared: diffusers' DDPMScheduler draws its variance noise from scorelab's per-sample "
                        "stream of the seed, so both ancestral samplers share noise as DDIM and DPM-Solver++ share "
                        "x_T; own: from its torch.Generator seeded with the seed")
    parser.add_argument("--n", type=int, default=1000, help="samples per seed")
    parser.add_argument("--bf16", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("--slice", type=float, default=20.0, help="seconds between re-aims of diffusers' cosine "
                        "in the equal-wall-time run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--classifier-epochs", type=int, default=12)
    parser.add_argument("--log-every", type=int, default=600)
    parser.add_argument("--save-model", default=None, help="write scorelab's chosen model here (load_trained format)")
    parser.add_argument("--out", default=str(benchlib.REPO / "docs" / "bench"))
    args = parser.parse_args(argv)
    if args.select_seed in args.seeds:
        parser.error(f"--select-seed {args.select_seed} is one of --seeds {args.seeds}: choose the learning rate on "
                     "a seed that is not scored")

    from scorelab.checkpoint import write_model
    from scorelab.runtime import resolve_bf16

    bf16, problem = resolve_bf16({"auto": "auto", "true": True, "false": False}[args.bf16], torch.device("cpu"))
    if problem:
        raise SystemExit(f"--bf16 true: {problem}; use --bf16 auto or false")
    torch.set_num_threads(args.threads)
    shared = args.ancestral_noise == "shared"
    m = benchlib.machine()
    print(benchlib.machine_line(m), flush=True)
    started = time.time()
    train_rows, rows = [], []
    with benchlib.tmpdir("bench-quality-") as tmp_name:
        tmp = Path(tmp_name)
        params = benchlib.load_params(args.params, tmp / "data")
        vcfg = params.variants[args.variant]
        if vcfg.parameterization.type != "eps" or vcfg.net is None or vcfg.net.type != "unet":
            raise SystemExit(f"--variant {args.variant!r}: an eps-parameterised U-Net is needed for this comparison")
        fd = benchlib.DomainFD(params, tmp, epochs=args.classifier_epochs, reference="full")
        torch.set_num_threads(args.threads)  # build_featurizer restores the count it found; be explicit
        shape = fd.shape
        base = fd.baseline(args.n, args.seeds, split="full")
        rows.append({"budget": "", "side": "real-vs-real", "lr": "", "sampler": "", "nfe": 0, "seeds": len(base),
                     "n": args.n, **_stats(base)})
        print(f"real vs real (N = {args.n} of {len(fd.real('full'))}): {_fmt(base)}", flush=True)
        unet_kw = dict(channels=vcfg.net.channels, channel_mult=tuple(vcfg.net.channel_mult),
                       layers_per_block=vcfg.net.num_res_blocks)

        def new_peer(lr: float):
            return benchlib.DiffusersTrainer(params, image_size=shape[-1], batch_size=batch, lr=lr, bf16=bf16, **unet_kw)

        # --- equal images seen: both learning-rate sweeps --------------------------------------------------------
        best = {}  # side -> (score, lr, candidate, model, seconds, steps)
        batch = args.batch_size
        for lr in args.scorelab_lrs:
            ours = benchlib.ScorelabTrainer(params, args.variant, args.batch_size, lr=lr, steps=args.steps, bf16=bf16,
                                            profiles=tuple(args.ema_profiles))
            batch = ours.batch_size
            side = Side("scorelab", shape)
            print(f"scorelab lr {lr:g}: {args.steps} steps at batch {batch}", flush=True)
            seconds, loss = train_steps(ours, args.steps, args.log_every)
            scores = {name: selection_score(side, model, fd, args) for name, model in ours.candidates().items()}
            chosen = min(scores, key=scores.get)
            print(f"  {seconds:.0f} s; selection: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()), flush=True)
            train_rows.append(_train_row("images", "scorelab", lr, seconds, ours, loss, scores, ours.num_params()))
            if "scorelab" not in best or scores[chosen] < best["scorelab"][0]:
                best["scorelab"] = (scores[chosen], lr, chosen, copy.deepcopy(ours.candidates()[chosen]), seconds,
                                    ours.steps)
        if args.save_model:
            path = Path(args.save_model)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_model(best["scorelab"][3].state_dict(), vcfg, shape, path, step=args.steps,
                        config_hash="bench-quality_vs_diffusers")
        peer_config = None
        for lr in args.diffusers_lrs:
            peer = new_peer(lr)
            peer.set_total(args.steps)
            peer_config = peer.noise_scheduler.config
            side = Side("diffusers", shape, peer_config, shared)
            print(f"diffusers lr {lr:g}: {args.steps} steps at batch {batch}", flush=True)
            seconds, loss = train_steps(peer, args.steps, args.log_every)
            model = peer.sampling_model()
            scores = {"ema": selection_score(side, model, fd, args)}
            print(f"  {seconds:.0f} s; selection: ema {scores['ema']:.2f}", flush=True)
            train_rows.append(_train_row("images", "diffusers", lr, seconds, peer, loss, scores, peer.num_params()))
            if "diffusers" not in best or scores["ema"] < best["diffusers"][0]:
                best["diffusers"] = (scores["ema"], lr, "ema", model, seconds, peer.steps)
        for r in train_rows:
            r["chosen"] = r["lr"] == best[r["side"]][1]

        # --- equal wall time: diffusers at its best lr for the seconds scorelab's best took ----------------------
        wall = best["scorelab"][4]
        d_lr, d_seconds, d_steps = best["diffusers"][1], best["diffusers"][4], best["diffusers"][5]
        peer = new_peer(d_lr)
        peer.set_total(round(d_steps * wall / d_seconds))  # re-aimed after every slice from the measured rate
        print(f"diffusers lr {d_lr:g}: {wall:.0f} s (scorelab's best run's time)", flush=True)
        timed = benchlib.train_alternating([peer], wall, args.slice, log=lambda s: None)["diffusers"]
        train_rows.append({**_train_row("wall", "diffusers", d_lr, timed["seconds"], peer, float("nan"), {},
                                        peer.num_params()), "chosen": True})
        print(f"  {peer.steps} steps", flush=True)
        models = {("images", "scorelab"): best["scorelab"][3], ("images", "diffusers"): best["diffusers"][3],
                  ("wall", "diffusers"): peer.sampling_model()}

        # --- evaluation: N per seed, every sampler ---------------------------------------------------------------
        settings = [(label, nfe) for label in ("DDIM", "DPM-Solver++") for nfe in args.nfe]
        settings += [("ancestral", nfe) for nfe in args.ancestral]
        per = {}  # (budget, side, label, nfe) -> per-seed FDs
        for (budget, name), model in models.items():
            side = Side(name, shape, peer_config, shared)
            lr = best[name][1]
            for label, nfe in settings:
                tick, values = time.perf_counter(), []
                for seed in args.seeds:
                    x, used = side.sample(model, label, nfe, args.n, seed)
                    values.append(fd(x))
                per[(budget, name, label, nfe)] = values  # keyed by the steps asked for; `used` is what ran
                print(f"{budget:6s} {name:9s} {label:12s} NFE {used:3d}: {_fmt(values)} "
                      f"({time.perf_counter() - tick:.0f} s)", flush=True)
                rows.append({"budget": budget, "side": name, "lr": lr, "sampler": label, "nfe": used,
                             "seeds": len(values), "n": args.n, **_stats(values),
                             "ancestral_noise": args.ancestral_noise if label == "ancestral" else ""})
    for (budget, name, label, nfe), values in list(per.items()):  # scorelab's equal-time model is its
        if budget == "images" and name == "scorelab":                # equal-images model: the same scores
            per[("wall", name, label, nfe)] = values

    ratios = _ratios(per, args.nfe)
    for r in ratios:
        rows.append({"budget": r["budget"], "side": "ratio scorelab/diffusers", "lr": "", "sampler": r["pair"],
                     "nfe": r["nfe"], "seeds": len(args.seeds), "n": args.n, "mean": round(r["ratio"], 3),
                     "std": round(r["seed_std"], 3), "per_seed": " ".join(f"{v:.3f}" for v in r["per_seed"]),
                     "per_seed_mean_ci95": " ".join(f"{v:.3f}" for v in r["ci"]),
                     "target": r["target"] or "", "met": "" if r["target"] is None else r["ratio"] <= r["target"]})
    out = Path(args.out)
    benchlib.write_csv(out / "quality_vs_diffusers.csv", rows)
    benchlib.write_csv(out / "quality_vs_diffusers_train.csv",
                       [{**r, **{f"machine_{k}": v for k, v in m.items()}} for r in train_rows])
    _print_tables(args, m, train_rows, per, ratios, base, bf16, started)
    return 0


def _stats(values: list[float]) -> dict:
    mean, std = benchlib.mean_std(values)
    return {"mean": round(mean, 3), "std": round(std, 3), "per_seed": " ".join(f"{v:.3f}" for v in values)}


def _fmt(values: list[float]) -> str:
    mean, std = benchlib.mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


def _train_row(budget: str, side: str, lr: float, seconds: float, trainer, loss: float, scores: dict,
               params: int) -> dict:
    return {"budget": budget, "side": side, "lr": lr, "seconds": round(seconds, 1), "steps": trainer.steps,
            "batch": trainer.batch_size, "images_per_s": round(trainer.steps * trainer.batch_size / seconds, 1),
            "final_loss": round(loss, 5), "parameters": params,
            "selection": " ".join(f"{k}={v:.3f}" for k, v in scores.items()),
            "chosen_ema": min(scores, key=scores.get) if scores else ""}


def _ratios(per: dict, nfes: list[int]) -> list[dict]:
    """Per budget: at each NFE of --nfe the best sampler of each side at that NFE, and best against best over
    every setting. The ratio of the means, and per seed (the same seed starts both sides from the same x_T)."""
    out = []
    for budget in ("images", "wall"):
        def best_of(side, nfe=None):
            keys = [k for k in per if k[0] == budget and k[1] == side and (nfe is None or k[3] == nfe)]
            return min(keys, key=lambda k: statistics.fmean(per[k])) if keys else None

        for what in [*nfes, "best"]:
            a, b = best_of("scorelab", None if what == "best" else what), best_of("diffusers", None if what == "best" else what)
            if a is None or b is None:
                continue
            per_seed = [x / y for x, y in zip(per[a], per[b])]
            out.append({"ci": _t_interval(per_seed), "budget": budget, "nfe": what, "pair": f"{a[2]}-{a[3]} vs {b[2]}-{b[3]}",
                        "scorelab": per[a], "diffusers": per[b],
                        "ratio": statistics.fmean(per[a]) / statistics.fmean(per[b]), "per_seed": per_seed,
                        "seed_std": statistics.stdev(per_seed) if len(per_seed) > 1 else float("nan"),
                        "target": TARGETS.get((budget, what))})
    return out


def _t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of the per-seed ratios (the seeds are independent replicates)."""
    from scipy import stats

    if len(values) < 2:
        return float("nan"), float("nan")
    mean, half = statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5
    q = float(stats.t.ppf(0.5 + level / 2, len(values) - 1))
    return mean - q * half, mean + q * half


def _print_tables(args, m, train_rows, per, ratios, base, bf16, started) -> None:
    print(f"\n{benchlib.machine_line(m)}; {time.time() - started:.0f} s in all; bf16 training: {bf16}\n")
    print("| budget | side | lr | training s | steps | images/s | final loss | selection (DPM-Solver++ "
          f"{'/'.join(map(str, args.select_nfe))}, seed {args.select_seed}) | chosen |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in train_rows:
        print(f"| {r['budget']} | {r['side']} | {r['lr']:g} | {r['seconds']:.0f} | {r['steps']:,} | "
              f"{r['images_per_s']:.0f} | {r['final_loss']} | {r['selection']} | "
              f"{(r['chosen_ema'] or 'yes') if r['chosen'] else ''} |")
    print(f"\nDomain FD, N = {args.n} per seed, mean ± std over seeds {args.seeds}; real vs real {_fmt(base)}\n")
    print("| sampler | NFE | scorelab (equal images = equal time) | diffusers, equal images | diffusers, equal time |")
    print("|---|---|---|---|---|")
    for (budget, side, label, nfe) in [k for k in per if k[0] == "images" and k[1] == "scorelab"]:
        cells = [_fmt(per[(b, s, label, nfe)]) if (b, s, label, nfe) in per else "—"
                 for b, s in (("images", "scorelab"), ("images", "diffusers"), ("wall", "diffusers"))]
        print(f"| {label} | {nfe} | " + " | ".join(cells) + " |")
    print("\n| budget | NFE | best pair | scorelab | diffusers | ratio | per seed | per-seed mean, 95% interval "
          "| target | met |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in ratios:
        target = "" if r["target"] is None else f"≤ {r['target']}"
        met = "" if r["target"] is None else ("yes" if r["ratio"] <= r["target"] else "no")
        print(f"| {r['budget']} | {r['nfe']} | {r['pair']} | {_fmt(r['scorelab'])} | {_fmt(r['diffusers'])} | "
              f"{r['ratio']:.2f} | {' '.join(f'{v:.2f}' for v in r['per_seed'])} | "
              f"{statistics.fmean(r['per_seed']):.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | {target} | {met} |")


if __name__ == "__main__":
    sys.exit(main())
