"""Samplers on one network: domain Frechet distance against NFE for every scorelab sampler that applies and
for diffusers' DDPM, DDIM, Euler, Heun and DPM-Solver++ schedulers, all driving the same trained network.

    .venv/bin/python bench/samplers_one_net.py [--model PATH | --train-seconds 240] [--nfe 5 10 20 50 100]
        [--seeds 0 1 2] [--n 256] [--threads 2] [--out docs/bench]

The network is a DDPM-discrete eps model (variant `ddpm` of params.yaml: the 1000-step linear-beta
chain, a VP SDE with piecewise-constant beta), which both libraries use natively: scorelab's conditioning
at chain time t_k = (k+1)/1000 is the step index k, and alpha(t_k)^2 is the chain's alpha-bar_k, which is
diffusers' alphas_cumprod[k] for timestep k. So diffusers' schedulers call the same network as
net(x, timestep) (Euler and Heun pass fractional timesteps, interpolated in log sigma, which the
sinusoidal embedding takes as it is) and no time map is needed. --model loads a scorelab model.pt
(e.g. the one quality_vs_diffusers.py --save-model writes); without it the variant is trained in-process
for --train-seconds (benchlib.ScorelabTrainer).

NFE: grid samplers take steps = NFE; heun (both libraries) steps = (NFE + 1) // 2, i.e. 2 steps - 1
evaluations; scorelab's pc (reverse diffusion + one Langevin corrector, snr 0.16) steps = NFE // 2; the
adaptive ODE (dopri5) runs at the tolerances of --ode-tol and reports the NFE it used. dpm_solver runs on
its default log-SNR grid and, as dpm_solver_uniform, on the time-uniform grid (the DPM-Solver authors'
advice for low-resolution pixel models, and what diffusers' default timestep spacing amounts to). Every NFE in the
table is counted, not computed. Both libraries start seed s from the same x_T.
Writes <out>/samplers_one_net.csv and prints markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

SCORELAB = {  # name: (method, steps for a target NFE, options)
    "ancestral": ("ancestral", lambda n: n, {}),
    "euler_maruyama": ("euler_maruyama", lambda n: n, {}),
    "reverse_diffusion": ("reverse_diffusion", lambda n: n, {}),
    "pc": ("pc", lambda n: max(1, n // 2), {"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16}),
    "ddim": ("ddim", lambda n: n, {"eta": 0.0}),
    "heun": ("heun", lambda n: (n + 1) // 2, {}),
    "dpm_solver": ("dpm_solver", lambda n: n, {}),
    # DPM-Solver's authors advise time-uniform steps for low-resolution pixel models; scorelab's default
    # for dpm_solver is the log-SNR grid
    "dpm_solver_uniform": ("dpm_solver", lambda n: n, {"grid": "uniform"}),
}
DIFFUSERS = {"ddpm": lambda n: n, "ddim": lambda n: n, "euler": lambda n: n, "heun": lambda n: (n + 1) // 2,
             "dpm_solver": lambda n: n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(benchlib.REPO / "params.yaml"))
    parser.add_argument("--variant", default="ddpm")
    parser.add_argument("--model", default=None, help="a scorelab model.pt of the variant; default: train one")
    parser.add_argument("--train-seconds", type=float, default=240.0)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--ode-tol", type=float, nargs="*", default=[1e-2, 1e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--classifier-epochs", type=int, default=12)
    parser.add_argument("--scorelab-methods", nargs="+", default=list(SCORELAB), choices=list(SCORELAB))
    parser.add_argument("--diffusers-schedulers", nargs="+", default=list(DIFFUSERS))
    parser.add_argument("--out", default=str(benchlib.REPO / "docs" / "bench"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    from scorelab.sampling import check_method, sample
    from scorelab.checkpoint import load_trained

    m = benchlib.machine()
    print(benchlib.machine_line(m), flush=True)
    with benchlib.tmpdir("bench-samplers-") as tmp_name:
        tmp = Path(tmp_name)
        params = benchlib.load_params(args.params, tmp / "data")
        fd = benchlib.DomainFD(params, tmp, epochs=args.classifier_epochs)
        torch.set_num_threads(args.threads)
        if args.model:
            trained = load_trained(args.model)
            model, steps_trained, source = trained.model, trained.step, f"loaded from {args.model}"
        else:
            trainer = benchlib.ScorelabTrainer(params, args.variant)
            benchlib.train_alternating([trainer], args.train_seconds, args.train_seconds)
            model, steps_trained, source = trainer.sampling_model(), trainer.steps, f"trained {args.train_seconds:.0f} s"
        sde, net = model.sde, model.net
        if model.kind != "eps" or sde.discrete_times() is None or len(sde.discrete_times()) != 1000 \
                or sde.family != "vp":
            raise SystemExit("this benchmark needs a 1000-step DDPM-chain eps model (variant type ddpm)")
        print(f"model: {args.variant}, {steps_trained} steps ({source})", flush=True)
        shape = fd.shape

        def net_eps(x, t):
            return net(x, t.to(torch.float32))

        rows = []

        def record(lib, method, target, nfe_list, values, seconds, options=""):
            mean, std = benchlib.mean_std(values)
            nfe = nfe_list[0] if len(set(nfe_list)) == 1 else round(sum(nfe_list) / len(nfe_list), 1)
            rows.append({"library": lib, "method": method, "options": options, "target_nfe": target, "nfe": nfe,
                         "fd_mean": round(mean, 3), "fd_std": round(std, 3),
                         "fd_per_seed": " ".join(f"{v:.3f}" for v in values), "seconds": round(seconds, 2)})
            print(f"{lib:9s} {method:18s} NFE {nfe!s:>5}: {mean:7.2f} ± {std:5.2f} ({seconds:.1f} s)", flush=True)

        jobs = []  # NFE outermost, both libraries at each: a run stopped early still holds whole columns
        for target in args.nfe:
            jobs += [("scorelab", method, target) for method in args.scorelab_methods]
            jobs += [("diffusers", kind, target) for kind in args.diffusers_schedulers]
        jobs += [("ode", tol, "adaptive") for tol in args.ode_tol]
        for name in args.scorelab_methods:
            check_method(SCORELAB[name][0], sde.family)
        for lib, method, target in jobs:
            values, nfes, tick = [], [], time.perf_counter()
            for seed in args.seeds:
                if lib == "scorelab":
                    base, to_steps, opts = SCORELAB[method]
                    out = sample(model, sde, (args.n, *shape), method=base, steps=to_steps(target), seed=seed, **opts)
                elif lib == "ode":
                    out = sample(model, sde, (args.n, *shape), method="ode", seed=seed, rtol=method, atol=method)
                else:
                    z = benchlib.prior_noise(args.n, shape, seed)
                    out = benchlib.sample_diffusers(net_eps, benchlib.diffusers_scheduler(method),
                                                    DIFFUSERS[method](target), z, seed)
                values.append(fd(out.x))
                nfes.append(out.nfe)
            if lib == "scorelab":
                record(lib, method, target, nfes, values, time.perf_counter() - tick,
                       " ".join(f"{k}={v}" for k, v in SCORELAB[method][2].items()))
            elif lib == "ode":
                record("scorelab", "ode", "adaptive", nfes, values, time.perf_counter() - tick,
                       f"dopri5 rtol=atol={method:g}")
            else:
                record(lib, method, target, nfes, values, time.perf_counter() - tick,
                       benchlib.DIFFUSERS_SCHEDULERS[method])
            benchlib.write_csv(Path(args.out) / "samplers_one_net.partial.csv", rows)
        base = fd.baseline(args.n, args.seeds)
        b_mean, b_std = benchlib.mean_std(base)
        rows.append({"library": "real-vs-real", "method": "", "options": "", "target_nfe": "", "nfe": 0,
                     "fd_mean": round(b_mean, 3), "fd_std": round(b_std, 3),
                     "fd_per_seed": " ".join(f"{v:.3f}" for v in base), "seconds": ""})

    for r in rows:
        r.update({"model_steps": steps_trained, "n": args.n, "seeds": len(args.seeds),
                  **{f"machine_{k}": v for k, v in m.items()}})
    benchlib.write_csv(Path(args.out) / "samplers_one_net.csv", rows)
    (Path(args.out) / "samplers_one_net.partial.csv").unlink(missing_ok=True)

    # the table: one row per library and method, one column per target NFE
    print(f"\n{benchlib.machine_line(m)}; model {args.variant} {steps_trained} steps; N = {args.n} x {len(args.seeds)} seeds\n")
    targets = args.nfe
    print("| library | method | " + " | ".join(f"NFE {t}" for t in targets) + " |")
    print("|---|---|" + "---|" * len(targets))
    grid_rows = [r for r in rows if r["target_nfe"] not in ("", "adaptive")]
    for lib, method in dict.fromkeys((r["library"], r["method"]) for r in grid_rows):
        cells = []
        for t in targets:
            r = next((r for r in grid_rows if (r["library"], r["method"], r["target_nfe"]) == (lib, method, t)), None)
            cells.append("" if r is None else f"{r['fd_mean']:.1f} ± {r['fd_std']:.1f}"
                         + ("" if r["nfe"] == t else f" ({r['nfe']})"))
        print(f"| {lib} | {method} | " + " | ".join(cells) + " |")
    for r in rows:
        if r["target_nfe"] == "adaptive":
            print(f"| scorelab | ode ({r['options']}) | NFE {r['nfe']}: {r['fd_mean']:.1f} ± {r['fd_std']:.1f} |")
    print(f"\nreal-vs-real baseline (N = {args.n}): {b_mean:.2f} ± {b_std:.2f}\n")
    print("| NFE | scorelab best | diffusers best | ratio | no worse |")
    print("|---|---|---|---|---|")
    for t in targets:
        ours = [r for r in grid_rows if r["library"] == "scorelab" and r["target_nfe"] == t]
        peer = [r for r in grid_rows if r["library"] == "diffusers" and r["target_nfe"] == t]
        if not ours or not peer:
            continue
        a, b = min(ours, key=lambda r: r["fd_mean"]), min(peer, key=lambda r: r["fd_mean"])
        print(f"| {t} | {a['method']} {a['fd_mean']:.1f} ± {a['fd_std']:.1f} | {b['method']} {b['fd_mean']:.1f} ± "
              f"{b['fd_std']:.1f} | {a['fd_mean'] / b['fd_mean']:.2f} | {'yes' if a['fd_mean'] <= b['fd_mean'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
