"""Overheads and the hardware limit: the machine's measured fp32 matmul rate, the digits U-Net's FLOPs per
image, the GFLOP/s reached in training and in sampling, and what the samplers and the training step cost
beyond the bare network.

    .venv/bin/python bench/overheads.py [--variants ddpm vp] [--threads 2] [--sample-batch 256 32]
        [--steps 20] [--train-steps 30] [--repeats 3] [--out docs/bench]

- peak: torch.mm of square fp32 matrices (512, 1024, 2048), the best rate over sizes, at --threads threads.
- FLOPs: torch.utils.flop_counter.FlopCounterMode over one forward of the U-Net (matmuls, convolutions,
  attention; not norms or activations), per image; a training step is counted forward + backward.
- sampling: scorelab.sampling.sample(method, steps) against a bare loop of the same number of
  x = net(x, noise_cond) calls (no_grad, the same shapes; each call on the previous output, so that
  neither side reads a cache-hot input); overhead = sample / bare - 1.
- training: the body of scorelab.training.train_loop's step (data, lr, dsm_loss forward + backward with
  its generator, the loss window's copies, clipping, the finiteness check, Adam, EMA) timed piece by
  piece, against a bare forward + MSE + backward of the network on the same batch; overhead = step / bare - 1.
Times are the minimum over --repeats alternating repetitions, by --clock: wall (default; for a quiet
machine) or cpu, CPU seconds of the process divided by its threads (for shared cores: the other
processes' time is not counted, but idle intra-op threads spinning between small ops are). Writes <out>/overheads.csv and prints markdown tables.
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

METHODS = ["ddim", "dpm_solver", "ancestral", "euler_maruyama", "heun"]


_THREADS = [1]
_CLOCK = ["wall"]


def CLOCK() -> float:
    """Wall-clock seconds, or with --clock cpu the CPU seconds of this process divided by its threads: on
    shared cores the time the other processes take is then not counted (wall-clock repeats on an
    oversubscribed machine varied by 2x), but threads spinning while they wait for work are."""
    if _CLOCK[0] == "wall":
        return time.perf_counter()
    return time.process_time() / _THREADS[0]


def timed(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        tick = CLOCK()
        fn()
        best = min(best, CLOCK() - tick)
    return best


def train_step_timers(trainer, steps: int) -> dict[str, float]:
    """`steps` steps of the training loop's body with its own phases timed (s per step)."""
    from scorelab.losses import dsm_loss
    from scorelab.training import mix_seed

    t = trainer
    spent = dict.fromkeys(("data", "forward_backward", "optimizer"), 0.0)
    window: dict[str, list] = {"loss": [], "t": [], "per_sample": []}
    start = CLOCK()
    for _ in range(steps):
        step = t.steps
        lr = t.train.lr * min(1.0, (step + 1) / t.train.warmup_steps) if t.train.warmup_steps else t.train.lr
        for group in t.opt.param_groups:
            group["lr"] = lr
        t.opt.zero_grad(set_to_none=True)
        tick = CLOCK()
        x0 = t.loader.batch(step)
        spent["data"] += CLOCK() - tick
        tick = CLOCK()
        gen = torch.Generator().manual_seed(mix_seed(t.params.seed, 0, step, 2))
        out = dsm_loss(t.model, t.sde, x0, weighting=t.variant.loss.weighting, reduction=t.variant.loss.reduction,
                       generator=gen)
        out.loss.backward()
        step_loss = out.loss.item()
        window["t"].append(out.t.detach().float().cpu())
        window["per_sample"].append(out.per_sample.detach().float().cpu())
        spent["forward_backward"] += CLOCK() - tick
        tick = CLOCK()
        grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.train.grad_clip or math.inf)
        if not (math.isfinite(step_loss) and torch.isfinite(grad_norm)):
            raise RuntimeError("non-finite loss in the benchmark")
        t.opt.step()
        t.ema.update(t.model)
        window["loss"].append(step_loss)
        spent["optimizer"] += CLOCK() - tick
        t.steps += 1
    total = CLOCK() - start
    return {"step": total / steps, **{k: v / steps for k, v in spent.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(benchlib.REPO / "params.yaml"))
    parser.add_argument("--variants", nargs="+", default=["ddpm", "vp"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample-batch", type=int, nargs="*", default=[256, 32])
    parser.add_argument("--steps", type=int, default=20, help="sampler steps")
    parser.add_argument("--methods", nargs="*", default=METHODS, help="none: training only")
    parser.add_argument("--train-steps", type=int, default=30, help="steps per timed repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall on a quiet machine; cpu on a shared one")
    parser.add_argument("--matmul-seconds", type=float, default=1.0)
    parser.add_argument("--out", default=str(benchlib.REPO / "docs" / "bench"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    _THREADS[0], _CLOCK[0] = args.threads, args.clock
    from scorelab.sampling import sample

    m = benchlib.machine()
    print(benchlib.machine_line(m), flush=True)
    peak, peak_n = benchlib.peak_matmul(seconds=args.matmul_seconds, clock=CLOCK)
    print(f"peak fp32 matmul: {peak:.1f} GFLOP/s (n = {peak_n})", flush=True)
    rows = [{"kind": "peak_matmul", "variant": "", "what": f"torch.mm fp32 {peak_n}x{peak_n}", "batch": "",
             "nfe": "", "seconds": "", "bare_seconds": "", "overhead": "", "gflops": round(peak, 2),
             "frac_of_peak": 1.0}]
    sampling, training = [], []
    with benchlib.tmpdir("bench-overheads-") as tmp_name:
        params = benchlib.load_params(args.params, Path(tmp_name) / "data")
        torch.set_num_threads(args.threads)
        for variant in args.variants:
            trainer = benchlib.ScorelabTrainer(params, variant)
            model, sde, net = trainer.model, trainer.sde, trainer.model.net
            with torch.no_grad():  # a zero output layer (the nets' init) would make every sampler trivial
                for p in net.conv_out.parameters():
                    p.normal_(0, 1e-2)
            shape = tuple(trainer.loader.x.shape[1:])
            flops_img = benchlib.count_flops(lambda: net(torch.randn(8, *shape), torch.full((8,), 500.0))) / 8
            x = trainer.loader.batch(0)
            bsz = x.shape[0]
            cond = torch.full((bsz,), 500.0)

            def bare_train():
                out = net(x, cond)
                torch.nn.functional.mse_loss(out, x).backward()
                net.zero_grad(set_to_none=True)

            flops_train = benchlib.count_flops(bare_train) / bsz
            rows.append({"kind": "flops", "variant": variant, "what": "forward per image", "batch": "", "nfe": "",
                         "seconds": "", "bare_seconds": "", "overhead": "", "gflops": flops_img / 1e9, "frac_of_peak": ""})
            rows.append({"kind": "flops", "variant": variant, "what": "training forward+backward per image",
                         "batch": "", "nfe": "", "seconds": "", "bare_seconds": "", "overhead": "",
                         "gflops": flops_train / 1e9, "frac_of_peak": ""})
            print(f"[{variant}] {trainer.num_params():,} parameters; {flops_img / 1e6:.1f} MFLOP per image forward, "
                  f"{flops_train / 1e6:.1f} MFLOP forward+backward", flush=True)

            # training: bare forward+backward against the loop's step, alternating; the step with the fused
            # Adam that training.py uses and with the per-tensor Adam it used before (before/after of the fix)
            before = benchlib.ScorelabTrainer(params, variant, fused=False)
            for _ in range(3):
                bare_train()
            train_step_timers(trainer, 3)
            train_step_timers(before, 3)
            bare_t, best = math.inf, {"fused": None, "per-tensor": None}
            for _ in range(args.repeats):
                bare_t = min(bare_t, timed(lambda: [bare_train() for _ in range(args.train_steps)], 1) / args.train_steps)
                for label, tr in (("fused", trainer), ("per-tensor", before)):
                    timers = train_step_timers(tr, args.train_steps)
                    if best[label] is None or timers["step"] < best[label]["step"]:
                        best[label] = timers
            for label, step_t in best.items():
                over = step_t["step"] / bare_t - 1
                g = flops_train * bsz / step_t["step"] / 1e9
                training.append({"variant": variant, "adam": label, "batch": bsz, **step_t, "bare": bare_t,
                                 "overhead": over, "gflops": g})
                rows.append({"kind": "train_step", "variant": variant,
                             "what": f"training.py step body ({label} Adam) vs bare fwd+bwd", "batch": bsz, "nfe": "",
                             "seconds": step_t["step"], "bare_seconds": bare_t, "overhead": over, "gflops": g,
                             "frac_of_peak": g / peak, "data_s": step_t["data"],
                             "fwd_bwd_s": step_t["forward_backward"], "optimizer_ema_s": step_t["optimizer"]})
                print(f"[{variant}] train step ({label} Adam) {step_t['step'] * 1e3:.1f} ms (data "
                      f"{step_t['data'] * 1e3:.2f}, fwd+bwd {step_t['forward_backward'] * 1e3:.1f}, optimizer+EMA "
                      f"{step_t['optimizer'] * 1e3:.2f}) vs bare {bare_t * 1e3:.1f} ms: overhead {over:+.1%}", flush=True)

            # sampling
            model.eval()
            for batch in args.sample_batch:
                xb = torch.randn(batch, *shape)
                cb = torch.full((batch,), 500.0)
                for method in args.methods:
                    steps = args.steps if method != "heun" else (args.steps + 1) // 2
                    nfe = sample(model, sde, (batch, *shape), method=method, steps=steps, seed=0).nfe

                    def bare(nfe=nfe):
                        x = xb
                        with torch.no_grad():
                            for _ in range(nfe):  # each call on the last one's output, as a sampler's calls are
                                x = net(x, cb)

                    def full(method=method, steps=steps):
                        sample(model, sde, (batch, *shape), method=method, steps=steps, seed=0)

                    bare_s, full_s = math.inf, math.inf
                    for _ in range(args.repeats):
                        bare_s = min(bare_s, timed(bare, 1))
                        full_s = min(full_s, timed(full, 1))
                    over = full_s / bare_s - 1
                    g = flops_img * batch * nfe / full_s / 1e9
                    sampling.append({"variant": variant, "method": method, "batch": batch, "nfe": nfe,
                                     "sample": full_s, "bare": bare_s, "overhead": over, "gflops": g})
                    rows.append({"kind": "sampling", "variant": variant, "what": method, "batch": batch, "nfe": nfe,
                                 "seconds": full_s, "bare_seconds": bare_s, "overhead": over, "gflops": g,
                                 "frac_of_peak": g / peak})
                    print(f"[{variant}] {method:14s} batch {batch:3d} NFE {nfe:3d}: {full_s * 1e3 / nfe:6.2f} ms/NFE vs "
                          f"bare {bare_s * 1e3 / nfe:6.2f}: overhead {over:+.1%}, {g:.1f} GFLOP/s", flush=True)

    for r in rows:
        for k, v in list(r.items()):
            if isinstance(v, float):
                r[k] = round(v, 6)
        r.update({f"machine_{k}": v for k, v in m.items()})
    benchlib.write_csv(Path(args.out) / "overheads.csv", rows)

    print(f"\n{benchlib.machine_line(m)}; peak fp32 matmul {peak:.1f} GFLOP/s (n = {peak_n})\n")
    print("| variant | Adam | batch | step ms | data | fwd+bwd | optimizer+EMA | bare fwd+bwd ms | overhead (target < 10%) | GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in training:
        print(f"| {r['variant']} | {r['adam']} | {r['batch']} | {r['step'] * 1e3:.1f} | {r['data'] * 1e3:.2f} | "
              f"{r['forward_backward'] * 1e3:.1f} | {r['optimizer'] * 1e3:.2f} | {r['bare'] * 1e3:.1f} | "
              f"{r['overhead']:+.1%} | {r['gflops']:.1f} | {r['gflops'] / peak:.0%} |")
    print("\n| variant | method | batch | NFE | ms per NFE | bare ms per NFE | overhead (target < 5%) | GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sampling:
        print(f"| {r['variant']} | {r['method']} | {r['batch']} | {r['nfe']} | {r['sample'] * 1e3 / r['nfe']:.2f} | "
              f"{r['bare'] * 1e3 / r['nfe']:.2f} | {r['overhead']:+.1%} | {r['gflops']:.1f} | {r['gflops'] / peak:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
