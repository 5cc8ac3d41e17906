"""The probability-flow likelihood against the exact densities of Gaussian mixtures.

Under every SDE a Gaussian mixture stays a mixture, so log p_eps and the exact score are known in
closed form (scorelab.toy): the ODE + divergence must reproduce log p_eps, and bits/dim must be the
documented formula applied to it.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from scorelab import toy
from scorelab.likelihood import BitsPerDimResult, LikelihoodResult, bits_per_dim, dequantize, likelihood, log_likelihood
from scorelab.sde import get_sde

SDES = ("vp", "subvp", "ve", "vp_cosine")
EPS = 1e-5
TIGHT = dict(rtol=1e-6, atol=1e-6)
# Measured: with the exact terminal density the solver's error is <= 1.2e-4 nats on these points.
SOLVER_TOL = 1e-3



def _times(n: int, t: float) -> torch.Tensor:
    return torch.full((n,), t, dtype=torch.float64)


def _exact_prior(gm: toy.GaussianMixture, sde):
    """log p_T of the mixture itself: isolates the ODE and divergence from the prior's approximation."""
    return lambda z: gm.log_prob(z, sde, _times(z.shape[0], sde.T))


def _full_cov_mixture() -> toy.GaussianMixture:
    """5-D mixture with rotated, anisotropic covariances: Jacobians with large off-diagonal terms, so a
    Rademacher probe's estimate really varies (on the isotropic blobs it is nearly exact)."""
    g = torch.Generator().manual_seed(7)
    a = 0.5 * torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) + 0.05 * torch.eye(5, dtype=torch.float64)
    means = 1.5 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    return toy.GaussianMixture(weights=[0.4, 0.35, 0.25], means=means, covs=covs)


@pytest.fixture(scope="module")
def blobs():
    gm = toy.three_blobs()
    return gm, gm.sample(64, generator=torch.Generator().manual_seed(0)).double()


