"""Log-likelihoods through the probability-flow ODE, and bits/dim of discrete data.

The probability-flow ODE dx/dt = v(x, t) = f(t) x - 1/2 g(t)^2 score(x, t) carries the model's
density at t = eps to its density at T, and along a trajectory d log p_t(x_t)/dt = -div v(x_t, t):

    log p_eps(x) = log p_T(x_T) + int_eps^T div v(x_t, t) dt,

with p_T taken to be the SDE's prior (Song et al. 2021, appendix D) unless `prior_logp` is given. The divergence is either exact,
one vector-Jacobian product per dimension, or the Hutchinson-Skilling estimate z^T (dv/dx) z with
probes z drawn per sample, so that a sample's result does not depend on the batch it is in.

The ODE state is kept in float64 (the divergence integral sums many small terms); the score function
is called on x in the input's dtype, so a float32 network sees float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torchdiffeq import odeint

from .rng import SampleNoise
from .sde import SDE, ScoreFn

PROBES = ("rademacher", "gaussian")
# torchdiffeq's adaptive solvers step past the end time and interpolate back; they are told to stop at
# T instead, since some schedules (the cosine VP) are undefined beyond it.
_ADAPTIVE = frozenset({"dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun"})


@dataclass(frozen=True)
class LikelihoodResult:
    logp: Tensor  # (N,) float64: log p_eps(x) in nats, on x's device
    stderr: Tensor  # (N,) Monte-Carlo standard error of logp: 0 when exact, nan with a single probe
    nfe: int  # score evaluations made (each one evaluates the whole batch)


@dataclass(frozen=True)
class BitsPerDimResult:
    bpd: Tensor  # (N,) float64: per-sample bits/dim (an upper bound on the discrete NLL in expectation)
    stderr: Tensor  # (N,) its Monte-Carlo standard error in bits/dim (Hutchinson only; 0 when exact)
    nfe: int  # score evaluations made


class _CountedScore:
    """Wraps a score function and counts its calls, so nfe reports what was really evaluated; also
    refuses a score that autograd cannot see through (its divergence would silently be zero)."""

    def __init__(self, score_fn: ScoreFn):
        self.score_fn, self.calls = score_fn, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        s = self.score_fn(x, t)
        if x.requires_grad and not s.requires_grad:
            raise RuntimeError(
                "likelihood: the score is not differentiable in x; does the score function run under "
                "torch.no_grad() or detach its output?"
            )
        return s


def _vjp(v: Tensor, x: Tensor, cotangent: Tensor, retain: bool) -> Tensor:
    """cotangent^T dv/dx; zero if x is unused (v then does not depend on it)."""
    (g,) = torch.autograd.grad(v, x, grad_outputs=cotangent, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _exact_divergence(v: Tensor, x: Tensor) -> Tensor:
    """tr(dv/dx) per sample, (N, 1): one VJP per dimension (samples are independent, so a batched
    one-hot cotangent picks the diagonal of every sample's Jacobian at once)."""
    n, d = x.shape[0], x[0].numel()
    div = torch.zeros(n, dtype=torch.float64, device=x.device)
    onehot = torch.zeros(n, d, dtype=v.dtype, device=v.device)
    for i in range(d):
        onehot.zero_()
        onehot[:, i] = 1
        g = _vjp(v, x, onehot.view_as(v), retain=i < d - 1)
        div += g.reshape(n, d)[:, i].double()
    return div[:, None]


def _hutchinson_divergence(v: Tensor, x: Tensor, z: Tensor) -> Tensor:
    """z_p^T (dv/dx) z_p per sample and probe, (N, P); z is (N, P, *x.shape[1:]) in float64."""
    n, p = z.shape[:2]
    out = torch.empty(n, p, dtype=torch.float64, device=x.device)
    for k in range(p):
        zk = z[:, k]
        g = _vjp(v, x, zk.to(v.dtype), retain=k < p - 1)
        out[:, k] = (g.double() * zk).reshape(n, -1).sum(1)
    return out


def _likelihood(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    noise: SampleNoise,
    *,
    exact: bool,
    probes: int,
    probe: str,
    rtol: float,
    atol: float,
    eps: float | None,
    solver: str,
    options: dict | None,
    prior_logp: Callable[[Tensor], Tensor] | None,
) -> LikelihoodResult:
    """The ODE solve behind likelihood() and bits_per_dim(); probes are the next draw of `noise`."""
    if not x.is_floating_point():
        raise ValueError(f"likelihood needs floating-point x, got {x.dtype}")
    eps = sde.eps if eps is None else float(eps)
    if not 0 < eps < sde.T:
        raise ValueError(f"likelihood needs 0 < eps < T = {sde.T}, got eps={eps}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
    if not exact and probes < 1:
        raise ValueError(f"Hutchinson's estimator needs probes >= 1, got {probes}")

    n, dtype = x.shape[0], x.dtype
    counted = _CountedScore(score_fn)
    drift = sde.reverse(counted, probability_flow=True).sde
    z = None
    if not exact:
        draw = noise.rademacher if probe == "rademacher" else noise.randn
        z = draw((probes, *x.shape[1:]), dtype=torch.float64).to(x.device)

    def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        t = t.clamp(eps, sde.T)  # the solver's first-step heuristic may probe beyond T
        with torch.enable_grad():
            xt = state[0].detach().requires_grad_(True)
            v = drift(xt.to(dtype), t.to(dtype))[0]
            div = _exact_divergence(v, xt) if z is None else _hutchinson_divergence(v, xt, z)
        return v.detach().double(), div

    # Each probe's divergence is its own state: the solver integrates P estimates along one trajectory.
    state0 = (x.detach().double(), torch.zeros(n, 1 if exact else probes, dtype=torch.float64, device=x.device))
    times = torch.tensor([eps, sde.T], dtype=torch.float64, device=x.device)
    options = dict(options or {})
    if solver in _ADAPTIVE:
        options.setdefault("step_t", times[1:])
    with torch.no_grad():
        xs, divs = odeint(rhs, state0, times, rtol=rtol, atol=atol, method=solver, options=options)
    log_prior = (sde.prior_logp if prior_logp is None else prior_logp)(xs[-1])
    estimates = log_prior.double()[:, None] + divs[-1]  # (N, K)

    logp = estimates.mean(1)
    if exact:
        stderr = torch.zeros_like(logp)
    elif probes == 1:
        stderr = torch.full_like(logp, math.nan)  # one probe: unbiased, but no spread to measure
    else:
        stderr = estimates.std(1) / math.sqrt(probes)
    return LikelihoodResult(logp=logp, stderr=stderr, nfe=counted.calls)


def likelihood(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    exact: bool = True,
    *,
    probes: int = 8,  # Hutchinson probes per sample (exact=False)
    probe: str = "rademacher",  # "rademacher" | "gaussian"
    rtol: float = 1e-5,  # ODE solver tolerances
    atol: float = 1e-5,
    eps: float | None = None,  # start time; default sde.eps
    seed: int = 0,  # seed of the per-sample probe streams
    indices: Tensor | None = None,  # (N,) global sample indices; default arange(N)
    solver: str = "dopri5",  # any torchdiffeq method
    options: dict | None = None,  # torchdiffeq solver options, e.g. {"step_size": 0.01} for "rk4"
    prior_logp: Callable[[Tensor], Tensor] | None = None,  # log p_T of float64 x_T, (N,); default sde.prior_logp
) -> LikelihoodResult:
    """Per-sample log p_eps(x) in nats under the model whose score is score_fn, with its standard error
    and the number of score evaluations. x: (N, ...) floating point on any device; the result is
    float64 on that device. The score must be differentiable in x (the divergence uses autograd) and
    must treat samples independently (no batch statistics)."""
    if indices is None:
        indices = torch.arange(x.shape[0], device=x.device)
    noise = SampleNoise(seed, indices, device=x.device)
    return _likelihood(
        score_fn, sde, x, noise, exact=exact, probes=probes, probe=probe, rtol=rtol, atol=atol, eps=eps,
        solver=solver, options=options, prior_logp=prior_logp,
    )


def log_likelihood(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    exact: bool = True,
    *,
    probes: int = 8,
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float | None = None,
    seed: int = 0,
    indices: Tensor | None = None,
    solver: str = "dopri5",
    options: dict | None = None,
    prior_logp: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """(N,) log p_eps(x) in nats: likelihood(...).logp."""
    return likelihood(
        score_fn, sde, x, exact, probes=probes, probe=probe, rtol=rtol, atol=atol, eps=eps, seed=seed,
        indices=indices, solver=solver, options=options, prior_logp=prior_logp,
    ).logp


# ---------------------------------------------------------------------------------------------
# Discrete data


def _check_discrete(x_int: Tensor, bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}")
    top = 2**bits - 1
    if x_int.is_floating_point() or x_int.is_complex() or x_int.dtype == torch.bool:
        raise ValueError(f"x_int must be an integer tensor with values in [0, {top}], got dtype {x_int.dtype}")
    if x_int.numel() and (int(x_int.min()) < 0 or int(x_int.max()) > top):
        raise ValueError(
            f"x_int must lie in [0, {top}] for {bits}-bit data, got values in [{int(x_int.min())}, {int(x_int.max())}]"
        )


def _dequantize(x_int: Tensor, bits: int, noise: SampleNoise) -> Tensor:
    # SampleNoise draws normals; Phi(z) of a standard normal is U(0, 1), and |z| <= 5.9 keeps it inside.
    z = noise.randn(x_int.shape[1:], dtype=torch.float64).to(x_int.device)
    u = 0.5 * torch.erfc(-z / math.sqrt(2))
    return (x_int.double() + u) / 2**bits


def dequantize(x_int: Tensor, *, bits: int = 8, seed: int = 0, indices: Tensor | None = None) -> Tensor:
    """y = (x_int + u) / 2^bits in [0, 1), u ~ U[0, 1)^D per sample: the float64 points bits_per_dim
    evaluates for the same seed and indices."""
    x_int = torch.as_tensor(x_int)
    _check_discrete(x_int, bits)
    if indices is None:
        indices = torch.arange(x_int.shape[0], device=x_int.device)
    return _dequantize(x_int, bits, SampleNoise(seed, indices, device=x_int.device))


def bits_per_dim(
    score_fn: ScoreFn,
    sde: SDE,
    x_int: Tensor,
    *,
    bits: int = 8,  # x_int holds integers in [0, 2^bits - 1]
    scale: float = 2.0,  # the model's data are x = scale * y + shift, y in [0, 1)
    shift: float = -1.0,
    exact: bool = False,
    probes: int = 8,
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float | None = None,
    seed: int = 0,  # one stream per sample: the dequantisation noise, then the probes
    indices: Tensor | None = None,
    solver: str = "dopri5",
    options: dict | None = None,
    prior_logp: Callable[[Tensor], Tensor] | None = None,
    dtype: torch.dtype = torch.float32,  # what the score function is given
) -> BitsPerDimResult:
    """Per-sample bits/dim of discrete data under the model, with uniform dequantisation.

    With y = (x_int + u) / 2^bits, u ~ U[0, 1)^D, and the model's density p_x on x = scale * y + shift,
    the density of z = x_int + u is p_x(x) |scale|^D 2^(-bits D), and by Jensen

        -log2 P(x_int) = -log2 E_u[p_z(x_int + u)] <= E_u[-log2 p_z(x_int + u)],

    so each returned value

        bpd = -(log p_x(x) + D log|scale|) / (D ln 2) + bits

    is a one-draw estimate of an upper bound on the discrete NLL per dimension (p_x is the model's
    density at t = eps, as in `likelihood`).
    """
    x_int = torch.as_tensor(x_int)
    _check_discrete(x_int, bits)
    if scale == 0:
        raise ValueError("scale must be non-zero")
    if indices is None:
        indices = torch.arange(x_int.shape[0], device=x_int.device)
    noise = SampleNoise(seed, indices, device=x_int.device)
    x = (scale * _dequantize(x_int, bits, noise) + shift).to(dtype)
    res = _likelihood(
        score_fn, sde, x, noise, exact=exact, probes=probes, probe=probe, rtol=rtol, atol=atol, eps=eps,
        solver=solver, options=options, prior_logp=prior_logp,
    )
    d = x[0].numel()
    nats_to_bpd = 1.0 / (d * math.log(2))
    bpd = -(res.logp + d * math.log(abs(scale))) * nats_to_bpd + bits
    return BitsPerDimResult(bpd=bpd, stderr=res.stderr * nats_to_bpd, nfe=res.nfe)
