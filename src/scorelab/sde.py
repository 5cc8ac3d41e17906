"""Forward SDEs of the score-based family, their marginals and their reverse-time views.

Every SDE here is linear in x, so its perturbation kernel is Gaussian:

    x_t = alpha(t) * x_0 + std(t) * z,        z ~ N(0, I)
    dx  = f(t) x dt + g(t) dw,                f = d log(alpha)/dt,  g^2 = d(std^2)/dt - 2 f std^2

Samplers, losses and the likelihood need only `alpha_std(t)`, `f_g2(t)` and the log-SNR
lambda(t) = log(alpha/std) with its inverse; the SDE's `family` ("vp", "subvp", "ve") is the one
place where the type decides which samplers apply (see `scorelab.sampling`).

The discrete models of the papers are members of the same family:
- DDPM (Ho et al. 2020) is a VP SDE whose beta(t) is piecewise constant, so that the marginals at
  t_i = i/N equal the chain's alpha-bar_i exactly;
- NCSN (Song & Ermon 2019) is a VE SDE whose variance is piecewise linear through its noise ladder.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def batch_times(t: float | Tensor, x: Tensor) -> Tensor:
    """t as a (B,) tensor on x's device and dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample (B,) tensor to broadcast against x of shape (B, ...)."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


class PiecewiseLinear:
    """A continuous, strictly increasing piecewise-linear function through (knots_t, knots_y)."""

    def __init__(self, knots_t: Tensor, knots_y: Tensor):
        self.t = knots_t.double()
        self.y = knots_y.double()
        if not bool((self.y[1:] > self.y[:-1]).all()):
            raise ValueError("PiecewiseLinear: knot values must be strictly increasing")
        self.slopes = (self.y[1:] - self.y[:-1]) / (self.t[1:] - self.t[:-1])

    def _segment(self, knots: Tensor, v: Tensor) -> Tensor:
        return (torch.searchsorted(knots.to(v.device), v.double().contiguous(), right=True) - 1).clamp(
            0, len(knots) - 2
        )

    def __call__(self, t: Tensor) -> Tensor:
        i = self._segment(self.t, t)
        t0, y0, k = (a.to(t.device)[i] for a in (self.t, self.y, self.slopes))
        return (y0 + k * (t.double() - t0)).to(t.dtype)

    def slope(self, t: Tensor) -> Tensor:
        return self.slopes.to(t.device)[self._segment(self.t, t)].to(t.dtype)

    def inverse(self, y: Tensor) -> Tensor:
        i = self._segment(self.y, y)
        t0, y0, k = (a.to(y.device)[i] for a in (self.t, self.y, self.slopes))
        return (t0 + (y.double() - y0) / k).to(y.dtype)


# ---------------------------------------------------------------------------------------------
# Noise schedules. VP-type SDEs take a beta schedule: B(t) = int_0^t beta(s) ds, alpha = exp(-B/2).
# VE-type SDEs take a variance schedule V(t) = std(t)^2 with V(0) = 0.


class BetaSchedule(ABC):
    T: float = 1.0

    @abstractmethod
    def integral(self, t: Tensor) -> Tensor:
        """B(t) = int_0^t beta(s) ds."""

    @abstractmethod
    def rate(self, t: Tensor) -> Tensor:
        """beta(t)."""

    @abstractmethod
    def inverse_integral(self, b: Tensor) -> Tensor:
        """t such that B(t) = b."""

    def conditioning(self, t: Tensor) -> Tensor:
        """What the network sees as its time input (score_sde's convention for VP: 999 t)."""
        return 999.0 * t


