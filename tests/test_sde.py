"""The forward SDEs against exact and independent answers.

Every SDE of scorelab is linear, x_t = alpha(t) x_0 + std(t) z. The references here are written from
the papers' formulas, in numpy float64, without calling the code under test:

    VP      B(t) = beta_min t + (beta_max - beta_min) t^2 / 2,  alpha = e^{-B/2},  std^2 = 1 - alpha^2
    sub-VP  same alpha,                                         std   = 1 - alpha^2
    cosine  alpha = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2),  std^2 = 1 - alpha^2
    VE      std^2 = sigma_min^2 [(sigma_max/sigma_min)^{2t} - 1]   (exact: started at x_0 at t = 0)
    DDPM    alpha(i/N)^2 = prod_{j<=i} (1 - beta_j), log alpha linear between the t_i = i/N
    NCSN    std(k/L) = k-th smallest level of the geometric ladder, std^2 linear between the t_k = k/L

The Monte-Carlo checks simulate dx = f x dt + g dw with Euler-Maruyama through `sde.sde` and compare
the empirical moments with `marginal_prob` within 5 standard errors plus a discretisation allowance
derived in `_em_allowance`. Fixed seeds: the tests are deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from scorelab.sde import SDE_TYPES, get_sde

F64 = torch.float64

# Every SDE type, plus the cosine DDPM chain (a second DiscreteBeta) where it costs nothing.
ALL = [(name, {}) for name in SDE_TYPES] + [("ddpm", {"schedule": "cosine"})]
ALL_IDS = [n if not p else f"{n}-{p['schedule']}" for n, p in ALL]



# ---------------------------------------------------------------------------------------------
# Independent references (numpy float64; none of them calls scorelab)

DDPM_N = 1000
NCSN = dict(sigma_min=0.01, sigma_max=1.0, num_scales=10)
COS_S, COS_T = 0.008, 0.9946


def ddpm_linear_betas(n: int = DDPM_N, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    return np.linspace(start, end, n)


def nichol_f(t, s: float = COS_S):
    """Nichol & Dhariwal's f(t) = cos^2((t + s)/(1 + s) pi/2)."""
    return np.cos((np.asarray(t, dtype=np.float64) + s) / (1 + s) * np.pi / 2) ** 2


def ddpm_cosine_betas(n: int = DDPM_N) -> tuple[np.ndarray, np.ndarray]:
    """(clipped betas, raw betas) of the cosine chain: beta_i = min(1 - abar_i/abar_{i-1}, 0.999)."""
    abar = nichol_f(np.arange(n + 1) / n) / nichol_f(0.0)
    raw = 1 - abar[1:] / abar[:-1]
    return np.minimum(raw, 0.999), raw


def ref_alpha_std(name: str, t, **p) -> tuple[np.ndarray, np.ndarray]:
    """(alpha(t), std(t)) of get_sde(name, **p), from the formulas in the module docstring."""
    t = np.asarray(t, dtype=np.float64)
    if name in ("vp", "subvp"):
        bmin, bmax = p.get("beta_min", 0.1), p.get("beta_max", 20.0)
        b = bmin * t + 0.5 * (bmax - bmin) * t**2
        alpha = np.exp(-0.5 * b)
        one_minus_a2 = -np.expm1(-b)
        return alpha, (np.sqrt(one_minus_a2) if name == "vp" else one_minus_a2)
    if name == "vp_cosine":
        s = p.get("s", COS_S)
        alpha = np.cos((t + s) / (1 + s) * np.pi / 2) / np.cos(s / (1 + s) * np.pi / 2)
        return alpha, np.sqrt(1 - alpha**2)
    if name == "ve":
        smin, smax = p.get("sigma_min", 0.01), p.get("sigma_max", 50.0)
        return np.ones_like(t), np.sqrt(smin**2 * ((smax / smin) ** (2 * t) - 1))
    if name == "ddpm":
        n = p.get("num_steps", DDPM_N)
        betas = ddpm_cosine_betas(n)[0] if p.get("schedule", "linear") == "cosine" else ddpm_linear_betas(n)
        log_abar = np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])
        log_abar_t = np.interp(t, np.arange(n + 1) / n, log_abar)
        return np.exp(0.5 * log_abar_t), np.sqrt(-np.expm1(log_abar_t))
    if name == "ncsn":
        q = {**NCSN, **p}
        ladder = np.geomspace(q["sigma_min"], q["sigma_max"], q["num_scales"])  # ascending
        knots_t = np.arange(q["num_scales"] + 1) / q["num_scales"]
        var = np.interp(t, knots_t, np.concatenate([[0.0], ladder**2]))
        return np.ones_like(t), np.sqrt(var)
    raise KeyError(name)


def ref_T(name: str, **p) -> float:
    return p.get("T", COS_T) if name == "vp_cosine" else 1.0


def knots(name: str, **p) -> np.ndarray | None:
    if name == "ddpm":
        return np.arange(p.get("num_steps", DDPM_N) + 1) / p.get("num_steps", DDPM_N)
    if name == "ncsn":
        return np.arange(NCSN["num_scales"] + 1) / NCSN["num_scales"]
    return None


