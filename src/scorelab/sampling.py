"""Samplers for every SDE of scorelab, driven only by a score function score(x, t).

All grid samplers walk a descending time grid t_0 = T > t_1 > ... > t_{N-1} > t_min, then a last
step to t_N = 0 (see `time_grid`), where alpha = 1 and std = 0: that last step lands on the clean data (for ancestral
sampling, DDIM, Heun and DPM-Solver it is exactly the Tweedie estimate E[x_0 | x_t]). The adaptive
ODE and annealed Langevin stop at a positive noise level and add the Tweedie step when `denoise`.

Every sampler counts its score evaluations by wrapping the score function, so `nfe` is the number
of calls made, never a formula. Noise comes from `SampleNoise`: sample i with seed s draws the same
noise in any batch, so with a score function that treats samples independently it is the same
sample. Exceptions: the adaptive ODE solver (its step sizes are shared by the batch, so results move
within its tolerance), the snr-controlled Langevin corrector (its step size is a batch statistic by
design), and networks whose CPU kernels round differently for different batch sizes (last-bit
differences; `scorelab.generate.BlockedScore` evaluates fixed-size blocks to remove them).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .rng import SampleNoise
from .sde import SDE, ScoreFn, batch_times, bcast

_ALL = frozenset({"vp", "subvp", "ve"})
PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral")
CORRECTORS = ("none", "langevin", "ald")
GRIDS = ("uniform", "log_snr", "edm")
# The log_snr and edm grids stop at sigma_hat = std/alpha >= SIGMA_HAT_MIN unless t_min is given: below
# it the final step to t = 0 (the Tweedie estimate) is as good, and few-step runs should not spend
# steps there. It only binds where sde.eps is smaller (sub-VP's std(1e-3) is 1e-4).
SIGMA_HAT_MIN = 0.01
# The samplers that form x0_hat = (x - std eps_hat) / alpha (ddim, heun, dpm_solver) start no higher than where
# alpha >= X0_ALPHA_MIN: there the division scales the network's error by std/alpha <= 200. Above it the
# first step multiplies that error by alpha_s/alpha_t (measured: 650 on a chain whose alpha(T) is 3.4e-14),
# which the exact score cancels to rounding and a trained network does not. The prior drawn there,
# N(0, std^2 I), drops only alpha x_0 <= 0.005 x_0, as every standard schedule does at T: DDPM's linear
# 1000-step chain (alpha(T) = 0.0064), VP with beta_max 20 (0.0066) and the cosine VP at T = 0.9946
# (0.0084) start at T, unchanged.
X0_ALPHA_MIN = 5e-3
X0_SAMPLERS = frozenset({"ddim", "heun", "dpm_solver"})
THRESHOLDS = ("none", "clip", "dynamic")


@dataclass
class SampleResult:
    x: Tensor  # the samples
    nfe: int  # score evaluations made (one per batched call of score_fn)


class CountingScore:
    """score_fn with a call counter: the honest NFE."""

    def __init__(self, score_fn: ScoreFn):
        self.score_fn, self.calls = score_fn, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.score_fn(x, batch_times(t, x))


# ---------------------------------------------------------------------------------------------
# Time grids


def time_grid(sde: SDE, steps: int, grid: str = "uniform", t_min: float | None = None, rho: float = 7.0,
              t_max: float | None = None) -> Tensor:
    """steps evaluation times from T (or t_max, a chain time for a chain) down, then 0: a float64 tensor of
    length steps + 1.

    The spacing places steps + 1 nodes from T to t_min; the sampler evaluates at the first `steps` and
    its last step goes from there straight to t = 0 (the Tweedie estimate) instead of spending an
    evaluation at t_min, where the sample is already as clean as that step makes it. With five steps
    that evaluation is a fifth of the budget; with many steps the last evaluation approaches t_min.
    (DPM-Solver's own grid ends the same way at t_end, and diffusers' final sigma "zero" likewise.)

    uniform: equal steps in t (DDPM, score_sde).  log_snr: equal steps in lambda = log(alpha/std)
    (DPM-Solver).  edm: sigma_hat = std/alpha spaced as EDM's rho-schedule. t_min defaults to
    sde.eps, raised for log_snr and edm to where sigma_hat = SIGMA_HAT_MIN.
    A discrete chain (DDPM, NCSN; times (k+1)/N) is only evaluated at its own times: uniform spaces
    the nodes from T to 0 (one index below the chain), so `steps` of them are evenly spaced in index
    and steps = N is the whole chain; the other spacings end at the chain's first time and are
    snapped to the nearest distinct chain times.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; valid: {', '.join(GRIDS)}")
    chain = sde.discrete_times()
    t_top = sde.T if t_max is None else float(t_max)
    if chain is not None:
        chain = chain[chain <= t_top * (1 + 1e-12)]
        if steps > len(chain):
            raise ValueError(f"steps={steps} exceeds the {len(chain)} steps of the {sde.name} chain"
                             + ("" if t_max is None else f" at or below t = {t_top:.4g}"))
        t_min = 0.0 if grid == "uniform" else float(chain[0])
    t_hi = torch.tensor(t_top, dtype=torch.float64)
    t_lo = torch.tensor(sde.eps if t_min is None else t_min, dtype=torch.float64)
    if t_min is None and grid != "uniform":
        t_lo = torch.maximum(t_lo, sde.t_from_log_snr(torch.tensor(-math.log(SIGMA_HAT_MIN), dtype=torch.float64)))
    frac = torch.linspace(0, 1, steps + 1, dtype=torch.float64)[:-1]
    if grid == "uniform":
        times = t_hi + frac * (t_lo - t_hi)
    elif grid == "log_snr":
        lam_hi, lam_lo = sde.log_snr(t_hi), sde.log_snr(t_lo)
        times = sde.t_from_log_snr(lam_hi + frac * (lam_lo - lam_hi))
    else:
        s_hi, s_lo = torch.exp(-sde.log_snr(t_hi)), torch.exp(-sde.log_snr(t_lo))
        sig = (s_hi ** (1 / rho) + frac * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
        times = sde.t_from_log_snr(-torch.log(sig))
    times[0] = t_hi  # exact endpoint despite round trips through lambda
    if chain is not None:
        times = chain[_snap_to_chain(times, chain)]
    return torch.cat([times, torch.zeros(1, dtype=torch.float64)])


def _snap_to_chain(times: Tensor, chain: Tensor) -> Tensor:
    """Indices of distinct chain times nearest to the descending `times` (len(times) <= len(chain))."""
    idx = (torch.searchsorted(chain, times).clamp(1, len(chain) - 1))
    nearer_left = (times - chain[idx - 1]).abs() <= (chain[idx] - times).abs()
    idx = torch.where(nearer_left, idx - 1, idx).tolist()
    # keep them strictly decreasing: push collisions down from the top, then up from the bottom
    for i in range(1, len(idx)):
        idx[i] = min(idx[i], idx[i - 1] - 1)
    for i in range(len(idx) - 1, -1, -1):
        idx[i] = max(idx[i], 0 if i == len(idx) - 1 else idx[i + 1] + 1)
    return torch.tensor(idx)


def x0_start(sde: SDE) -> float:
    """Where the samplers that form x0_hat start: T, or the last time (the last chain time, for a chain)
    with alpha >= X0_ALPHA_MIN when alpha(T) is smaller (see X0_ALPHA_MIN)."""
    t = sde.time_of_alpha(X0_ALPHA_MIN)
    chain = sde.discrete_times()
    if t >= sde.T or chain is None:
        return t
    below = chain[chain <= t]
    return float(below[-1]) if len(below) else float(chain[0])


def threshold_x0(x0: Tensor, kind: str = "none", ratio: float = 0.995) -> Tensor:
    """x0_hat kept inside the data's range [-1, 1] (images): "clip" clamps it; "dynamic" is Imagen's dynamic
    thresholding (Saharia et al. 2022; diffusers' `thresholding`): per sample, s = max(1, the `ratio`
    quantile of |x0_hat|), then clamp to [-s, s] and divide by s. "none" returns x0 as it is."""
    if kind == "none":
        return x0
    if kind == "clip":
        return x0.clamp(-1.0, 1.0)
    if kind != "dynamic":
        raise ValueError(f"unknown x0_threshold {kind!r}; valid: {', '.join(THRESHOLDS)}")
    s = torch.quantile(x0.flatten(1).abs().float(), ratio, dim=1).clamp(min=1.0).to(x0.dtype)
    s = bcast(s, x0)
    return torch.maximum(torch.minimum(x0, s), -s) / s


# ---------------------------------------------------------------------------------------------
# One step of each kind, from time t to time s < t. x: (B, ...); t, s: python floats.


def _coeffs(sde: SDE, *times: float) -> list[tuple[float, float]]:
    return [sde.alpha_std_at(u) for u in times]


def _transition(sde: SDE, t: float, s: float) -> tuple[float, float]:
    return sde.transition_at(s, t)


def ancestral_step(score, sde, x, t, s, noise, noise_kind="posterior", x0_threshold="none", threshold_ratio=0.995):
    """p(x_s | x_t) from the exact Gaussian transition x_t = a x_s + sig z with x_0 replaced by its
    Tweedie estimate: mean (x + sig^2 score)/a (DDPM's and SMLD's update), variance sig^2 std_s^2/std_t^2
    (the posterior; DDPM's beta-tilde, SMLD's choice) or sig^2 (DDPM's sigma^2 = beta). With x0_threshold,
    x0_hat is thresholded (threshold_x0) and the score recomputed from it: DDPM's clipped x0 prediction
    (diffusers' DDPMScheduler clip_sample / thresholding) in the posterior mean."""
    a, sig = _transition(sde, t, s)
    grad = score(x, t)
    if x0_threshold != "none":
        (alpha_t, std_t), = _coeffs(sde, t)
        x0_hat = threshold_x0((x + std_t**2 * grad) / alpha_t, x0_threshold, threshold_ratio)
        grad = (alpha_t * x0_hat - x) / std_t**2
    mean = (x + sig**2 * grad) / a
    if s == 0:
        return mean
    (_, std_t), (_, std_s) = _coeffs(sde, t, s)
    var = sig**2 * (std_s**2 / std_t**2 if noise_kind == "posterior" else 1.0)
    return mean + math.sqrt(var) * noise.like(x)


def euler_maruyama_step(score, sde, x, t, s, noise):
    """x_s = x_t - [f x - g^2 score] (t - s) + g sqrt(t - s) z; the last step returns the mean."""
    drift, diffusion = sde.reverse(score).sde(x, t)
    dt = s - t
    mean = x + drift * dt
    if s == 0:
        return mean
    return mean + bcast(diffusion, x) * math.sqrt(-dt) * noise.like(x)


def reverse_diffusion_step(score, sde, x, t, s, noise):
    """Song et al.'s reverse diffusion: the forward step x_t = a x_s + sig z read as x_t = x_s + f + G z
    with f = (a - 1) x and G = sig, then reversed: x_s = x_t - f + G^2 score + G z."""
    a, sig = _transition(sde, t, s)
    mean = (2 - a) * x + sig**2 * score(x, t)
    if s == 0:
        return mean
    return mean + sig * noise.like(x)


def langevin_correct(score, sde, x, t, s, noise, snr, corrector_steps, kind="langevin"):
    """Langevin MCMC at fixed t: x += eps grad + sqrt(2 eps) z, with a^2 = alpha_t^2/alpha_s^2 (DDPM's
    1 - beta for VP, 1 for VE) as in score_sde.

    langevin: eps = 2 a^2 (snr ||z|| / ||score||)^2 with both norms averaged over the batch. The step
    must not depend on the sample's own position: with per-sample norms the chain is no longer
    invariant for p_t (measured: a 2-D mixture's modes drift together), so this corrector, alone
    among the samplers, makes a sample depend on its batch.
    ald: eps = 2 a^2 (snr std_t)^2, per sample and batch-independent.
    """
    a, _ = _transition(sde, t, s)
    (_, std_t), = _coeffs(sde, t)
    for _ in range(corrector_steps):
        grad = score(x, t)
        z = noise.like(x)
        if kind == "langevin":
            grad_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1).mean()
            noise_norm = torch.linalg.vector_norm(z.flatten(1), dim=1).mean()
            step = 2 * a**2 * float(snr * noise_norm / grad_norm.clamp(min=1e-12)) ** 2
        else:
            step = 2 * a**2 * (snr * std_t) ** 2
        x = x + step * grad + math.sqrt(2 * step) * z
    return x