class LinearBeta(BetaSchedule):
    """beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, VP and sub-VP)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"LinearBeta needs 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def integral(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def rate(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def inverse_integral(self, b):
        d = self.beta_max - self.beta_min
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * b))


class CosineBeta(BetaSchedule):
    """Nichol & Dhariwal's cosine schedule: alpha(t) = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2).

    alpha(1) = 0 makes beta infinite at t = 1, so the SDE stops at T (0.9946 by default, where
    log alpha is about -4.8, the DPM-Solver authors' choice).
    """

    def __init__(self, s: float = 0.008, T: float = 0.9946):
        if not 0 < s < 1:
            raise ValueError(f"CosineBeta needs 0 < s < 1, got {s}")
        if not 0 < T < 1:
            raise ValueError(f"CosineBeta needs 0 < T < 1, got {T}")
        self.s, self.T = float(s), float(T)
        self._log_c0 = math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))

    def _angle(self, t):
        return (t + self.s) / (1 + self.s) * (math.pi / 2)

    def integral(self, t):
        return -2 * (torch.log(torch.cos(self._angle(t))) - self._log_c0)

    def rate(self, t):
        return math.pi / (1 + self.s) * torch.tan(self._angle(t))

    def inverse_integral(self, b):
        cos_angle = torch.exp(-b / 2 + self._log_c0)
        return torch.acos(cos_angle) * (2 * (1 + self.s) / math.pi) - self.s


class DiscreteBeta(BetaSchedule):
    """DDPM's Markov chain of N steps as a VP SDE with piecewise-constant beta(t).

    B(t) interpolates B_i = -sum_{j<=i} log(1 - beta_j) linearly between t_i = i/N, so that
    alpha(t_i)^2 equals the chain's alpha-bar_i exactly and one step t_{i-1} -> t_i is the chain's
    q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1}, beta_i I).
    """

    def __init__(self, betas: Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("DiscreteBeta needs a 1-D sequence of betas in (0, 1)")
        self.betas = betas
        self.num_steps = len(betas)
        self.linear_given: tuple[float, float] | None = None  # (beta_start, beta_end) as params gave them
        knots_b = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(-torch.log1p(-betas), 0)])
        self._b = PiecewiseLinear(torch.linspace(0, 1, self.num_steps + 1, dtype=torch.float64), knots_b)

    @classmethod
    def ddpm(cls, num_steps: int = 1000, schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02):
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"DDPM num_steps must be an integer >= 1, got {num_steps!r}")
        if schedule == "linear":
            if not 0 < beta_start < beta_end:
                raise ValueError(f"DDPM needs 0 < beta_start < beta_end, got {beta_start}, {beta_end}")
            if beta_end * 1000.0 / num_steps >= 1:
                raise ValueError(
                    f"DDPM num_steps={num_steps} is too few for beta_end={beta_end}: the betas are scaled by "
                    f"1000/num_steps and must stay below 1 (num_steps > {beta_end * 1000:g})"
                )
            # DDPM's betas are given for N = 1000; scaling by 1000/N keeps the same SDE for other N.
            scale = 1000.0 / num_steps
            betas = torch.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=torch.float64)
        elif schedule == "cosine":
            s = 0.008
            steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
            abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"unknown DDPM schedule {schedule!r}; valid: 'linear', 'cosine'")
        out = cls(betas)
        if schedule == "linear":
            out.linear_given = (float(beta_start), float(beta_end))
        return out

    @property
    def alphas_cumprod(self) -> Tensor:
        return torch.cumprod(1 - self.betas, 0)

    def integral(self, t):
        return self._b(t)

    def rate(self, t):
        return self._b.slope(t)

    def inverse_integral(self, b):
        return self._b.inverse(b)

    def conditioning(self, t):
        return t * self.num_steps - 1  # the chain's 0-based step index at t_i = i/N

    def discrete_times(self) -> Tensor:
        return torch.arange(1, self.num_steps + 1, dtype=torch.float64) / self.num_steps


class VarianceSchedule(ABC):
    T: float = 1.0
    default_eps: float

    @abstractmethod
    def variance(self, t: Tensor) -> Tensor:
        """V(t) = std(t)^2, with V(0) = 0."""

    @abstractmethod
    def rate(self, t: Tensor) -> Tensor:
        """dV/dt = g(t)^2."""

    @abstractmethod
    def inverse_variance(self, v: Tensor) -> Tensor:
        """t such that V(t) = v."""


class GeometricVariance(VarianceSchedule):
    """VE SDE of Song et al. 2021 with sigma(t) = sigma_min (sigma_max/sigma_min)^t and g^2 = d sigma^2/dt.

    Started from x_0 at t = 0 the exact marginal variance is
    V(t) = sigma_min^2 [(sigma_max/sigma_min)^(2t) - 1]; this is what is implemented (score_sde uses
    sigma(t)^2, which is off by sigma_min^2).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"GeometricVariance needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def variance(self, t):
        return self.sigma_min**2 * torch.expm1(2 * self._log_ratio * t)

    def rate(self, t):
        return self.sigma_min**2 * torch.exp(2 * self._log_ratio * t) * (2 * self._log_ratio)

    def inverse_variance(self, v):
        return torch.log1p(v / self.sigma_min**2) / (2 * self._log_ratio)

    @property
    def default_eps(self) -> float:
        """The time where std = sigma_min: the noise floor that score_sde's VE works down to."""
        return math.log(2.0) / (2 * self._log_ratio)