class Counted:
    """The test's own count of score evaluations."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


# ---------------------------------------------------------------------------------------------
# Exact divergence


@pytest.mark.parametrize("name", SDES)
def test_exact_divergence_matches_exact_density(blobs, name):
    gm, x = blobs
    sde = get_sde(name)
    ref = gm.log_prob(x, sde, _times(len(x), EPS))
    res = likelihood(gm.score_fn(sde), sde, x, eps=EPS, prior_logp=_exact_prior(gm, sde), **TIGHT)
    assert isinstance(res, LikelihoodResult)
    assert res.logp.shape == (64,) and res.logp.dtype == torch.float64
    assert torch.equal(res.stderr, torch.zeros(64, dtype=torch.float64))
    assert (res.logp - ref).abs().max() < SOLVER_TOL


@pytest.mark.parametrize("name", SDES)
def test_default_prior_within_its_approximation(blobs, name):
    # The SDE's prior N(0, std_T^2 I) drops alpha(T) x_0 (and, for VE, the data's mean next to
    # sigma_max = 50): measured max errors 5e-3 (vp, subvp), 7e-3 (vp_cosine), 2.0e-2 (ve), which is
    # the prior's own mismatch log p_T - prior_logp at the points' x_T (2e-2 at 3 sigma for VE).
    gm, x = blobs
    sde = get_sde(name)
    ref = gm.log_prob(x, sde, _times(len(x), EPS))
    err = log_likelihood(gm.score_fn(sde), sde, x, eps=EPS, **TIGHT) - ref
    assert err.abs().max() < (0.03 if name == "ve" else 0.01)
    assert err.mean().abs() < 1e-3  # the mismatch averages out to ~KL(p_T || prior), ~1e-4


def test_float32_input(blobs):
    gm, x = blobs
    sde = get_sde("vp")
    seen = []

    def score(x, t):
        seen.append((x.dtype, t.dtype, t.shape))
        return gm.score(x, sde, t)

    r32 = likelihood(score, sde, x.float(), eps=EPS, prior_logp=_exact_prior(gm, sde), **TIGHT)
    assert set(seen) == {(torch.float32, torch.float32, (64,))}  # the score sees the input's dtype
    ref = gm.log_prob(x, sde, _times(len(x), EPS))
    assert r32.logp.dtype == torch.float64
    assert (r32.logp - ref).abs().max() < SOLVER_TOL


def test_nfe_is_the_number_of_score_calls(blobs):
    gm, x = blobs
    sde = get_sde("subvp")
    for exact in (True, False):
        counted = Counted(gm.score_fn(sde))
        res = likelihood(counted, sde, x[:8], exact, eps=EPS)
        assert res.nfe == counted.calls > 10


def test_log_likelihood_is_likelihood_logp(blobs):
    gm, x = blobs
    sde = get_sde("vp")
    kw = dict(exact=False, probes=3, seed=5, eps=1e-3)
    assert torch.equal(log_likelihood(gm.score_fn(sde), sde, x[:8], **kw), likelihood(gm.score_fn(sde), sde, x[:8], **kw).logp)


def test_bad_arguments():
    gm = toy.three_blobs()
    sde = get_sde("vp")
    x = gm.sample(2).double()
    with pytest.raises(ValueError, match="probe"):
        likelihood(gm.score_fn(sde), sde, x, exact=False, probe="cauchy")
    with pytest.raises(ValueError, match="eps"):
        likelihood(gm.score_fn(sde), sde, x, eps=1.5)
    with pytest.raises(ValueError, match="floating"):
        likelihood(gm.score_fn(sde), sde, torch.ones(2, 2, dtype=torch.int64))
    detached = lambda x, t: gm.score(x, sde, t).detach()  # noqa: E731
    with pytest.raises(RuntimeError, match="no_grad"):
        likelihood(detached, get_sde("ve"), x)


# ---------------------------------------------------------------------------------------------
# Hutchinson-Skilling


def _hutchinson_case(gm, x, name, probe, probes=8):
    sde = get_sde(name)
    ref = gm.log_prob(x, sde, _times(len(x), EPS))
    res = likelihood(gm.score_fn(sde), sde, x, exact=False, probe=probe, probes=probes, eps=EPS,
                     prior_logp=_exact_prior(gm, sde), seed=11, **TIGHT)
    err = res.logp - ref
    se = torch.sqrt(res.stderr**2 + SOLVER_TOL**2)  # the ODE's own (deterministic) error as a floor
    return err, se, res


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_with_honest_stderr(name, probe):
    gm = _full_cov_mixture()
    x = gm.sample(64, generator=torch.Generator().manual_seed(1)).double()
    err, se, res = _hutchinson_case(gm, x, name, probe)
    assert bool((res.stderr > 0).all())
    combined = se.square().sum().sqrt() / len(err)  # standard error of the mean error
    assert err.mean().abs() < 3 * combined
    # With 8 probes err/stderr is ~Student-t with 7 dof: P(|t| > 3) = 2%.
    assert ((err.abs() / se) <= 3).float().mean() >= 0.9


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_hutchinson_gaussian_probes_on_blobs(blobs, name):
    # On the isotropic blobs Rademacher probes are almost exact (diagonal Jacobians); Gaussian ones are
    # not. In 2-D a Gaussian probe's estimate z^T B z is a skewed two-term chi-square mix, so err/stderr
    # is far from Student-t with 8 probes (measured: 89-94% within 3 SE); 32 probes restore it.
    gm, x = blobs
    err, se, _ = _hutchinson_case(gm, x, name, "gaussian", probes=32)
    assert err.mean().abs() < 3 * se.square().sum().sqrt() / len(err)
    assert ((err.abs() / se) <= 3).float().mean() >= 0.9


def test_single_probe_has_no_stderr(blobs):
    gm, x = blobs
    sde = get_sde("vp")
    res = likelihood(gm.score_fn(sde), sde, x[:4], exact=False, probes=1, eps=1e-3)
    assert torch.isfinite(res.logp).all() and torch.isnan(res.stderr).all()


def test_sample_does_not_depend_on_its_batch(blobs):
    gm, x = blobs
    sde = get_sde("vp")
    score = gm.score_fn(sde)
    x16 = x[:16]

    def run(solver, options, seed=3):
        batch = likelihood(score, sde, x16, exact=False, seed=seed, solver=solver, options=options, **TIGHT).logp
        alone = torch.cat([
            likelihood(score, sde, x16[i : i + 1], exact=False, seed=seed, indices=torch.tensor([i]),
                       solver=solver, options=options, **TIGHT).logp
            for i in (0, 7, 15)
        ])
        return batch, alone

    # Fixed grid: the same probes and the same steps, so the same numbers.
    batch, alone = run("rk4", {"step_size": 1 / 32})
    assert torch.equal(batch[[0, 7, 15]], alone)
    # Adaptive: the batch shares its step sizes, so only the solver's tolerance separates the two
    # (measured 2e-5); another seed moves the estimates by the probe noise (~1 nat).
    batch, alone = run("dopri5", None)
    assert (batch[[0, 7, 15]] - alone).abs().max() < 1e-4
    other, _ = run("dopri5", None, seed=4)
    assert (other - batch).abs().max() > 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(blobs):
    gm, x = blobs
    sde = get_sde("vp")
    kw = dict(exact=False, probes=4, seed=2, eps=EPS, **TIGHT)
    cpu = likelihood(gm.score_fn(sde), sde, x[:16], **kw)
    gpu = likelihood(gm.score_fn(sde), sde, x[:16].cuda(), **kw)
    assert gpu.logp.device.type == "cuda"
    assert (gpu.logp.cpu() - cpu.logp).abs().max() < 1e-3


# ---------------------------------------------------------------------------------------------
# Bits per dimension


def _unit_box_mixture() -> toy.GaussianMixture:
    """A wide mixture on the model's [-1, 1]^2."""
    return toy.GaussianMixture(weights=[0.6, 0.4], means=[[-0.3, -0.2], [0.4, 0.3]], stds=[0.3, 0.25])