def away_from_knots(name: str, t: np.ndarray, margin: float, **p) -> None:
    k = knots(name, **p)
    if k is not None:
        assert np.abs(t[:, None] - k[None]).min() > margin, "a test time lies on a knot of the discrete SDE"


def tt(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=F64)


# Times in (0, T) that are >= 1e-4 from every knot of DDPM (1/1000 grid) and NCSN (1/10 grid).
OFF_KNOT = np.array([0.0123, 0.0567, 0.1234, 0.2468, 0.3579, 0.5012, 0.6543, 0.7771, 0.8889, 0.9512])


# ---------------------------------------------------------------------------------------------
# 1. Marginals: closed forms, then Monte Carlo of the forward SDE

CLOSED_FORM_CASES = [
    ("vp", {}),
    ("vp", {"beta_min": 0.05, "beta_max": 7.5}),
    ("subvp", {}),
    ("subvp", {"beta_min": 0.3, "beta_max": 12.0}),
    ("vp_cosine", {}),
    ("vp_cosine", {"s": 0.02, "T": 0.99}),
    ("ve", {}),
    ("ve", {"sigma_min": 0.02, "sigma_max": 5.0}),
]


@pytest.mark.parametrize("name,params", CLOSED_FORM_CASES, ids=["-".join([n] + [f"{k}={v}" for k, v in p.items()]) for n, p in CLOSED_FORM_CASES])
def test_alpha_std_closed_form(name, params):
    sde = get_sde(name, **params)
    t = np.linspace(0.0, ref_T(name, **params), 101)
    alpha, std = sde.alpha_std(tt(t))
    ra, rs = ref_alpha_std(name, t, **params)
    torch.testing.assert_close(alpha, tt(ra), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(std, tt(rs), rtol=1e-10, atol=1e-14)
    # marginal_prob is (alpha x0, std) per sample.
    x0 = torch.tensor([[1.5, -0.5, 2.0]], dtype=F64).expand(len(t), 3)
    mean, mstd = sde.marginal_prob(x0, tt(t))
    torch.testing.assert_close(mean, tt(ra)[:, None] * x0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mstd, tt(rs), rtol=1e-10, atol=1e-14)


def test_ve_exact_variance_is_sigma_t_squared_minus_sigma_min_squared():
    """std^2 = sigma_min^2 [(smax/smin)^{2t} - 1] = sigma(t)^2 - sigma_min^2, not score_sde's sigma(t)^2."""
    smin, smax = 0.01, 50.0
    sde = get_sde("ve", sigma_min=smin, sigma_max=smax)
    t = np.linspace(0, 1, 51)
    var = sde.alpha_std(tt(t))[1] ** 2
    sigma_t = smin * (smax / smin) ** t
    torch.testing.assert_close(var, tt(smin**2 * ((smax / smin) ** (2 * t) - 1)), rtol=1e-10, atol=1e-16)
    torch.testing.assert_close(var, tt(sigma_t**2 - smin**2), rtol=1e-9, atol=1e-13)
    assert float(var[0]) == 0.0
    # The default eps is where std = sigma_min, i.e. sigma(t)^2 = 2 sigma_min^2.
    assert sde.eps == pytest.approx(math.log(2) / (2 * math.log(smax / smin)), rel=1e-12)
    assert float(sde.alpha_std(tt(sde.eps))[1]) == pytest.approx(smin, rel=1e-10)


# Monte Carlo
MC_P = 20_000  # paths per starting point
MC_H = 5e-4  # Euler-Maruyama step
MC_X0 = (-2.0, 0.5, 3.0)
MC_SE = 5.0  # standard errors


def _beta_bound(name: str):
    """beta(s), or an upper bound of it, for the VP-type SDEs (|f| = beta/2); increasing in s."""
    if name in ("vp", "subvp"):
        return lambda s: 0.1 + 19.9 * s
    if name == "vp_cosine":
        return lambda s: math.pi / (1 + COS_S) * math.tan((s + COS_S) / (1 + COS_S) * math.pi / 2)
    if name == "ddpm":  # on (t_{i-1}, t_i] the rate -N log(1 - beta_i) <= 1.02 N beta_i <= 1.02 (0.1 + 19.9 t_i)
        return lambda s: 1.05 * (0.1 + 19.9 * (s + 1 / DDPM_N))
    raise KeyError(name)


def _em_allowance(name: str, t: float, mean: float, h: float) -> tuple[float, float]:
    """Discretisation allowances (mean, std) at time t of Euler-Maruyama with step h, coefficients at midpoints.

    VP-type (f = -beta/2 <= 0, beta increasing, b = beta(t), V = std(t)^2 and G = max g^2 on [0, t]):
      mean: each step multiplies by 1 + f h instead of e^{f h}, and |log(1 + x) - x| <= x^2 for |x| <= 1/2, so
            |log(m_EM / m)| <= h int_0^t f^2 ds (the midpoint rule integrates f exactly for the linear and the
            piecewise-constant schedules, the steps being aligned with DDPM's knots; for cosine its error is
            < 1e-7 here).
      var:  a step's error is |(1+fh)^2 - e^{2fh}| V + |g^2 h - g^2 (e^{2fh}-1)/(2f)| <= h^2 (f^2 V + |f| g^2)
            = h^2 beta (beta V/4 + g^2/2), and errors made at s contract by prod (1 + f h)^2 ~ e^{-int_s^t beta},
            so the accumulated error is <= h (b V/4 + G/2) int_0^t beta e^{-int_s^t beta} ds <= h (b V/4 + G/2);
            on std that is divided by 2 std. G = b for VP, cosine and DDPM; b (1 - e^{-2B}) for sub-VP.
    VE-type (f = 0): the mean is exact; the variance is the midpoint rule of int g^2: exact for NCSN's
      piecewise-constant g^2 (the steps align with its knots), and for the geometric VE (g^2 ~ e^{2 ln(r) t})
      within t h^2 max|g2''|/24 <= h^2 (2 ln r)^3 V(t) (V(t) >= g^2/(2 ln r) up to sigma_min^2 terms).
    """
    std = float(ref_alpha_std(name, t)[1])
    if name == "ve":
        lr = 2 * math.log(50.0 / 0.01)
        return 0.0, h**2 * lr**3 * std**2 / (2 * std) + 1e-12
    if name == "ncsn":
        return 0.0, 1e-12
    beta = _beta_bound(name)
    b = beta(t)
    int_f2 = integrate.quad(lambda s: beta(s) ** 2 / 4, 0, t)[0]
    G = b * (1 - (1 - std) ** 2) if name == "subvp" else b  # sub-VP: 1 - e^{-2B} = 1 - (1 - std)^2
    return math.expm1(h * int_f2) * abs(mean), h * (b * std**2 / 4 + G / 2) / (2 * std)


@pytest.mark.parametrize("name", SDE_TYPES)
def test_marginal_prob_matches_euler_maruyama(name):
    sde = get_sde(name)
    checkpoints = [0.1, 0.5, 0.9 * sde.T]
    g = torch.Generator().manual_seed(1234)
    x0 = torch.tensor(MC_X0, dtype=F64)[:, None]  # (3, 1): batch = starting points, features = paths
    x = x0.expand(len(MC_X0), MC_P).clone()
    t0 = 0.0
    worst = 0.0
    for t1 in checkpoints:
        n = math.ceil((t1 - t0) / MC_H - 1e-9)
        h = (t1 - t0) / n
        for k in range(n):
            tm = torch.full((len(MC_X0),), t0 + (k + 0.5) * h, dtype=F64)
            drift, diffusion = sde.sde(x, tm)
            z = torch.randn(x.shape, generator=g, dtype=F64)
            x = x + drift * h + diffusion[:, None] * math.sqrt(h) * z
        t0 = t1
        mean, std = sde.marginal_prob(x0, torch.full((len(MC_X0),), t1, dtype=F64))
        emp_mean, emp_std = x.mean(1), x.std(1)
        for j in range(len(MC_X0)):
            m, s = float(mean[j, 0]), float(std[j])
            a_mean, a_std = _em_allowance(name, t1, m, h)
            tol_mean = MC_SE * s / math.sqrt(MC_P) + a_mean
            tol_std = MC_SE * s / math.sqrt(2 * (MC_P - 1)) + a_std
            err_m, err_s = abs(float(emp_mean[j]) - m), abs(float(emp_std[j]) - s)
            assert err_m < tol_mean, f"{name} t={t1} x0={MC_X0[j]}: mean {float(emp_mean[j])} vs {m} (tol {tol_mean})"
            assert err_s < tol_std, f"{name} t={t1} x0={MC_X0[j]}: std {float(emp_std[j])} vs {s} (tol {tol_std})"
            worst = max(worst, err_m / tol_mean, err_s / tol_std)
    assert worst < 1.0


# ---------------------------------------------------------------------------------------------
# 2. f = d log alpha/dt and g^2 = d std^2/dt - 2 f std^2, by central differences


@pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
def test_f_g2_consistent_with_alpha_std(name, params):
    sde = get_sde(name, **params)
    d = 1e-6
    t = OFF_KNOT * sde.T
    away_from_knots(name, t, 10 * d, **params)
    a_p, s_p = sde.alpha_std(tt(t + d))
    a_m, s_m = sde.alpha_std(tt(t - d))
    _, s = sde.alpha_std(tt(t))
    f_fd = (torch.log(a_p) - torch.log(a_m)) / (2 * d)
    g2_fd = (s_p**2 - s_m**2) / (2 * d) - 2 * f_fd * s**2
    f, g2 = sde.f_g2(tt(t))
    torch.testing.assert_close(f, f_fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g2, g2_fd, rtol=1e-6, atol=1e-8)
    # ... and against the independent references, differentiated the same way.
    ra_p, rs_p = ref_alpha_std(name, t + d, **params)
    ra_m, rs_m = ref_alpha_std(name, t - d, **params)
    rf = (np.log(ra_p) - np.log(ra_m)) / (2 * d)
    rg2 = (rs_p**2 - rs_m**2) / (2 * d) - 2 * rf * ref_alpha_std(name, t, **params)[1] ** 2
    torch.testing.assert_close(f, tt(rf), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g2, tt(rg2), rtol=1e-6, atol=1e-8)
    # sde() is (f x, sqrt(g^2)) per sample.
    x = torch.linspace(-2, 2, 2 * len(t), dtype=F64).reshape(len(t), 2)
    drift, diffusion = sde.sde(x, tt(t))
    torch.testing.assert_close(drift, f_fd[:, None] * x, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(diffusion**2, g2_fd, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# 3. Transitions


TRIPLES = [(0.1, 0.3, 0.7), (0.02, 0.5, 0.95), (0.0, 0.25, 1.0), (0.3013, 0.30151, 0.3017), (0.44, 0.44, 0.9)]


@pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
def test_transition_composes_and_matches_marginals(name, params):
    sde = get_sde(name, **params)
    T = sde.T
    s, u, t = (tt([tr[i] * T for tr in TRIPLES]) for i in range(3))
    a_su, sig_su = sde.transition(s, u)
    a_ut, sig_ut = sde.transition(u, t)
    a_st, sig_st = sde.transition(s, t)
    # Chapman-Kolmogorov: x_t = a_ut (a_su x_s + sig_su z1) + sig_ut z2.
    torch.testing.assert_close(a_su * a_ut, a_st, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close((a_ut * sig_su) ** 2 + sig_ut**2, sig_st**2, rtol=1e-9, atol=1e-13)
    # From x_s ~ N(alpha_s x0, std_s^2): mean a alpha_s x0 = alpha_t x0, variance a^2 std_s^2 + sig^2 = std_t^2.
    ra_s, rs_s = ref_alpha_std(name, s.numpy(), **params)
    ra_t, rs_t = ref_alpha_std(name, t.numpy(), **params)
    torch.testing.assert_close(a_st * tt(ra_s), tt(ra_t), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close((a_st * tt(rs_s)) ** 2 + sig_st**2, tt(rs_t**2), rtol=1e-9, atol=1e-13)
    # s = t is the identity.
    a_tt, sig_tt = sde.transition(t, t)
    torch.testing.assert_close(a_tt, torch.ones_like(a_tt))
    assert float(sig_tt.abs().max()) < 1e-6


def _g2_closed_form(name: str, u: float) -> float:
    """The papers' diffusion coefficients, derived by hand (default parameters)."""
    if name == "vp":
        return 0.1 + 19.9 * u
    if name == "subvp":
        b = 0.1 * u + 9.95 * u**2
        return (0.1 + 19.9 * u) * (1 - math.exp(-2 * b))
    if name == "vp_cosine":
        return math.pi / (1 + COS_S) * math.tan((u + COS_S) / (1 + COS_S) * math.pi / 2)
    if name == "ve":
        lr = math.log(50.0 / 0.01)
        return 0.01**2 * math.exp(2 * lr * u) * 2 * lr
    raise KeyError(name)


@pytest.mark.parametrize("name", ["vp", "subvp", "vp_cosine", "ve"])
def test_transition_variance_is_the_ito_integral(name):
    """sigma(s, t)^2 = int_s^t (alpha_t / alpha_u)^2 g(u)^2 du, by quadrature of the closed-form g^2."""
    sde = get_sde(name)
    for s, t in [(0.0, 0.05), (0.1, 0.4), (0.35, 0.9 * sde.T), (0.6, 0.61)]:
        a, sig = sde.transition(tt(s), tt(t))
        ra = lambda v: ref_alpha_std(name, v)[0]  # noqa: E731
        ref_var, _ = integrate.quad(lambda v: (ra(t) / ra(v)) ** 2 * _g2_closed_form(name, v), s, t, epsabs=0, epsrel=1e-12)
        assert float(a) == pytest.approx(float(ra(t) / ra(s)), rel=1e-12)
        assert float(sig) ** 2 == pytest.approx(ref_var, rel=1e-8)


# ---------------------------------------------------------------------------------------------
# 4. DDPM = discretised VP


def test_ddpm_alpha_bar_is_cumprod_and_steps_are_the_chain():
    sde = get_sde("ddpm")
    N = DDPM_N
    betas = torch.linspace(1e-4, 0.02, N, dtype=F64)
    abar = torch.cumprod(1 - betas, 0)
    t_i = torch.arange(N + 1, dtype=F64) / N
    alpha, std = sde.alpha_std(t_i)
    assert float(alpha[0]) == 1.0 and float(std[0]) == 0.0
    torch.testing.assert_close(alpha[1:], torch.sqrt(abar), rtol=1e-12, atol=0)
    torch.testing.assert_close(std[1:], torch.sqrt(1 - abar), rtol=1e-12, atol=0)
    # One step t_{i-1} -> t_i is q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1}, beta_i I).
    a, sig = sde.transition(t_i[:-1], t_i[1:])
    torch.testing.assert_close(a, torch.sqrt(1 - betas), rtol=1e-12, atol=0)
    torch.testing.assert_close(sig, torch.sqrt(betas), rtol=1e-9, atol=0)
    # Within step i the rate is constant: beta(t) = -N log(1 - beta_i).
    f, g2 = sde.f_g2((t_i[:-1] + t_i[1:]) / 2)
    torch.testing.assert_close(g2, -N * torch.log1p(-betas), rtol=1e-9, atol=0)
    torch.testing.assert_close(f, 0.5 * N * torch.log1p(-betas), rtol=1e-9, atol=0)
    # The chain's times and the network's step index.
    torch.testing.assert_close(sde.discrete_times(), t_i[1:])
    torch.testing.assert_close(sde.conditioning(t_i[1:]), torch.arange(N, dtype=F64))
    assert sde.eps == pytest.approx(1 / N)


def test_ddpm_is_within_1_over_n_of_continuous_vp():
    """With beta_i = 1e-4 + (i-1)/(N-1) * 0.0199 and beta(t) = 0.1 + 19.9 t:

    beta_i - beta(t_i)/N = (beta_max - beta_min)/N * (i - N)/(N (N - 1)), so |.| <= (beta_max - beta_min)/N^2.
    log abar_i + B(t_i) = [sum_{j<=i} beta_j - int_0^{t_i} beta] + sum_{j<=i} [log(1 - beta_j) + beta_j]. The first
    bracket is (beta_max - beta_min)/2 * i (i - N)/(N^2 (N - 1)), at most (beta_max - beta_min)/(8 (N - 1)) = 0.0025
    in size; the second is within sum_j beta_j^2 (1/2 + beta_j) (as 0 <= -log(1-x) - x <= x^2/2 + x^3 for x <= 0.02),
    = 0.0690 ~ int_0^1 beta^2 dt / (2N): O(1/N). So |log abar_i + B(t_i)| <= 0.0715 (measured max 0.0677), and
    |abar_i - e^{-B(t_i)}| <= max(abar_i, e^{-B(t_i)}) expm1(|first_i| + second_i), checked i-wise; its maximum
    is < 1/N (measured 8.1e-4 at t = 0.141).
    """
    N, bmin, bmax = DDPM_N, 0.1, 20.0
    ddpm, vp = get_sde("ddpm"), get_sde("vp", beta_min=bmin, beta_max=bmax)
    t_i = torch.arange(1, N + 1, dtype=F64) / N
    betas = torch.linspace(1e-4, 0.02, N, dtype=F64)
    beta_err = (betas - (bmin + (bmax - bmin) * t_i) / N).abs()
    assert float(beta_err.max()) <= (bmax - bmin) / N**2 * (1 + 1e-9)

    abar_d = ddpm.alpha_std(t_i)[0] ** 2
    abar_c = vp.alpha_std(t_i)[0] ** 2
    log_bound = (bmax - bmin) / (8 * (N - 1)) + float((betas**2 * (0.5 + betas)).sum())
    assert float((abar_d.log() - abar_c.log()).abs().max()) < log_bound  # measured 0.0677 vs 0.0715
    # i-wise: |abar_d - abar_c| <= max(abar) * (e^{|dlog|} - 1) with dlog bounded by the two brackets at t_i.
    i = torch.arange(1, N + 1, dtype=F64)
    first = (bmax - bmin) / 2 * i * (N - i) / (N**2 * (N - 1))
    cum_beta2 = torch.cumsum(betas**2 * (0.5 + betas), 0)
    iw_bound = torch.maximum(abar_d, abar_c) * torch.expm1(first + cum_beta2)
    assert bool(((abar_d - abar_c).abs() <= iw_bound).all())
    assert float((abar_d - abar_c).abs().max()) < 1.0 / N  # measured 8.1e-4 at t = 0.142


def test_ddpm_cosine_is_nichol_dhariwal():
    sde = get_sde("ddpm", schedule="cosine")
    N = DDPM_N
    t_i = np.arange(N + 1) / N
    abar_nd = nichol_f(t_i) / nichol_f(0.0)
    betas, raw = ddpm_cosine_betas(N)
    clipped = np.nonzero(raw > 0.999)[0]
    np.testing.assert_array_equal(clipped, [N - 1])  # only the last step is clipped
    got = (sde.alpha_std(tt(t_i))[0] ** 2).numpy()
    # Before the clipped step: abar_i = f(t_i)/f(0) exactly.
    np.testing.assert_allclose(got[: N], abar_nd[: N], rtol=1e-9, atol=0)
    # The clipped last step: abar_N = abar_{N-1} (1 - 0.999), not f(1)/f(0) ~ 0.
    assert got[N] == pytest.approx(abar_nd[N - 1] * 0.001, rel=1e-9)
    np.testing.assert_allclose(got[1:], np.cumprod(1 - betas), rtol=1e-9)
    np.testing.assert_allclose(sde.schedule.betas.numpy(), betas, rtol=1e-12, atol=1e-15)  # 1 - ratio: ulp-level
    # The same alpha-bar as the continuous cosine SDE at the chain's times below its T.
    cont = get_sde("vp_cosine")
    inside = t_i <= cont.T
    np.testing.assert_allclose(got[inside], (cont.alpha_std(tt(t_i[inside]))[0] ** 2).numpy(), rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# 5. NCSN = discretised VE


def test_ncsn_is_the_geometric_ladder_and_smld_chain():
    sde = get_sde("ncsn", **NCSN)
    L = NCSN["num_scales"]
    ladder = np.geomspace(NCSN["sigma_min"], NCSN["sigma_max"], L)  # sigma_(1) < ... < sigma_(L)
    t_k = np.arange(1, L + 1) / L
    alpha, std = sde.alpha_std(tt(t_k))
    np.testing.assert_allclose(std.numpy(), ladder, rtol=1e-12)
    np.testing.assert_array_equal(alpha.numpy(), np.ones(L))
    # The step t_k -> t_{k+1} adds variance sigma_{k+1}^2 - sigma_k^2 (SMLD's chain), with a = 1.
    a, sig = sde.transition(tt(t_k[:-1]), tt(t_k[1:]))
    np.testing.assert_allclose(a.numpy(), np.ones(L - 1), rtol=0, atol=0)
    np.testing.assert_allclose(sig.numpy() ** 2, ladder[1:] ** 2 - ladder[:-1] ** 2, rtol=1e-12)
    a0, sig0 = sde.transition(tt(0.0), tt(t_k[0]))
    assert float(a0) == 1.0 and float(sig0) == pytest.approx(ladder[0], rel=1e-12)
    # Between levels the variance is linear (g^2 piecewise constant).
    f, g2 = sde.f_g2(tt(t_k - 0.5 / L))
    np.testing.assert_array_equal(f.numpy(), np.zeros(L))
    np.testing.assert_allclose(g2.numpy(), L * np.diff(np.concatenate([[0.0], ladder**2])), rtol=1e-12)
    # Times, conditioning (log sigma, as NCSN++ embeds it), eps and prior.
    np.testing.assert_allclose(sde.discrete_times().numpy(), t_k, rtol=1e-15)
    np.testing.assert_allclose(sde.conditioning(tt(t_k)).numpy(), np.log(ladder), rtol=1e-12)
    assert sde.eps == pytest.approx(1 / L)
    assert sde.prior_std == pytest.approx(NCSN["sigma_max"], rel=1e-12)


def test_ncsn_ladder_samples_the_continuous_ve():
    """sigma(t) = sigma_min (sigma_max/sigma_min)^t at t = k/(L-1) is the ladder; the VE's exact
    variance is sigma(t)^2 - sigma_min^2."""
    smin, smax, L = NCSN["sigma_min"], NCSN["sigma_max"], NCSN["num_scales"]
    ve = get_sde("ve", sigma_min=smin, sigma_max=smax)
    ladder = np.geomspace(smin, smax, L)
    t = np.arange(L) / (L - 1)
    sigma_t = smin * (smax / smin) ** t
    np.testing.assert_allclose(sigma_t, ladder, rtol=1e-12)
    var = (ve.alpha_std(tt(t))[1] ** 2).numpy()
    np.testing.assert_allclose(var, sigma_t**2 - smin**2, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(np.sqrt(var + smin**2), ladder, rtol=1e-12)
    # The NCSN chain and the VE agree at the top: both end at std^2 ~ sigma_max^2 (VE: minus sigma_min^2).
    assert ve.prior_std == pytest.approx(math.sqrt(smax**2 - smin**2), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# 6. log-SNR


@pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
def test_log_snr_inverse_and_decreasing(name, params):
    sde = get_sde(name, **params)
    t = torch.linspace(0, sde.T, 2001, dtype=F64)[1:]
    lam = sde.log_snr(t)
    ra, rs = ref_alpha_std(name, t.numpy(), **params)
    torch.testing.assert_close(lam, tt(np.log(ra) - np.log(rs)), rtol=1e-9, atol=1e-9)
    assert bool((lam[1:] < lam[:-1]).all()), "log_snr must be strictly decreasing"
    torch.testing.assert_close(sde.t_from_log_snr(lam), t, rtol=1e-9, atol=1e-12)
    # The other way round, on a grid of log-SNRs inside the range.
    lam_grid = torch.linspace(float(lam[-1]), float(lam[0]), 301, dtype=F64)
    torch.testing.assert_close(sde.log_snr(sde.t_from_log_snr(lam_grid)), lam_grid, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# 7. Prior


def _ref_prior_std(name: str, **params) -> float:
    if name == "vp":
        return math.sqrt(1 - math.exp(-(0.1 + 9.95)))
    if name == "subvp":
        return 1 - math.exp(-(0.1 + 9.95))
    if name == "vp_cosine":
        a = math.cos((COS_T + COS_S) / (1 + COS_S) * math.pi / 2) / math.cos(COS_S / (1 + COS_S) * math.pi / 2)
        return math.sqrt(1 - a * a)
    if name == "ve":
        return math.sqrt(50.0**2 - 0.01**2)
    if name == "ddpm":
        betas = ddpm_cosine_betas()[0] if params.get("schedule") == "cosine" else ddpm_linear_betas()
        return math.sqrt(1 - float(np.prod(1 - betas)))
    if name == "ncsn":
        return NCSN["sigma_max"]
    raise KeyError(name)


@pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
def test_prior(name, params):
    sde = get_sde(name, **params)
    ps = sde.prior_std
    assert ps == pytest.approx(_ref_prior_std(name, **params), rel=1e-10)
    assert ps == pytest.approx(float(sde.alpha_std(tt(sde.T))[1]), rel=1e-14)
    z = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * ps * 1.3
    ref = torch.distributions.Normal(torch.zeros((), dtype=F64), torch.tensor(ps, dtype=F64)).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(sde.prior_logp(z), ref, rtol=1e-12, atol=1e-9)
    n = 200_000
    g = torch.Generator().manual_seed(5)
    x = sde.prior_sampling((n // 8, 8), generator=g, dtype=F64)
    assert x.shape == (n // 8, 8) and x.dtype == F64
    assert abs(float(x.mean())) < 5 * ps / math.sqrt(n)
    assert abs(float(x.std()) - ps) < 5 * ps / math.sqrt(2 * (n - 1))
    # The generator makes it reproducible.
    y = sde.prior_sampling((n // 8, 8), generator=torch.Generator().manual_seed(5), dtype=F64)
    torch.testing.assert_close(x, y, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 8. Reverse SDE and probability-flow ODE with the exact score of Gaussian data

GAUSS_M = (0.7, -1.2, 2.0)
GAUSS_S0 = 0.6
REV_T = np.array([0.0537, 0.3112, 0.6071, 0.8933])  # >= 1e-4 from every DDPM/NCSN knot


def _gaussian_score(name: str, params: dict):
    """Exact score of x_t when x_0 ~ N(m, s0^2 I): -(x - alpha m) / (alpha^2 s0^2 + std^2)."""
    m = torch.tensor(GAUSS_M, dtype=F64)

    def score(x, t):
        a, s = (tt(v)[:, None] for v in ref_alpha_std(name, t.numpy(), **params))
        return -(x - a * m) / (a**2 * GAUSS_S0**2 + s**2)

    return score


def _ref_moments_and_rates(name: str, t: float, params: dict, d: float = 1e-6):
    """mean_t = alpha m, var_t = alpha^2 s0^2 + std^2 and their time derivatives (central differences)."""

    def mv(v):
        a, s = ref_alpha_std(name, v, **params)
        return a * np.array(GAUSS_M), a**2 * GAUSS_S0**2 + s**2

    (mp, vp), (mm, vm), (m0, v0) = mv(t + d), mv(t - d), mv(t)
    return m0, float(v0), (mp - mm) / (2 * d), float((vp - vm) / (2 * d))


@pytest.mark.parametrize("probability_flow", [True, False], ids=["pf_ode", "reverse_sde"])
@pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
def test_reverse_drift_transports_gaussian_marginals(name, params, probability_flow):
    """The drift is affine in x for Gaussian data: drift(x) = A x + b. Run backward, the reverse SDE / PF ODE
    has the forward marginals iff E[drift] = d mean/dt and E[(x-m) drift^T] + transpose - diffusion^2 I = dVar/dt,
    i.e. 2 A var - diffusion^2 = d var/dt (the PF ODE has diffusion 0)."""
    sde = get_sde(name, **params)
    rev = sde.reverse(_gaussian_score(name, params), probability_flow=probability_flow)
    D = len(GAUSS_M)
    away_from_knots(name, REV_T * sde.T, 1e-5, **params)
    for t in REV_T * sde.T:
        mean, var, dmean, dvar = _ref_moments_and_rates(name, t, params)
        sd = math.sqrt(var)
        # Analytically: evaluate at the mean and at mean + sd e_j.
        x = torch.tensor(mean, dtype=F64)[None] + sd * torch.cat([torch.zeros(1, D, dtype=F64), torch.eye(D, dtype=F64)])
        drift, diffusion = rev.sde(x, t)
        assert diffusion.shape == (D + 1,)
        if probability_flow:
            assert float(diffusion.abs().max()) == 0.0
        else:
            g2 = sde.f_g2(tt(t))[1]
            torch.testing.assert_close(diffusion, torch.sqrt(g2).expand(D + 1), rtol=1e-12, atol=0)
        slope = (drift[1:] - drift[:1]) / sd  # row j: d drift / d x_j
        torch.testing.assert_close(drift[0], tt(dmean), rtol=1e-6, atol=1e-7)  # E[drift] = drift(mean)
        cov = slope * var  # E[(x - m) drift^T] = var * Jacobian^T
        lhs = cov + cov.T - float(diffusion[0]) ** 2 * torch.eye(D, dtype=F64)
        torch.testing.assert_close(lhs, dvar * torch.eye(D, dtype=F64), rtol=1e-6, atol=1e-6 * max(1.0, abs(dvar)))


@pytest.mark.parametrize("name", ["vp", "ve", "ddpm"])
def test_reverse_pf_drift_moments_by_sampling(name):
    """The same identities estimated from 50 000 samples of the marginal, within 5 standard errors."""
    sde = get_sde(name)
    rev = sde.reverse(_gaussian_score(name, {}), probability_flow=True)
    D, n = len(GAUSS_M), 50_000
    g = torch.Generator().manual_seed(11)
    for t in REV_T[[1, 2]] * sde.T:
        mean, var, dmean, dvar = _ref_moments_and_rates(name, t, {})
        x = torch.tensor(mean, dtype=F64) + math.sqrt(var) * torch.randn(n, D, generator=g, dtype=F64)
        drift, _ = rev.sde(x, t)
        se = drift.std(0) / math.sqrt(n)
        assert bool(((drift.mean(0) - tt(dmean)).abs() < 5 * se + 1e-12).all())
        xc = x - tt(mean)
        prods = xc[:, :, None] * drift[:, None, :]
        prods = prods + prods.transpose(1, 2)  # (x-m) drift^T + transpose, per sample
        est, se = prods.mean(0), prods.std(0) / math.sqrt(n)
        assert bool(((est - dvar * torch.eye(D, dtype=F64)).abs() < 5 * se).all()), (est, dvar)


# ---------------------------------------------------------------------------------------------
# Conditioning and discrete times


def test_conditioning_and_discrete_times():
    t = tt([0.1, 0.5, 0.9])
    for name in ("vp", "subvp"):
        sde = get_sde(name)
        torch.testing.assert_close(sde.conditioning(t), 999 * t)
        assert sde.discrete_times() is None
    assert get_sde("vp_cosine").discrete_times() is None
    ve = get_sde("ve")
    assert ve.discrete_times() is None
    torch.testing.assert_close(ve.conditioning(t), tt(np.log(ref_alpha_std("ve", t.numpy())[1])), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 9. Bad arguments


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("vpp", {}, r"unknown SDE 'vpp'"),
        ("vp", {"beta_min": 5, "beta_max": 1}, r"beta_min < beta_max"),
        ("subvp", {"beta_min": 0, "beta_max": 1}, r"beta_min"),
        ("ve", {"sigma_min": 2, "sigma_max": 1}, r"sigma_min < sigma_max"),
        ("ncsn", {"sigma_min": 2, "sigma_max": 1}, r"sigma_min < sigma_max"),
        ("vp", {"foo": 1}, r"foo"),
        ("ve", {"beta_min": 0.1}, r"beta_min"),
        ("ddpm", {"schedule": "quadratic"}, r"quadratic"),
        ("vp", {"eps": 1.5}, r"eps"),
        ("vp_cosine", {"T": 1.0}, r"T"),
        ("vp_cosine", {"s": 0.0}, r"\bs\b"),
    ],
)
def test_bad_arguments_raise_value_error(name, params, match):
    with pytest.raises(ValueError, match=match):
        get_sde(name, **params)


@pytest.mark.parametrize(
    "name,params,match",
    [("ddpm", {"num_steps": 0}, "num_steps"), ("ddpm", {"num_steps": -5}, "num_steps"), ("ncsn", {"num_scales": 0}, "num_scales")],
)
def test_bad_sizes_raise_value_error(name, params, match):
    with pytest.raises(ValueError, match=match):
        get_sde(name, **params)


# ---------------------------------------------------------------------------------------------
# 10. dtype and device


def _all_outputs(sde, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    s = t * 0.5
    score = lambda xx, tt_: -xx  # noqa: E731
    lam = sde.log_snr(t)
    return {
        "alpha": sde.alpha_std(t)[0],
        "std": sde.alpha_std(t)[1],
        "f": sde.f_g2(t)[0],
        "g2": sde.f_g2(t)[1],
        "drift": sde.sde(x, t)[0],
        "diffusion": sde.sde(x, t)[1],
        "mean": sde.marginal_prob(x, t)[0],
        "mstd": sde.marginal_prob(x, t)[1],
        "a": sde.transition(s, t)[0],
        "sigma": sde.transition(s, t)[1],
        "log_snr": lam,
        "t_from_log_snr": sde.t_from_log_snr(lam),
        "conditioning": sde.conditioning(t),
        "prior_logp": sde.prior_logp(x),
        "prior_sample": sde.prior_sampling(x.shape, device=x.device, dtype=x.dtype),
        "rev_drift": sde.reverse(score).sde(x, t)[0],
        "pf_diffusion": sde.reverse(score, probability_flow=True).sde(x, t)[1],
    }


@pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
def test_float32_in_float32_out(name, params):
    sde = get_sde(name, **params)
    t64 = tt([0.05, 0.3, 0.55, 0.8]) * sde.T + 3.7e-4  # off the knots
    x64 = torch.linspace(-1.5, 1.5, 4 * 6, dtype=F64).reshape(4, 2, 3)
    out32 = _all_outputs(sde, x64.float(), t64.float())
    out64 = _all_outputs(sde, x64, t64)
    for k, v in out32.items():
        assert v.dtype == torch.float32, f"{k}: {v.dtype}"
        assert out64[k].dtype == F64, f"{k}: {out64[k].dtype}"
        if k != "prior_sample":
            torch.testing.assert_close(v.double(), out64[k], rtol=2e-4, atol=2e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
def test_outputs_live_on_the_inputs_device(name, params):
    sde = get_sde(name, **params)
    dev = torch.device("cuda")
    t = (tt([0.05, 0.3, 0.55, 0.8]) * sde.T + 3.7e-4).to(dev)
    x = torch.linspace(-1.5, 1.5, 4 * 6, dtype=F64).reshape(4, 2, 3).to(dev)
    out = _all_outputs(sde, x, t)
    ref = _all_outputs(sde, x.cpu(), t.cpu())
    for k, v in out.items():
        assert v.device.type == "cuda", f"{k} on {v.device}"
        if k != "prior_sample":
            torch.testing.assert_close(v.cpu(), ref[k], rtol=1e-9, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")