class DiscreteVariance(VarianceSchedule):
    """NCSN's noise ladder sigma_1 > ... > sigma_L as a VE SDE.

    V(t) is piecewise linear through V(0) = 0 and V(k/L) = sigma_{L+1-k}^2, so std(t_k) is exactly the
    k-th smallest noise level and the step t_k -> t_{k+1} adds variance sigma_{k+1}^2 - sigma_k^2, as in
    SMLD's Markov chain.
    """

    def __init__(self, sigmas: Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        if sigmas.ndim != 1 or not bool((sigmas[:-1] > sigmas[1:]).all()) or not bool((sigmas > 0).all()):
            raise ValueError("DiscreteVariance needs a strictly decreasing 1-D ladder of positive sigmas")
        self.sigmas = sigmas
        self.num_scales = len(sigmas)
        knots_v = torch.cat([torch.zeros(1, dtype=torch.float64), sigmas.flip(0) ** 2])
        self._v = PiecewiseLinear(torch.linspace(0, 1, self.num_scales + 1, dtype=torch.float64), knots_v)

    @classmethod
    def geometric(cls, sigma_min: float = 0.01, sigma_max: float = 1.0, num_scales: int = 10):
        if not isinstance(num_scales, int) or num_scales < 2:
            raise ValueError(f"NCSN num_scales must be an integer >= 2, got {num_scales!r}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"NCSN needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales, dtype=torch.float64))
        return cls(sigmas)

    def variance(self, t):
        return self._v(t)

    def rate(self, t):
        return self._v.slope(t)

    def inverse_variance(self, v):
        return self._v.inverse(v)

    def discrete_times(self) -> Tensor:
        return torch.arange(1, self.num_scales + 1, dtype=torch.float64) / self.num_scales

    @property
    def default_eps(self) -> float:
        return 1.0 / self.num_scales  # the smallest noise level of the ladder


# ---------------------------------------------------------------------------------------------
# SDEs