def ddim_step(score, sde, x, t, s, noise, eta=0.0, x0_threshold="none", threshold_ratio=0.995):
    """Generalised DDIM for any x_t = alpha x_0 + std z: x_s = alpha_s x0_hat + sqrt(std_s^2 - c^2) eps_hat + c z
    with c^2 = eta^2 (std_s/std_t)^2 (std_t^2 - (alpha_t/alpha_s)^2 std_s^2); eta = 1 is the ancestral
    posterior, eta = 0 the deterministic DDIM (for VE: Euler in sigma). With x0_threshold, x0_hat is
    thresholded (threshold_x0) and eps_hat recomputed from it, as diffusers' DDIM does."""
    (alpha_t, std_t), (alpha_s, std_s) = _coeffs(sde, t, s)
    eps_hat = -std_t * score(x, t)
    x0_hat = (x - std_t * eps_hat) / alpha_t
    if x0_threshold != "none":
        x0_hat = threshold_x0(x0_hat, x0_threshold, threshold_ratio)
        eps_hat = (x - alpha_t * x0_hat) / std_t
    if s == 0:
        return x0_hat
    _, sig = _transition(sde, t, s)
    c = eta * std_s / std_t * sig
    out = alpha_s * x0_hat + math.sqrt(max(std_s**2 - c**2, 0.0)) * eps_hat
    return out + c * noise.like(x) if c > 0 else out


