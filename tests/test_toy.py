"""The Gaussian-mixture references against independent computations."""

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from scorelab.sde import get_sde
from scorelab.toy import GaussianMixture, three_blobs

SDE_NAMES = ["vp", "vp_cosine", "subvp", "ve", "ddpm", "ncsn"]


def full_cov_mixture() -> GaussianMixture:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, 3, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) * 0.2 + 0.05 * torch.eye(3, dtype=torch.float64)
    return GaussianMixture([0.2, 0.5, 0.3], torch.randn(3, 3, generator=g, dtype=torch.float64) * 2, covs=covs)


def torch_mixture(gm: GaussianMixture, alpha: float, var_noise: float) -> MixtureSameFamily:
    """The perturbed marginal built with torch.distributions, independently of scorelab.toy."""
    d = gm.dim
    cov = alpha**2 * gm.covs + var_noise * torch.eye(d, dtype=torch.float64)
    return MixtureSameFamily(Categorical(gm.weights), MultivariateNormal(alpha * gm.means, covariance_matrix=cov))


@pytest.mark.parametrize("make", [three_blobs, full_cov_mixture], ids=["isotropic", "full"])
@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("t", [0.02, 0.3, 0.8])
def test_log_prob_and_score_of_the_perturbed_marginal(make, sde_name, t):
    gm, sde = make(), get_sde(sde_name)
    x = gm.sample(64, generator=torch.Generator().manual_seed(1)).double() * 1.3
    tt = torch.full((64,), t, dtype=torch.float64)
    alpha, std = (float(v) for v in sde.alpha_std(torch.tensor(t, dtype=torch.float64)))
    reference = torch_mixture(gm, alpha, std**2)

    assert torch.allclose(gm.log_prob(x, sde, tt), reference.log_prob(x), rtol=1e-10, atol=1e-10)

    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reference.log_prob(x_req).sum(), x_req)
    assert torch.allclose(gm.score(x, sde, tt), grad, rtol=1e-8, atol=1e-8)
    assert torch.allclose(gm.score_fn(sde)(x, tt), grad, rtol=1e-8, atol=1e-8)


def test_unperturbed_log_prob_is_the_data_density():
    gm = full_cov_mixture()
    x = gm.sample(50, generator=torch.Generator().manual_seed(2)).double()
    assert torch.allclose(gm.log_prob(x), torch_mixture(gm, 1.0, 0.0).log_prob(x), rtol=1e-10)


def test_sampling_matches_weights_means_and_covariance():
    gm = full_cov_mixture()
    n = 200_000
    x, labels = gm.sample(n, generator=torch.Generator().manual_seed(3), return_labels=True)
    freq = torch.bincount(labels, minlength=3).double() / n
    se = torch.sqrt(gm.weights * (1 - gm.weights) / n)
    assert ((freq - gm.weights).abs() < 5 * se).all()
    assert torch.allclose(x.double().mean(0), gm.mean, atol=5 * gm.covariance.diag().max().sqrt().item() / math.sqrt(n))
    assert torch.allclose(torch.cov(x.double().T), gm.covariance, atol=0.05)


def test_sampling_is_seeded():
    gm = three_blobs()
    a = gm.sample(10, generator=torch.Generator().manual_seed(4))
    b = gm.sample(10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"weights": [1.0], "means": [[0.0, 0.0]]}, "exactly one of stds"),
        ({"weights": [1.0, 1.0], "means": [[0.0, 0.0]], "stds": [1.0]}, "weights must be"),
        ({"weights": [-1.0, 2.0], "means": [[0.0], [1.0]], "stds": [1.0, 1.0]}, "non-negative"),
        ({"weights": [1.0], "means": [[0.0, 0.0]], "stds": [0.0]}, "positive"),
    ],
)
def test_bad_mixtures_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixture(**kwargs)
