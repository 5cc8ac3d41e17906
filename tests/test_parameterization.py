"""ScoreModel against exact answers: for Gaussian data every optimal network output is known in closed form.

Data x_0 ~ N(m, s0^2 I) in D = 3; x_t = alpha x_0 + std z. Then x_t ~ N(alpha m, v I) with
v = alpha^2 s0^2 + std^2, and (x_0, z, x_t) are jointly Gaussian, so
    score(x_t)     = -(x_t - alpha m) / v
    E[z | x_t]     = Cov(z, x_t) / v (x_t - alpha m) = std (x_t - alpha m) / v
    E[x_0 | x_t]   = m + alpha s0^2 (x_t - alpha m) / v
Each test network below outputs the optimal target of its kind, computed from these formulas and
from nothing but its own inputs (x_in, noise_cond): it recovers t (or sigma_hat) by inverting the
conditioning, so a wrong conditioning shows up as a wrong score.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from scorelab.parameterization import KINDS, ScoreModel
from scorelab.sde import get_sde

D = 3
M = torch.tensor([0.7, -1.2, 0.3], dtype=torch.float64)
S0 = 0.6
SDES = ["vp", "subvp", "ve", "ddpm", "ncsn"]


def t_from_conditioning(sde, cond: Tensor) -> Tensor:
    """Invert sde.conditioning: VP-type nets see 999 t (DDPM: the step index t N - 1); VE nets see log std."""
    if sde.name == "ddpm":
        return (cond + 1) / sde.schedule.num_steps
    if sde.family in ("vp", "subvp"):
        return cond / 999.0
    return sde.schedule.inverse_variance(torch.exp(2 * cond))


def exact(sde, x: Tensor, t: Tensor):
    """(score, E[z | x], E[x_0 | x]) of the perturbed Gaussian at per-sample times t."""
    alpha, std = (a[:, None] for a in sde.alpha_std(t))
    v = alpha**2 * S0**2 + std**2
    r = x - alpha * M
    return -r / v, std * r / v, M + alpha * S0**2 * r / v


class OptimalEps(nn.Module):
    def __init__(self, sde):
        super().__init__()
        self.sde = sde

    def forward(self, x, cond):
        return exact(self.sde, x, t_from_conditioning(self.sde, cond))[1]


class OptimalScore(nn.Module):
    def __init__(self, sde, scale_by_sigma: bool):
        super().__init__()
        self.sde, self.scale_by_sigma = sde, scale_by_sigma

    def forward(self, x, cond):
        t = t_from_conditioning(self.sde, cond)
        score = exact(self.sde, x, t)[0]
        return self.sde.alpha_std(t)[1][:, None] * score if self.scale_by_sigma else score


class OptimalEDM(nn.Module):
    """F* = (D* - c_skip x_hat) / c_out, in x_hat = x_0 + sigma_hat z coordinates, where the SDE no longer
    matters: x_hat ~ N(m, (s0^2 + sigma_hat^2) I) and D* = E[x_0 | x_hat] = m + s0^2/(s0^2 + sigma_hat^2) (x_hat - m)."""

    def __init__(self, sigma_data: float):
        super().__init__()
        self.sd = sigma_data

    def forward(self, x_in, c_noise):
        sigma = torch.exp(4 * c_noise)[:, None]  # c_noise = ln(sigma_hat) / 4
        norm = torch.sqrt(sigma**2 + self.sd**2)
        x_hat = x_in * norm  # x_in = c_in x_hat, c_in = 1 / norm
        d_star = M + S0**2 / (S0**2 + sigma**2) * (x_hat - M)
        c_skip, c_out = self.sd**2 / norm**2, sigma * self.sd / norm
        return (d_star - c_skip * x_hat) / c_out


def make_model(kind: str, sde, scale_by_sigma: bool = False, sigma_data: float = 0.5) -> ScoreModel:
    if kind == "eps":
        return ScoreModel(OptimalEps(sde), sde, "eps")
    if kind == "score":
        return ScoreModel(OptimalScore(sde, scale_by_sigma), sde, "score", scale_by_sigma=scale_by_sigma)
    return ScoreModel(OptimalEDM(sigma_data), sde, "edm", sigma_data=sigma_data)


def times(sde) -> Tensor:
    """Both ends, points in between, and for the chains their own t_i: one per sample of a batch."""
    ts = [sde.eps, 0.03, 0.25, 0.5, 0.8, sde.T]
    chain = sde.discrete_times()
    if chain is not None:
        ts += chain[[0, 1, len(chain) // 2, -1]].tolist()
    return torch.tensor(ts, dtype=torch.float64)


VARIANTS = [("eps", False, 0.5), ("score", False, 0.5), ("score", True, 0.5), ("edm", False, 0.5), ("edm", False, 1.3)]


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("kind,scale_by_sigma,sigma_data", VARIANTS)
def test_optimal_network_gives_exact_score_and_posterior_mean(sde_name, kind, scale_by_sigma, sigma_data):
    sde = get_sde(sde_name)
    t = times(sde)
    g = torch.Generator().manual_seed(0)
    alpha, std = sde.alpha_std(t)
    # Points from the perturbed marginal itself, so the check covers where the score is used.
    x = alpha[:, None] * (M + S0 * torch.randn(len(t), D, generator=g, dtype=torch.float64))
    x = x + std[:, None] * torch.randn(len(t), D, generator=g, dtype=torch.float64)
    model = make_model(kind, sde, scale_by_sigma, sigma_data)
    score_ref, _, mean_ref = exact(sde, x, t)
    torch.testing.assert_close(model(x, t), score_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.denoise(x, t), mean_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_scalar_time_and_image_shaped_input(kind):
    """A scalar t broadcasts over the batch; (B, C, H, W) inputs broadcast the per-sample coefficients."""
    sde = get_sde("vp")
    net = lambda x, c: 0.5 * x + c.reshape(-1, 1, 1, 1) * 1e-3  # noqa: E731  any fixed map will do
    model = ScoreModel(net, sde, kind)
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    out_scalar = model(x, 0.3)
    out_batch = model(x, torch.full((4,), 0.3))
    assert out_scalar.shape == x.shape
    torch.testing.assert_close(out_scalar, out_batch)
    # Per-sample times must act per sample: sample i of a mixed batch equals a batch of its own.
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    mixed = model(x, t)
    for i in range(4):
        torch.testing.assert_close(mixed[i : i + 1], model(x[i : i + 1], t[i : i + 1]))


def test_bad_options_are_refused():
    sde = get_sde("ve")
    net = lambda x, c: x  # noqa: E731
    with pytest.raises(ValueError, match="valid: eps, score, edm"):
        ScoreModel(net, sde, "v")
    with pytest.raises(ValueError, match="scale_by_sigma"):
        ScoreModel(net, sde, "eps", scale_by_sigma=True)
    with pytest.raises(ValueError, match="sigma_data"):
        ScoreModel(net, sde, "edm", sigma_data=0.0)


def test_edm_coefficients_match_table_1_at_a_known_point():
    """At sigma_hat = sigma_data the EDM coefficients are c_skip = 1/2, c_out = sd/sqrt2, c_in = 1/(sd sqrt2):
    a net that returns its input records what it was given."""
    sde = get_sde("ve")
    sd = 0.5
    t = sde.schedule.inverse_variance(torch.tensor([sd**2], dtype=torch.float64))  # std = sd, alpha = 1
    seen = {}

    def net(x_in, c_noise):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return torch.zeros_like(x_in)

    x = torch.tensor([[1.0, -2.0, 4.0]], dtype=torch.float64)
    model = ScoreModel(net, sde, "edm", sigma_data=sd)
    denoised = model.denoise(x, t)
    torch.testing.assert_close(seen["x_in"], x / (sd * math.sqrt(2)))
    torch.testing.assert_close(seen["c_noise"], torch.tensor([math.log(sd) / 4], dtype=torch.float64))
    torch.testing.assert_close(denoised, 0.5 * x)  # c_skip x with a zero network
    torch.testing.assert_close(model(x, t), (0.5 * x - x) / sd**2)  # Tweedie with alpha = 1