# ---------------------------------------------------------------------------------------------
# Samplers: each gets the counting score, the SDE, x_T, the grid and the noise streams.

_SAMPLERS: dict[str, tuple[Callable, frozenset[str], str]] = {}


def _register(name: str, families: frozenset[str] = _ALL, default_grid: str = "uniform"):
    def wrap(fn):
        _SAMPLERS[name] = (fn, families, default_grid)
        return fn

    return wrap


def _walk(grid: Tensor, progress: bool, desc: str):
    pairs = list(zip(grid[:-1].tolist(), grid[1:].tolist()))
    return tqdm(pairs, desc=desc, disable=not progress, leave=False)


@_register("ancestral")
def _ancestral(score, sde, x, grid, noise, progress, noise_kind="posterior", x0_threshold="none",
               threshold_ratio=0.995):
    if noise_kind not in ("posterior", "transition"):
        raise ValueError(f"noise must be 'posterior' or 'transition', got {noise_kind!r}")
    _check_threshold(x0_threshold, threshold_ratio)
    for t, s in _walk(grid, progress, "ancestral"):
        x = ancestral_step(score, sde, x, t, s, noise, noise_kind, x0_threshold, threshold_ratio)
    return x


@_register("euler_maruyama")
def _euler_maruyama(score, sde, x, grid, noise, progress):
    for t, s in _walk(grid, progress, "euler_maruyama"):
        x = euler_maruyama_step(score, sde, x, t, s, noise)
    return x


