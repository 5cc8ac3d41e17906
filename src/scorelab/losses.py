"""Denoising score matching, the one training loss of the family.

With x_t = alpha(t) x_0 + std(t) z, the conditional score of the perturbation kernel is -z / std, so

    per_sample(x_0, t, z) = lambda(t) * || score(x_t, t) + z / std(t) ||^2          (Vincent 2011)

is minimised, in expectation, by the exact score of the perturbed marginal. The residual is computed
as (std score + z) / std, which stays well scaled at tiny std. Weightings lambda(t):

- "std2": lambda = std^2. For an eps-network (score = -eps_theta / std) the loss is exactly
          ||z - eps_theta||^2: DDPM's simple loss (Ho et al. 2020; reduction "mean"), and NCSN's
          lambda(sigma) = sigma^2 (Song & Ermon 2019, eqs. 5-6: half of it, with reduction "sum").
- "g2":   lambda = g(t)^2, the likelihood weighting of Song et al. 2021 ("Maximum likelihood training
          of score-based diffusion models"), which makes the loss a bound on the negative log-likelihood.

t is uniform on [sde.eps, sde.T] for continuous SDEs and uniform over the chain's own times
`sde.discrete_times()` for DDPM and NCSN, which gives the discrete losses of those papers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .sde import SDE, ScoreFn, batch_times, bcast

WEIGHTINGS = ("std2", "g2")
REDUCTIONS = ("mean", "sum")


@dataclass
class LossOutput:
    loss: Tensor  # scalar: the batch mean of per_sample
    per_sample: Tensor  # (B,): lambda(t) ||score + z/std||^2, reduced over the data dims
    t: Tensor  # (B,): the times the samples were perturbed to


def sample_times(
    sde: SDE,
    n: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """n training times: uniform on [eps, T], or uniform over the chain's times for a discrete SDE."""
    gen_device = generator.device if generator is not None else device
    chain = sde.discrete_times()
    if chain is not None:
        idx = torch.randint(len(chain), (n,), generator=generator, device=gen_device)
        t = chain.to(idx.device)[idx]
    else:
        u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64)
        t = sde.eps + (sde.T - sde.eps) * u
    return t.to(device=device, dtype=dtype)


def dsm_loss(
    score_fn: ScoreFn,
    sde: SDE,
    x0: Tensor,
    *,
    weighting: str = "std2",  # "std2" (DDPM / NCSN) or "g2" (likelihood weighting)
    reduction: str = "mean",  # over the data dims of each sample: "mean" or "sum"; the batch is always averaged
    generator: torch.Generator | None = None,  # source of t and z; t is drawn first, then z
    t: Tensor | float | None = None,  # fixed times, scalar or (B,); sampled when None
    noise: Tensor | None = None,  # fixed z shaped like x0 (common random numbers across models); drawn when None
) -> LossOutput:
    """Denoising score matching loss of score_fn on the clean batch x0."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    if t is None:
        t = sample_times(sde, x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
    else:
        t = batch_times(t, x0)
    if noise is None:
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must be shaped like x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")

    alpha, std = sde.alpha_std(t)
    x_t = bcast(alpha, x0) * x0 + bcast(std, x0) * noise
    residual = bcast(std, x0) * score_fn(x_t, t) + noise  # = std (score + z / std)
    sq = residual.flatten(1).pow(2)
    sq = sq.mean(1) if reduction == "mean" else sq.sum(1)
    # lambda / std^2 undoes the std folded into the residual: 1 for std2, g^2 / std^2 for g2.
    factor = 1.0 if weighting == "std2" else sde.f_g2(t)[1] / std**2
    per_sample = factor * sq
    return LossOutput(loss=per_sample.mean(), per_sample=per_sample, t=t)


def _fmt(v: float) -> str:
    return str(round(v, 4))


def loss_per_bin(t: Tensor, per_sample: Tensor, sde: SDE, bins: int = 10) -> dict[str, float]:
    """Mean per-sample loss in equal-width bins, for logging; empty bins are left out.

    Continuous SDEs: bins of t over [0, T], keys "loss_t{lo}-{hi}" (t = T falls in the last bin).
    Discrete chains: bins of the level index i (t = discrete_times()[i], 0 = least noise) over
    0..N-1, at most N bins, keys "loss_i{first}-{last}" with both ends included.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    t = t.detach().double().cpu()
    per_sample = per_sample.detach().double().cpu()
    chain = sde.discrete_times()
    if chain is not None:
        n = len(chain)
        bins = min(bins, n)
        # The nearest chain time, robust to t having been rounded to float32.
        upper = torch.searchsorted(chain, t).clamp(max=n - 1)
        lower = (upper - 1).clamp(min=0)
        level = torch.where(t - chain[lower] < chain[upper] - t, lower, upper)
        which = torch.div(level * bins, n, rounding_mode="floor")
        edges = [math.ceil(b * n / bins) for b in range(bins + 1)]  # bin b holds levels edges[b]..edges[b+1]-1
        names = [f"loss_i{edges[b]}-{edges[b + 1] - 1}" for b in range(bins)]
    else:
        which = torch.floor(t / sde.T * bins).long().clamp(0, bins - 1)
        names = [f"loss_t{_fmt(b * sde.T / bins)}-{_fmt((b + 1) * sde.T / bins)}" for b in range(bins)]
    out = {}
    for b, name in enumerate(names):
        mask = which == b
        if bool(mask.any()):
            out[name] = float(per_sample[mask].mean())
    return out