def _quantise(x: torch.Tensor, bits: int) -> torch.Tensor:
    return ((x.double() + 1) / 2 * 2**bits).floor().clamp(0, 2**bits - 1).to(torch.int64)


def test_dequantize_is_uniform_within_cells():
    x_int = torch.randint(0, 256, (4000, 1), generator=torch.Generator().manual_seed(0))
    y = dequantize(x_int, bits=8, seed=1)
    u = y * 256 - x_int
    assert bool(((u >= 0) & (u < 1)).all())
    assert stats.kstest(u.flatten().numpy(), "uniform").pvalue > 1e-3
    # Per-sample streams: sample 123 gets the same u alone.
    alone = dequantize(x_int[123:124], bits=8, seed=1, indices=torch.tensor([123]))
    assert torch.equal(alone, y[123:124])


def test_bits_per_dim_is_the_formula_at_the_dequantised_points():
    gm = _unit_box_mixture()
    sde = get_sde("vp")
    x_int = _quantise(gm.sample(32, generator=torch.Generator().manual_seed(3)), bits=8).to(torch.uint8)
    res = bits_per_dim(gm.score_fn(sde), sde, x_int, exact=True, eps=EPS, seed=9, dtype=torch.float64,
                       prior_logp=_exact_prior(gm, sde), **TIGHT)
    assert isinstance(res, BitsPerDimResult)
    # Independently: log p_eps at x = 2 y - 1, then the change of variables to z = 256 y.
    x = 2 * dequantize(x_int, bits=8, seed=9) - 1
    logp = gm.log_prob(x, sde, _times(len(x), EPS))
    d = 2
    ref = -(logp + d * math.log(2.0)) / (d * math.log(2)) + 8
    assert (res.bpd - ref).abs().max() < 1e-4
    assert torch.equal(res.stderr, torch.zeros_like(res.bpd))