@_register("reverse_diffusion")
def _reverse_diffusion(score, sde, x, grid, noise, progress):
    for t, s in _walk(grid, progress, "reverse_diffusion"):
        x = reverse_diffusion_step(score, sde, x, t, s, noise)
    return x


_PREDICTOR_STEPS = {
    "euler_maruyama": euler_maruyama_step,
    "reverse_diffusion": reverse_diffusion_step,
    "ancestral": ancestral_step,
}


@_register("pc")
def _pc(score, sde, x, grid, noise, progress, predictor="reverse_diffusion", corrector="langevin",
        snr=0.16, corrector_steps=1):
    """Predictor-corrector (Song et al. 2021): at each t, corrector_steps of Langevin, then one predictor step."""
    if predictor not in _PREDICTOR_STEPS:
        raise ValueError(f"unknown predictor {predictor!r}; valid: {', '.join(PREDICTORS)}")
    if corrector not in CORRECTORS:
        raise ValueError(f"unknown corrector {corrector!r}; valid: {', '.join(CORRECTORS)}")
    step = _PREDICTOR_STEPS[predictor]
    for t, s in _walk(grid, progress, f"pc[{predictor}+{corrector}]"):
        if corrector != "none":
            x = langevin_correct(score, sde, x, t, s, noise, snr, corrector_steps, corrector)
        x = step(score, sde, x, t, s, noise)
    return x


@_register("ald", families=frozenset({"ve"}), default_grid="log_snr")
def _ald(score, sde, x, grid, noise, progress, steps_each=100, step_lr=2e-5, denoise=True):
    """NCSN's annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over the noise levels of the grid:
    at level sigma_i, steps_each updates x += a_i/2 score + sqrt(a_i) z with a_i = step_lr sigma_i^2/sigma_L^2."""
    levels = grid[:-1].tolist()
    (_, std_last), = _coeffs(sde, levels[-1])
    for t in tqdm(levels, desc="ald", disable=not progress, leave=False):
        (_, std_t), = _coeffs(sde, t)
        a = step_lr * (std_t / std_last) ** 2
        for _ in range(steps_each):
            x = x + 0.5 * a * score(x, t) + math.sqrt(a) * noise.like(x)
    return _tweedie(score, sde, x, levels[-1]) if denoise else x


