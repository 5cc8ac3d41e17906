"""Losses and EMA against exact answers.

The irreducible DSM loss of Gaussian data. For x_0 ~ N(0, s0^2 I) and x_t = a x_0 + s z (a = alpha,
s = std), x_t ~ N(0, v I) with v = a^2 s0^2 + s^2 and the exact score is -x_t / v. The std2-weighted
residual per dim is
    s * score + z = -s (a x_0 + s z) / v + z = (a^2 s0^2 / v) z - (s a / v) x_0,
a sum of independent zero-mean Gaussians, whose variance is
    a^4 s0^4 / v^2 + s^2 a^2 s0^2 / v^2 = a^2 s0^2 (a^2 s0^2 + s^2) / v^2 = a^2 s0^2 / v.
So at fixed t the std2, mean-over-dims loss of the exact score is E = a^2 s0^2 / (a^2 s0^2 + s^2); the
g2 weighting multiplies it by g^2 / s^2; the sum over D dims by D; and with t sampled the loss is
the average of E over t (a quadrature for continuous SDEs, a mean over levels for the chains).
Monte-Carlo estimates are checked within 4 standard errors, with fixed seeds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from scorelab.ema import EMA
from scorelab.losses import LossOutput, dsm_loss, loss_per_bin, sample_times
from scorelab.parameterization import ScoreModel
from scorelab.sde import bcast, get_sde
from scorelab.toy import three_blobs

S0 = 0.8
D = 4
B = 20_000


def gaussian_score(sde, s0: float = S0):
    def score(x: Tensor, t: Tensor) -> Tensor:
        alpha, std = sde.alpha_std(t)
        return -x / bcast(alpha**2 * s0**2 + std**2, x)

    return score


def irreducible(sde, t: Tensor, s0: float = S0) -> Tensor:
    """E = a^2 s0^2 / (a^2 s0^2 + s^2): the std2, mean-over-dims loss of the exact score at t."""
    alpha, std = sde.alpha_std(t.double())
    return alpha**2 * s0**2 / (alpha**2 * s0**2 + std**2)


def gaussian_data(n: int = B, seed: int = 0) -> Tensor:
    return S0 * torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_within_4se(out: LossOutput, expected: float) -> None:
    se = float(out.per_sample.std()) / math.sqrt(out.per_sample.numel())
    assert abs(float(out.loss) - expected) < 4 * se, f"loss {float(out.loss):.6g} vs exact {expected:.6g} (SE {se:.2g})"


# ---------------------------------------------------------------------------------------------
# The exact constant


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_exact_score_loss_at_fixed_t_equals_the_constant(sde_name):
    sde = get_sde(sde_name)
    x0 = gaussian_data()
    for i, t in enumerate([sde.eps, 0.05, 0.3, 0.7, sde.T]):
        gen = torch.Generator().manual_seed(100 + i)
        out = dsm_loss(gaussian_score(sde), sde, x0, t=t, generator=gen)
        tt = torch.tensor(t, dtype=torch.float64)
        assert_within_4se(out, float(irreducible(sde, tt)))
        # g2 weighting: the same residual times g^2 / std^2.
        gen = torch.Generator().manual_seed(100 + i)
        out_g2 = dsm_loss(gaussian_score(sde), sde, x0, t=t, generator=gen, weighting="g2")
        g2_over_s2 = sde.f_g2(tt)[1] / sde.alpha_std(tt)[1] ** 2
        torch.testing.assert_close(out_g2.per_sample, g2_over_s2 * out.per_sample)
        assert_within_4se(out_g2, float(g2_over_s2 * irreducible(sde, tt)))


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_exact_score_loss_with_sampled_t_equals_the_quadrature(sde_name):
    sde = get_sde(sde_name)
    grid = torch.linspace(sde.eps, sde.T, 200_001, dtype=torch.float64)
    expected = float(torch.trapezoid(irreducible(sde, grid), grid)) / (sde.T - sde.eps)
    out = dsm_loss(gaussian_score(sde), sde, gaussian_data(), generator=torch.Generator().manual_seed(7))
    assert_within_4se(out, expected)


def test_exact_score_loss_on_the_discrete_chains_equals_the_level_mean():
    x0 = gaussian_data()
    ddpm = get_sde("ddpm")  # Ho et al.'s simple loss: std2, a mean over dims, t uniform over the chain's steps
    out = dsm_loss(gaussian_score(ddpm), ddpm, x0, generator=torch.Generator().manual_seed(3))
    assert_within_4se(out, float(irreducible(ddpm, ddpm.discrete_times()).mean()))
    # NCSN (Song & Ermon 2019, eqs. 5-6, are half of this): a sum over the D dims; alpha = 1, std = sigma_i.
    ncsn = get_sde("ncsn")
    sigmas = ncsn.schedule.sigmas
    out = dsm_loss(gaussian_score(ncsn), ncsn, x0, reduction="sum", generator=torch.Generator().manual_seed(4))
    assert_within_4se(out, float(D * (S0**2 / (S0**2 + sigmas**2)).mean()))


# ---------------------------------------------------------------------------------------------
# The exact score of a mixture is the minimiser


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve", "ddpm", "ncsn"])
@pytest.mark.parametrize("weighting", ["std2", "g2"])
def test_exact_mixture_score_beats_perturbed_scores(sde_name, weighting):
    """On the same draws (t, z), loss(s* + delta) - loss(s*) = lambda ||delta||^2 + 2 lambda delta.(s* + z/std)
    per sample; the cross term has mean zero because the DSM residual s* + z/std is orthogonal to
    every function of x_t. So the exact score wins, by E[lambda ||delta||^2]."""
    sde = get_sde(sde_name)
    mix = three_blobs()
    gen = torch.Generator().manual_seed(11)
    x0 = mix.sample(4000, generator=gen).double()
    t = sample_times(sde, len(x0), generator=gen, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    exact = mix.score_fn(sde)
    perturbed = {
        "scaled": lambda x, t: 1.1 * exact(x, t),
        "shifted": lambda x, t: exact(x, t) + torch.tensor([0.3, -0.2], dtype=x.dtype),
    }
    base = dsm_loss(exact, sde, x0, weighting=weighting, t=t, noise=z)
    alpha, std = sde.alpha_std(t)
    x_t = bcast(alpha, x0) * x0 + bcast(std, x0) * z
    lam = std**2 if weighting == "std2" else sde.f_g2(t)[1]
    for name, fn in perturbed.items():
        out = dsm_loss(fn, sde, x0, weighting=weighting, t=t, noise=z)
        assert float(out.loss) > float(base.loss), name
        excess = lam * (fn(x_t, t) - exact(x_t, t)).pow(2).mean(1)
        cross = out.per_sample - base.per_sample - excess
        se = float(cross.std()) / math.sqrt(len(cross))
        assert abs(float(cross.mean())) < 4 * se, f"{name}: cross term {float(cross.mean()):.3g}, SE {se:.2g}"


class OptimalEps(nn.Module):
    """The exact-optimal DDPM eps network for a mixture: E[z | x_i] = -std_i score*(x_i), from the step index."""

    def __init__(self, sde, mix):
        super().__init__()
        self.sde, self.score = sde, mix.score_fn(sde)

    def forward(self, x: Tensor, step: Tensor) -> Tensor:
        t = (step + 1) / self.sde.schedule.num_steps  # sde.conditioning for DDPM is t N - 1
        return -bcast(self.sde.alpha_std(t)[1], x) * self.score(x, t)


def test_std2_loss_of_the_optimal_eps_network_is_hos_simple_loss():
    sde = get_sde("ddpm")
    mix = three_blobs()
    x0 = mix.sample(512, generator=torch.Generator().manual_seed(5)).double()
    eps_net = OptimalEps(sde, mix)
    model = ScoreModel(eps_net, sde, "eps")
    # Same seed, same draws: the eps path through ScoreModel and the plain exact score agree.
    ddpm = dsm_loss(model, sde, x0, generator=torch.Generator().manual_seed(6))
    dsm = dsm_loss(mix.score_fn(sde), sde, x0, weighting="std2", generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(ddpm.t, dsm.t)
    torch.testing.assert_close(ddpm.per_sample, dsm.per_sample, rtol=1e-9, atol=1e-12)
    # And both are Ho et al.'s mean_dims (z - eps_theta(x_i, i))^2, written from the chain's alpha-bar.
    gen = torch.Generator().manual_seed(6)
    t = sample_times(sde, len(x0), generator=gen, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    step = torch.round(t * sde.schedule.num_steps).long() - 1
    abar = sde.schedule.alphas_cumprod[step][:, None]
    x_i = abar.sqrt() * x0 + (1 - abar).sqrt() * z
    manual = (z - eps_net(x_i, step.double())).pow(2).mean(1)
    torch.testing.assert_close(ddpm.per_sample, manual, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Times, seeds, validation


@pytest.mark.parametrize("sde_name", ["ddpm", "ncsn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_discrete_times_are_the_chains_own(sde_name, dtype):
    sde = get_sde(sde_name)
    chain = sde.discrete_times().to(dtype)
    x0 = torch.zeros(3000, 2, dtype=dtype)
    out = dsm_loss(lambda x, t: -x, sde, x0, generator=torch.Generator().manual_seed(0))
    assert out.t.dtype == dtype
    assert bool(torch.isin(out.t, chain).all())
    if sde_name == "ncsn":  # 3000 draws over 10 levels reach every one
        assert set(out.t.tolist()) == set(chain.tolist())


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve", "vp_cosine"])
def test_continuous_times_lie_in_eps_T(sde_name):
    sde = get_sde(sde_name)
    out = dsm_loss(lambda x, t: -x, sde, torch.zeros(5000, 2), generator=torch.Generator().manual_seed(0))
    assert float(out.t.min()) >= sde.eps and float(out.t.max()) <= sde.T
    assert float(out.t.min()) < sde.eps + 0.01 and float(out.t.max()) > sde.T - 0.01  # and fill it


@pytest.mark.parametrize("sde_name", ["vp", "ncsn"])
def test_same_seed_same_loss(sde_name):
    sde = get_sde(sde_name)
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    a = dsm_loss(gaussian_score(sde), sde, x0, generator=torch.Generator().manual_seed(9))
    b = dsm_loss(gaussian_score(sde), sde, x0, generator=torch.Generator().manual_seed(9))
    c = dsm_loss(gaussian_score(sde), sde, x0, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a.per_sample, b.per_sample) and torch.equal(a.t, b.t)
    assert not torch.equal(a.per_sample, c.per_sample)


def test_loss_trains_a_network_and_rejects_bad_options():
    sde = get_sde("vp")
    net = nn.Linear(2, 2)
    model = ScoreModel(lambda x, c: net(x), sde, "eps")
    x0 = torch.randn(16, 2)
    dsm_loss(model, sde, x0).loss.backward()
    assert net.weight.grad is not None and bool(net.weight.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="valid: std2, g2"):
        dsm_loss(model, sde, x0, weighting="likelihood")
    with pytest.raises(ValueError, match="valid: mean, sum"):
        dsm_loss(model, sde, x0, reduction="none")
    with pytest.raises(ValueError, match="noise must be shaped like x0"):
        dsm_loss(model, sde, x0, noise=torch.zeros(16, 3))


# ---------------------------------------------------------------------------------------------
# loss_per_bin


def test_loss_per_bin_continuous_matches_manual_grouping():
    sde = get_sde("vp")
    gen = torch.Generator().manual_seed(2)
    t = sample_times(sde, 500, generator=gen)
    per_sample = torch.rand(500, generator=gen)
    got = loss_per_bin(t, per_sample, sde, bins=10)
    manual: dict[str, list[float]] = {}
    for ti, li in zip(t.tolist(), per_sample.tolist()):
        b = min(int(ti * 10), 9)
        manual.setdefault(f"loss_t{round(b / 10, 4)}-{round((b + 1) / 10, 4)}", []).append(li)
    assert set(got) == set(manual) and "loss_t0.0-0.1" in got and "loss_t0.9-1.0" in got
    for k, v in manual.items():
        assert got[k] == pytest.approx(sum(v) / len(v), rel=1e-6)


@pytest.mark.parametrize("sde_name,bins,width", [("ddpm", 10, 100), ("ncsn", 10, 1), ("ncsn", 50, 1), ("ncsn", 5, 2)])
def test_loss_per_bin_discrete_groups_level_indices(sde_name, bins, width):
    sde = get_sde(sde_name)
    gen = torch.Generator().manual_seed(3)
    t = sample_times(sde, 2000, generator=gen)  # float32, as in training
    per_sample = torch.rand(2000, generator=gen)
    got = loss_per_bin(t, per_sample, sde, bins=bins)
    n = len(sde.discrete_times())
    manual: dict[str, list[float]] = {}
    for ti, li in zip(t.tolist(), per_sample.tolist()):
        level = round(ti * n) - 1  # t_i = (i + 1) / n
        lo = level // width * width
        manual.setdefault(f"loss_i{lo}-{lo + width - 1}", []).append(li)
    assert set(got) == set(manual)
    for k, v in manual.items():
        assert got[k] == pytest.approx(sum(v) / len(v), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# EMA


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def set_state(model: nn.Module, k: int) -> None:
    """Give every parameter and float buffer the known value sequence v_k = sin(k + j) + k / 10 (j: its index)."""
    with torch.no_grad():
        for j, p in enumerate(list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]):
            p.fill_(math.sin(k + j) + k / 10)
        model[1].num_batches_tracked.fill_(k)


def hand_ema(k_max: int, decay: float, warmup: bool) -> list[float]:
    """The recursion by hand for each of the 6 tensors (4 parameters, BatchNorm's 2 float buffers)."""
    values = {}
    for j in range(6):
        e = math.sin(0 + j)  # weights at construction: v_0
        for k in range(1, k_max + 1):
            n = k - 1  # updates made before this one
            d = min(decay, (1 + n) / (10 + n)) if warmup else decay
            e = d * e + (1 - d) * (math.sin(k + j) + k / 10)
        values[j] = e
    return values


def ema_values(ema: EMA) -> dict[int, float]:
    m = ema.module
    tensors = list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]
    assert all(bool((t == t.flatten()[0]).all()) for t in tensors)
    return {j: float(t.flatten()[0]) for j, t in enumerate(tensors)}