def test_bits_per_dim_hutchinson_stderr_is_in_bits():
    gm = _unit_box_mixture()
    sde = get_sde("vp")
    x_int = _quantise(gm.sample(64, generator=torch.Generator().manual_seed(4)), bits=8)
    counted = Counted(gm.score_fn(sde))
    # 32 Gaussian probes: see test_hutchinson_gaussian_probes_on_blobs for why not 8 in 2-D.
    res = bits_per_dim(counted, sde, x_int, probe="gaussian", probes=32, eps=EPS, seed=2, dtype=torch.float64,
                       prior_logp=_exact_prior(gm, sde), **TIGHT)
    assert res.nfe == counted.calls
    x = 2 * dequantize(x_int, bits=8, seed=2) - 1
    ref = -(gm.log_prob(x, sde, _times(len(x), EPS)) + 2 * math.log(2.0)) / (2 * math.log(2)) + 8
    se = torch.sqrt(res.stderr**2 + (SOLVER_TOL / (2 * math.log(2))) ** 2)
    assert ((res.bpd - ref).abs() <= 3 * se).float().mean() >= 0.9
    assert (res.bpd - ref).mean().abs() < 3 * se.square().sum().sqrt() / len(se)


def test_bits_per_dim_expectation_over_dequantisation_is_exact():
    # One narrow Gaussian centred on a 4-bit cell: E_u[bpd] has a closed form, and it bounds the exact
    # discrete NLL -log2 P(cell) / D from above.
    bits, d, n, k = 4, 2, 1024, 9
    h = 2.0 / 2**bits  # the cell's width in model space
    c = -1.0 + (k + 0.5) * h  # its centre
    s = 0.05
    gm = toy.GaussianMixture(weights=[1.0], means=[[c, c]], stds=[s])
    sde = get_sde("vp")
    x_int = torch.full((n, d), k, dtype=torch.int32)
    res = bits_per_dim(gm.score_fn(sde), sde, x_int, bits=bits, exact=True, eps=EPS, dtype=torch.float64,
                       prior_logp=_exact_prior(gm, sde), **TIGHT)

    alpha, std = (float(v) for v in sde.alpha_std(torch.tensor(EPS, dtype=torch.float64)))
    var = alpha**2 * s**2 + std**2
    m = alpha * c
    # x uniform on [c - h/2, c + h/2): E (x - m)^2 = (c - m)^2 + h^2 / 12.
    nll = 0.5 * d * math.log(2 * math.pi * var) + d * ((c - m) ** 2 + h**2 / 12) / (2 * var)
    expected = (nll - d * math.log(2.0)) / (d * math.log(2)) + bits
    mc_se = float(res.bpd.std()) / math.sqrt(n)
    assert abs(float(res.bpd.mean()) - expected) < 4 * mc_se + 1e-4

    cell = stats.norm.cdf((c + h / 2 - m) / math.sqrt(var)) - stats.norm.cdf((c - h / 2 - m) / math.sqrt(var))
    discrete = -math.log2(cell)  # P(x_int) = cell^D, per dimension
    assert expected > discrete
    assert float(res.bpd.mean()) > discrete - 3 * mc_se


@pytest.mark.parametrize(
    "x_int, bits",
    [
        (torch.rand(2, 2), 8),  # floating point
        (torch.tensor([[0, 256]]), 8),  # above 2^8 - 1
        (torch.tensor([[-1, 3]]), 8),  # negative
        (torch.tensor([[0, 16]]), 4),  # above 2^4 - 1
    ],
)
def test_bits_per_dim_rejects_bad_integers(x_int, bits):
    gm = _unit_box_mixture()
    sde = get_sde("vp")
    with pytest.raises(ValueError, match=rf"\[0, {2**bits - 1}\]"):
        bits_per_dim(gm.score_fn(sde), sde, x_int, bits=bits)
