"""toy2d's DDPM variant trained in-process (the preset's network, optimiser, EMA and steps, without Ray),
then sampled with each of its samplers: sliced W2 to a test draw of the exact mixture, mean and std
over seeds. Issue 20's check, "DDIM-10 within 3x of DDIM-20", for a schedule given on the command line.

    PYTHONPATH=src python bench/toy2d_schedule.py --beta-start 1e-4 --beta-end 0.02 [--steps 400]

Run it with PYTHONPATH pointing at another checkout's src/ to compare samplers on the same training.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from scorelab.checkpoint import build_model
from scorelab.ema import EMA
from scorelab.losses import dsm_loss
from scorelab.metrics import sliced_wasserstein
from scorelab.sampling import sample
from scorelab.toy import three_blobs
from scorelab.variant_config import VariantConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--beta-start", type=float, default=1e-4)
    p.add_argument("--beta-end", type=float, default=0.02)
    p.add_argument("--num-steps", type=int, default=200)
    p.add_argument("--steps", type=int, default=400, help="training steps (the preset's train.steps)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    sde_cfg = {"type": "ddpm", "num_steps": args.num_steps, "schedule": "linear",
               "beta_start": args.beta_start, "beta_end": args.beta_end}
    # model_construct: the old preset's schedule is refused by validation now; the SDE itself still builds
    variant = VariantConfig.model_validate({
        "sde": {"type": "ddpm"}, "parameterization": {"type": "eps"},
        "net": {"type": "mlp", "hidden": 128, "layers": 3}, "ema": {"decay": 0.99, "warmup": True},
        "samplers": [{"method": "ddim", "steps": [10]}]})
    from scorelab.sde import get_sde
    model = build_model(variant, (2,))
    model.sde = get_sde("ddpm", **{k: v for k, v in sde_cfg.items() if k != "type"})
    sde = model.sde
    alpha_T, std_T = sde.alpha_std_at(sde.T)
    mix = three_blobs()
    gen = torch.Generator().manual_seed(0)
    x_train = mix.sample(20000, generator=gen)
    x_test = mix.sample(5000, generator=torch.Generator().manual_seed(1))
    ema = EMA(model, decay=0.99, warmup=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    tick = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
        idx = torch.randint(len(x_train), (256,), generator=gen)
        loss = dsm_loss(model, sde, x_train[idx], generator=gen).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update_parameters(model)
    train_s = time.perf_counter() - tick
    net = ema.module
    net.eval()

    out = {"schedule": sde_cfg, "alpha_T": alpha_T, "train_steps": args.steps, "train_s": round(train_s, 1),
           "final_loss": float(loss.detach())}
    base = [sliced_wasserstein(mix.sample(args.n, generator=torch.Generator().manual_seed(100 + s)), x_test, seed=0)
            for s in args.seeds]
    out["real_vs_real"] = _stats(base)
    for method, steps in [("ddim", 10), ("ddim", 20), ("ddim", 50), ("ancestral", 200)]:
        sw, max_abs = [], 0.0
        for s in args.seeds:
            x = sample(net, sde, (args.n, 2), method=method, steps=steps, seed=s).x
            max_abs = max(max_abs, float(x.abs().max()))
            sw.append(sliced_wasserstein(x, x_test, seed=0) if torch.isfinite(x).all() else math.inf)
        out[f"{method}-{steps}"] = {**_stats(sw), "max_abs": max_abs}
    print(json.dumps(out, indent=1))


def _stats(v: list[float]) -> dict[str, float]:
    t = torch.tensor(v, dtype=torch.float64)
    return {"sliced_w2_mean": float(t.mean()), "sliced_w2_std": float(t.std()) if len(v) > 1 else 0.0}


if __name__ == "__main__":
    main()