@pytest.mark.parametrize("decay,warmup", [(0.5, True), (0.95, True), (0.8, False), (0.999, False)])
def test_ema_follows_the_hand_recursion(decay, warmup):
    model = tiny_model()
    set_state(model, 0)
    ema = EMA(model, decay=decay, warmup=warmup)
    assert ema.num_updates == 0
    for k in range(1, 16):  # with decay 0.5 the warm-up hands over to the constant decay at n = 8
        set_state(model, k)
        ema.update(model)
    assert ema.num_updates == 15
    expected = hand_ema(15, decay, warmup)
    got = ema_values(ema)
    for j in expected:
        assert got[j] == pytest.approx(expected[j], abs=1e-6), j
    assert int(ema.module[1].num_batches_tracked) == 15  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert float(next(model.parameters()).detach().flatten()[0]) == pytest.approx(math.sin(15) + 1.5)  # model untouched


def test_ema_state_round_trip_resumes_the_same_sequence():
    model = tiny_model()
    set_state(model, 0)
    ema = EMA(model, decay=0.5)
    for k in range(1, 8):
        set_state(model, k)
        ema.update(model)
    other = tiny_model()  # different weights and a fresh count, all to be overwritten by the state
    resumed = EMA(other, decay=0.5)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.num_updates == 7
    for k in range(8, 16):
        set_state(model, k)
        ema.update(model)
        resumed.update(model)
    expected = hand_ema(15, 0.5, True)
    for got in (ema_values(ema), ema_values(resumed)):
        for j in expected:
            assert got[j] == pytest.approx(expected[j], abs=1e-6)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)