def _tweedie(score, sde, x, t):
    (alpha, std), = _coeffs(sde, t)
    return (x + std**2 * score(x, t)) / alpha


def _check_threshold(x0_threshold: str, threshold_ratio: float) -> None:
    if x0_threshold not in THRESHOLDS:
        raise ValueError(f"unknown x0_threshold {x0_threshold!r}; valid: {', '.join(THRESHOLDS)}")
    if not 0 < threshold_ratio < 1:
        raise ValueError(f"threshold_ratio must be in (0, 1), got {threshold_ratio}")


@_register("ddim")
def _ddim(score, sde, x, grid, noise, progress, eta=0.0, x0_threshold="none", threshold_ratio=0.995):
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    _check_threshold(x0_threshold, threshold_ratio)
    for t, s in _walk(grid, progress, "ddim"):
        x = ddim_step(score, sde, x, t, s, noise, eta, x0_threshold, threshold_ratio)
    return x


@_register("heun", default_grid="edm")
def _heun(score, sde, x, grid, noise, progress, x0_threshold="none", threshold_ratio=0.995):
    """Heun's method on the probability-flow ODE in EDM's coordinates x_hat = x/alpha, sigma_hat = std/alpha,
    where dx_hat/dsigma_hat = -std score(x, t) (the predicted noise). The last step, to sigma_hat = 0,
    is a plain Euler step (as in EDM): NFE = 2 steps - 1. With x0_threshold, each derivative is
    (x_hat - x0_hat) / sigma_hat with x0_hat thresholded (threshold_x0)."""
    _check_threshold(x0_threshold, threshold_ratio)

    def slope(x_hat, t, alpha, std):
        d = -std * score(alpha * x_hat, t)
        if x0_threshold == "none":
            return d
        sigma_hat = std / alpha
        return (x_hat - threshold_x0(x_hat - sigma_hat * d, x0_threshold, threshold_ratio)) / sigma_hat

    for t, s in _walk(grid, progress, "heun"):
        (alpha_t, std_t), (alpha_s, std_s) = _coeffs(sde, t, s)
        x_hat = x / alpha_t
        d = slope(x_hat, t, alpha_t, std_t) if x0_threshold != "none" else -std_t * score(x, t)
        x_hat_next = x_hat + (std_s / alpha_s - std_t / alpha_t) * d
        if s > 0:
            d_next = slope(x_hat_next, s, alpha_s, std_s)
            x_hat_next = x_hat + (std_s / alpha_s - std_t / alpha_t) * 0.5 * (d + d_next)
        x = alpha_s * x_hat_next
    return x