class SDE(ABC):
    """A linear forward SDE on [0, T] with Gaussian perturbation kernels."""

    family: str  # "vp" | "subvp" | "ve"
    name: str  # the name get_sde knows it by

    def __init__(self, T: float, eps: float):
        if not 0 < eps < T:
            raise ValueError(f"{type(self).__name__} needs 0 < eps < T, got eps={eps}, T={T}")
        self.T = float(T)
        self.eps = float(eps)  # smallest time the adaptive solvers and the likelihood use

    # -- the marginal x_t = alpha x_0 + std z -------------------------------------------------
    @abstractmethod
    def alpha_std(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha(t), std(t)) of the perturbation kernel, each shaped like t."""

    @abstractmethod
    def f_g2(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(f(t), g(t)^2): the drift is f(t) x and the diffusion g(t)."""

    @abstractmethod
    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of log_snr."""

    @abstractmethod
    def conditioning(self, t: Tensor) -> Tensor:
        """The noise-level input a score network is given at time t."""

    def discrete_times(self) -> Tensor | None:
        """The chain's times t_1 < ... < t_N for discrete models (DDPM, NCSN); None when continuous."""
        return None

    def log_snr(self, t: Tensor) -> Tensor:
        alpha, std = self.alpha_std(t)
        return torch.log(alpha) - torch.log(std)

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(drift, diffusion) of dx = f x dt + g dw; diffusion has shape (B,)."""
        f, g2 = self.f_g2(batch_times(t, x))
        return bcast(f, x) * x, torch.sqrt(g2)

    def marginal_prob(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of p(x_t | x_0); std has shape (B,)."""
        alpha, std = self.alpha_std(batch_times(t, x0))
        return bcast(alpha, x0) * x0, std

    def transition(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(a, sigma) with x_t = a x_s + sigma z for s <= t: the exact transition kernel."""
        alpha_s, std_s = self.alpha_std(s)
        alpha_t, std_t = self.alpha_std(t)
        a = alpha_t / alpha_s
        return a, torch.sqrt((std_t**2 - (a * std_s) ** 2).clamp(min=0))

    # -- the same at single times, as python floats, memoised: samplers ask for the coefficients of
    # the same grid times at every step and every call, and recomputing a piecewise schedule from
    # tensors each time was a measurable share of a small batch's step (docs/BENCHMARKS.md)
    def alpha_std_at(self, t: float) -> tuple[float, float]:
        """(alpha(t), std(t)) at one time, as float64 python floats."""
        return self._memoised(("alpha_std", t), lambda: self.alpha_std(torch.tensor(t, dtype=torch.float64)))

    def transition_at(self, s: float, t: float) -> tuple[float, float]:
        """`transition` between two single times, as float64 python floats."""
        f64 = torch.float64
        return self._memoised(("transition", s, t), lambda: self.transition(torch.tensor(s, dtype=f64),
                                                                              torch.tensor(t, dtype=f64)))

    def _memoised(self, key: tuple, compute) -> tuple[float, float]:
        memo = self.__dict__.setdefault("_float_memo", {})
        hit = memo.get(key)
        if hit is None:
            if len(memo) >= 1 << 16:  # adaptive callers could ask for ever new times: stay bounded
                memo.clear()
            hit = memo[key] = tuple(float(v) for v in compute())
        return hit

    def time_of_alpha(self, alpha: float) -> float:
        """The largest t in [eps, T] with alpha(t) >= alpha (alpha decreases in t): T when alpha(T) >= alpha."""
        if self.alpha_std_at(self.T)[0] >= alpha:
            return self.T
        lo, hi = self.eps, self.T  # bisection on the memo-free tensor path: a few dozen evaluations, once per call
        f64 = torch.float64
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if float(self.alpha_std(torch.tensor(mid, dtype=f64))[0]) >= alpha:
                lo = mid
            else:
                hi = mid
        return lo

    # -- the prior ------------------------------------------------------------------------------
    @property
    def prior_std(self) -> float:
        """std of the prior N(0, prior_std^2 I): the marginal std at T (the data's alpha(T) x_0 is dropped)."""
        return float(self.alpha_std(torch.tensor(self.T, dtype=torch.float64))[1])

    def prior_sampling(self, shape, generator: torch.Generator | None = None, device=None, dtype=None) -> Tensor:
        return self.prior_std * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z: Tensor) -> Tensor:
        d = z[0].numel()
        s2 = self.prior_std**2
        return -0.5 * d * math.log(2 * math.pi * s2) - z.flatten(1).pow(2).sum(1) / (2 * s2)

    # -- reverse time -----------------------------------------------------------------------------
    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """dx = [f x - g^2 score] dt + g dw-bar run from T to 0, or the probability-flow ODE
    dx/dt = f x - 1/2 g^2 score, which has the same marginals."""

    def __init__(self, sde: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.forward_sde, self.score_fn, self.probability_flow = sde, score_fn, probability_flow

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = batch_times(t, x)
        f, g2 = self.forward_sde.f_g2(t)
        weight = 0.5 if self.probability_flow else 1.0
        drift = bcast(f, x) * x - bcast(weight * g2, x) * self.score_fn(x, t)
        diffusion = torch.zeros_like(g2) if self.probability_flow else torch.sqrt(g2)
        return drift, diffusion


class VPSDE(SDE):
    """Variance preserving: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw; alpha = e^{-B/2}, std^2 = 1 - e^{-B}."""

    family = "vp"

    def __init__(self, schedule: BetaSchedule, name: str = "vp", eps: float = 1e-3):
        super().__init__(schedule.T, eps)
        self.schedule, self.name = schedule, name

    def _integral(self, t):
        return self.schedule.integral(t).clamp(min=0)  # B(0) can round to -1e-17 (cosine)

    def alpha_std(self, t):
        b = self._integral(t)
        return torch.exp(-0.5 * b), torch.sqrt(-torch.expm1(-b))

    def f_g2(self, t):
        beta = self.schedule.rate(t)
        return -0.5 * beta, beta

    def log_snr(self, t):
        b = self._integral(t)
        return -0.5 * b - 0.5 * torch.log(-torch.expm1(-b))

    def t_from_log_snr(self, lam):
        return self.schedule.inverse_integral(torch.log1p(torch.exp(-2 * lam)))  # e^B - 1 = e^{-2 lam}

    def conditioning(self, t):
        return self.schedule.conditioning(t)

    def discrete_times(self):
        return getattr(self.schedule, "discrete_times", lambda: None)()


class SubVPSDE(VPSDE):
    """sub-VP: dx = -1/2 beta x dt + sqrt(beta (1 - e^{-2B})) dw; std = 1 - e^{-B} (<= the VP std)."""

    family = "subvp"

    def __init__(self, schedule: BetaSchedule, name: str = "subvp", eps: float = 1e-3):
        super().__init__(schedule, name=name, eps=eps)

    def alpha_std(self, t):
        b = self._integral(t)
        return torch.exp(-0.5 * b), -torch.expm1(-b)

    def f_g2(self, t):
        beta = self.schedule.rate(t)
        return -0.5 * beta, beta * -torch.expm1(-2 * self._integral(t))

    def log_snr(self, t):
        b = self._integral(t)
        return -0.5 * b - torch.log(-torch.expm1(-b))

    def t_from_log_snr(self, lam):
        # std/alpha = e^{B/2} - e^{-B/2} = 2 sinh(B/2) = e^{-lam}
        return self.schedule.inverse_integral(2 * torch.asinh(0.5 * torch.exp(-lam)))


class VESDE(SDE):
    """Variance exploding: dx = sqrt(dV/dt) dw; alpha = 1, std^2 = V(t)."""

    family = "ve"

    def __init__(self, schedule: VarianceSchedule, name: str = "ve", eps: float | None = None):
        super().__init__(schedule.T, schedule.default_eps if eps is None else eps)
        self.schedule, self.name = schedule, name

    def alpha_std(self, t):
        return torch.ones_like(t), torch.sqrt(self.schedule.variance(t))

    def f_g2(self, t):
        return torch.zeros_like(t), self.schedule.rate(t)

    def log_snr(self, t):
        return -0.5 * torch.log(self.schedule.variance(t))

    def t_from_log_snr(self, lam):
        return self.schedule.inverse_variance(torch.exp(-2 * lam))

    def conditioning(self, t):
        return 0.5 * torch.log(self.schedule.variance(t))  # log sigma, as NCSN++ embeds it

    def discrete_times(self):
        return getattr(self.schedule, "discrete_times", lambda: None)()


# ---------------------------------------------------------------------------------------------
# How well a schedule is conditioned at its noisy end.

# A VP-type schedule whose alpha(T) is below this is refused by validation: the prior N(0, std^2 I)
# matches p_T to within alpha^2 E|x_0|^2 / 2 = 5e-11 nats per unit-variance dimension there, so the
# steps beyond teach and sample nothing, while any x0_hat = (x - std eps_hat) / alpha formed there
# multiplies the network's error by std/alpha > 1e5. (DDPM's cosine chain of 4000 steps, the
# smallest alpha(T) of a published schedule here, has 1.2e-5.)
ALPHA_T_MIN = 1e-5


def effective_betas(sde: SDE) -> Tensor | None:
    """The per-step betas a DDPM chain really uses (after the 1000/N scaling); None for other SDEs."""
    schedule = getattr(sde, "schedule", None)
    return schedule.betas if isinstance(schedule, DiscreteBeta) else None


def describe_schedule(sde: SDE) -> str:
    """One line on what the schedule is after every convention is applied: the effective beta or sigma
    range and alpha(T), with std/alpha at T (the factor by which an x0 estimate there scales an error)."""
    alpha_T, std_T = sde.alpha_std_at(sde.T)
    ends = f"alpha(T) = {alpha_T:.3g}, std/alpha at T = {std_T / alpha_T:.3g}"
    betas = effective_betas(sde)
    if betas is not None:
        return f"{len(betas)} steps, effective beta {float(betas.min()):.3g}..{float(betas.max()):.3g}; {ends}"
    if sde.family == "ve":
        (_, lo), (_, hi) = sde.alpha_std_at(sde.eps), sde.alpha_std_at(sde.T)
        return f"std {lo:.3g}..{hi:.3g} over t in [{sde.eps:.3g}, {sde.T:.4g}]; {ends}"
    beta = sde.schedule.rate(torch.tensor([0.0, sde.T], dtype=torch.float64))
    return f"beta(t) {float(beta[0]):.3g}..{float(beta[1]):.3g} over t in [0, {sde.T:.4g}]; {ends}"


def check_schedule(sde: SDE) -> None:
    """ValueError unless the SDE's signal survives to T: alpha(T) >= ALPHA_T_MIN (VP and sub-VP; VE keeps alpha = 1)."""
    alpha_T, _ = sde.alpha_std_at(sde.T)
    if alpha_T >= ALPHA_T_MIN:
        return
    text = f"alpha(T) = {alpha_T:.3g} is below {ALPHA_T_MIN:g}: the last steps carry no signal, and an x0 estimate " \
           f"there multiplies the network's error by std/alpha = {1 / alpha_T:.3g}"
    betas = effective_betas(sde)
    if betas is not None and sde.schedule.linear_given is not None:
        start, end = sde.schedule.linear_given
        n = len(betas)
        text += (f". beta_start/beta_end are the 1000-step schedule's values, scaled by 1000/num_steps = {1000 / n:g}: "
                 f"the effective betas are {float(betas[0]):.3g}..{float(betas[-1]):.3g}. If {start:g}..{end:g} are "
                 f"already this {n}-step chain's betas, write beta_start: {start * n / 1000:.3g}, "
                 f"beta_end: {end * n / 1000:.3g}")
    raise ValueError(text)


# ---------------------------------------------------------------------------------------------
# Registry

SDE_TYPES = ("vp", "vp_cosine", "subvp", "ve", "ddpm", "ncsn")
SDE_FAMILY = {"vp": "vp", "vp_cosine": "vp", "subvp": "subvp", "ve": "ve", "ddpm": "vp", "ncsn": "ve"}


def get_sde(name: str, **params) -> SDE:
    """Build an SDE by name.

    vp:        beta_min=0.1, beta_max=20, eps=1e-3
    vp_cosine: s=0.008, T=0.9946, eps=1e-3
    subvp:     beta_min=0.1, beta_max=20, eps=1e-3
    ve:        sigma_min=0.01, sigma_max=50, eps=time where std = sigma_min
    ddpm:      num_steps=1000, schedule="linear" | "cosine", beta_start=1e-4, beta_end=0.02
    ncsn:      sigma_min=0.01, sigma_max=1, num_scales=10
    """
    eps = params.pop("eps", None)
    kw = {} if eps is None else {"eps": eps}
    try:
        if name == "vp":
            return VPSDE(LinearBeta(**params), name="vp", **kw)
        if name == "vp_cosine":
            return VPSDE(CosineBeta(**params), name="vp_cosine", **kw)
        if name == "subvp":
            return SubVPSDE(LinearBeta(**params), **kw)
        if name == "ve":
            return VESDE(GeometricVariance(**params), **kw)
        if name == "ddpm":
            schedule = DiscreteBeta.ddpm(**params)
            return VPSDE(schedule, name="ddpm", eps=kw.get("eps", 1.0 / schedule.num_steps))
        if name == "ncsn":
            return VESDE(DiscreteVariance.geometric(**params), name="ncsn", **kw)
    except TypeError as e:
        if "unexpected keyword" not in str(e):
            raise
        raise ValueError(f"get_sde({name!r}): {e}") from None
    raise ValueError(f"unknown SDE {name!r}; valid: {', '.join(SDE_TYPES)}")