@_register("dpm_solver", default_grid="log_snr")
def _dpm_solver(score, sde, x, grid, noise, progress, lower_order_final=True, x0_threshold="none",
                threshold_ratio=0.995):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) with the data prediction x0_hat = (x + std^2 score)/alpha
    (thresholded with x0_threshold, as the authors do for pixel models). The first step and the step to
    t = 0 are first order; with lower_order_final, so is the last step of a run of fewer than 15 steps
    (as the authors recommend)."""
    _check_threshold(x0_threshold, threshold_ratio)
    pairs = list(zip(grid[:-1].tolist(), grid[1:].tolist()))
    x0_prev, h_prev = None, None
    for i, (t, s) in enumerate(tqdm(pairs, desc="dpm_solver", disable=not progress, leave=False)):
        x0 = threshold_x0(_tweedie(score, sde, x, t), x0_threshold, threshold_ratio)
        if s == 0:
            x = x0
            break
        (alpha_t, std_t), (alpha_s, std_s) = _coeffs(sde, t, s)
        h = math.log(alpha_s / std_s) - math.log(alpha_t / std_t)
        last = i == len(pairs) - 2 and lower_order_final and len(pairs) < 15
        if x0_prev is None or last:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (std_s / std_t) * x - alpha_s * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def _ode_sample(score, sde, x, noise, progress, rtol=1e-5, atol=1e-5, solver="dopri5", denoise=True, t_min=None):
    """The probability-flow ODE from T to t_min with torchdiffeq's adaptive solver, on x's device."""
    from torchdiffeq import odeint

    t_end = sde.eps if t_min is None else t_min
    reverse = sde.reverse(score, probability_flow=True)

    def velocity(t: Tensor, y: Tensor) -> Tensor:
        return reverse.sde(y, t.to(y.dtype))[0]

    ts = torch.tensor([sde.T, t_end], dtype=x.dtype, device=x.device)
    # step_t: land exactly on t_end; dopri5 would otherwise step past it (to t < 0, where VE has no std)
    options = {"step_t": ts} if solver in ("dopri5", "bosh3", "adaptive_heun", "dopri8", "fehlberg2") else None
    x = odeint(velocity, x, ts, rtol=rtol, atol=atol, method=solver, options=options)[-1]
    return _tweedie(score, sde, x, t_end) if denoise else x


SAMPLER_FAMILIES: dict[str, frozenset[str]] = {name: fams for name, (_, fams, _) in _SAMPLERS.items()}
SAMPLER_FAMILIES["ode"] = _ALL
SAMPLER_FAMILIES = {m: SAMPLER_FAMILIES[m] for m in
                    ("ancestral", "euler_maruyama", "reverse_diffusion", "pc", "ald", "ode", "ddim", "heun", "dpm_solver")}


def methods_for(family: str) -> list[str]:
    """The sampling methods defined for an SDE family ("vp", "subvp", "ve")."""
    return [m for m, fams in SAMPLER_FAMILIES.items() if family in fams]


def check_method(method: str, family: str) -> None:
    """Raise ValueError naming the valid methods unless `method` is defined for SDEs of `family`."""
    if method not in SAMPLER_FAMILIES:
        raise ValueError(f"unknown sampling method {method!r}; valid: {', '.join(SAMPLER_FAMILIES)}")
    if family not in SAMPLER_FAMILIES[method]:
        raise ValueError(
            f"sampling method {method!r} is not defined for {family!r} SDEs; valid for {family!r}: "
            f"{', '.join(methods_for(family))}"
        )


def _options_of(fn: Callable) -> list[str]:
    params = list(inspect.signature(fn).parameters)
    return params[params.index("progress") + 1:]


_COMMON_OPTIONS = {"grid", "t_min", "rho"}


def sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: tuple[int, ...],
    method: str = "ode",
    steps: int | None = None,
    seed: int = 0,
    *,
    indices: Tensor | None = None,  # global sample indices (default 0..N-1): a sample's identity across batches
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    **options,
) -> SampleResult:
    """Draw shape[0] samples with `method`; see the module docstring and each sampler for options.

    Grid samplers take `steps` (the grid's evaluation times) and the grid options `grid`
    ("uniform", "log_snr", "edm"; each sampler has its own default), `t_min` (default sde.eps) and
    `rho` (edm grid). ode ignores steps and takes rtol, atol, solver, denoise, t_min.
    """
    check_method(method, sde.family)
    if method == "ode":
        fn, valid = _ode_sample, ["rtol", "atol", "solver", "denoise", "t_min"]
    else:
        fn, _, default_grid = _SAMPLERS[method]
        valid = _options_of(fn) + sorted(_COMMON_OPTIONS)
    # config spells the ancestral noise option `noise`; the function argument is noise_kind
    if method == "ancestral" and "noise" in options:
        options["noise_kind"] = options.pop("noise")
    unknown = sorted(set(options) - set(valid))
    if unknown:
        shown = ["noise" if v == "noise_kind" else v for v in valid]
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid: {', '.join(shown)}")

    n = shape[0]
    indices = torch.arange(n) if indices is None else torch.as_tensor(indices)
    if indices.shape != (n,):
        raise ValueError(f"indices must have shape ({n},), got {tuple(indices.shape)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    noise = SampleNoise(seed, indices, device=device)
    t_start = x0_start(sde) if method in X0_SAMPLERS else sde.T
    prior_std = sde.prior_std if t_start == sde.T else sde.alpha_std_at(t_start)[1]  # N(0, std^2 I) where it starts
    x = prior_std * noise.randn(shape[1:], dtype=dtype)
    score = CountingScore(score_fn)

    with torch.no_grad():
        if method == "ode":
            x = fn(score, sde, x, noise, progress, **options)
        else:
            grid_opts = {k: options.pop(k) for k in list(options) if k in _COMMON_OPTIONS}
            if method == "ald" and steps is None and sde.discrete_times() is not None:
                steps = len(sde.discrete_times())  # NCSN: every level of its ladder
            if steps is None:
                raise ValueError(f"method {method!r} needs steps (a positive integer)")
            grid = time_grid(sde, int(steps), grid_opts.get("grid", default_grid), grid_opts.get("t_min"),
                             grid_opts.get("rho", 7.0), t_max=None if t_start == sde.T else t_start)
            x = fn(score, sde, x, grid, noise, progress, **options)
    return SampleResult(x=x, nfe=score.calls)
