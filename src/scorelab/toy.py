"""Gaussian mixtures: data with exact densities, and exact scores of their perturbed marginals.

Under any SDE of scorelab (x_t = alpha x_0 + std z) a mixture stays a mixture:

    p_t(x) = sum_k w_k N(x; alpha mu_k, alpha^2 Sigma_k + std^2 I)

so the score and log-density at every t are known in closed form. The test-suite checks samplers,
losses and the likelihood against these.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sde import SDE, ScoreFn, batch_times


class GaussianMixture:
    """sum_k w_k N(mu_k, Sigma_k) in D dimensions.

    weights: (K,), normalised here.  means: (K, D).  Exactly one of
    stds: (K,) isotropic standard deviations, or covs: (K, D, D) full covariances.
    Computation is in float64; results are cast to the input's dtype.
    """

    def __init__(self, weights, means, stds=None, covs=None):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2 or self.weights.shape != (self.means.shape[0],):
            raise ValueError("GaussianMixture: weights must be (K,) and means (K, D)")
        if (self.weights < 0).any() or self.weights.sum() <= 0:
            raise ValueError("GaussianMixture: weights must be non-negative with a positive sum")
        self.weights = self.weights / self.weights.sum()
        K, D = self.means.shape
        if (stds is None) == (covs is None):
            raise ValueError("GaussianMixture: give exactly one of stds (K,) or covs (K, D, D)")
        if stds is not None:
            stds = torch.as_tensor(stds, dtype=torch.float64)
            if stds.shape != (K,) or (stds <= 0).any():
                raise ValueError("GaussianMixture: stds must be (K,) and positive")
            self.covs = stds[:, None, None] ** 2 * torch.eye(D, dtype=torch.float64)
            self.stds = stds
        else:
            self.covs = torch.as_tensor(covs, dtype=torch.float64)
            if self.covs.shape != (K, D, D):
                raise ValueError("GaussianMixture: covs must be (K, D, D)")
            torch.linalg.cholesky(self.covs)  # raises unless every covariance is positive definite
            self.stds = None

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> Tensor:
        return self.weights @ self.means

    @property
    def covariance(self) -> Tensor:
        """The mixture's overall covariance: sum_k w_k (Sigma_k + mu_k mu_k^T) - mu mu^T."""
        m = self.mean
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return second - torch.outer(m, m)

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)
        x = (self.means[comp] + torch.einsum("nij,nj->ni", chol[comp], z)).float()
        return (x, comp) if return_labels else x

    # -- the perturbed marginal ------------------------------------------------------------------
    def _component_logpdf(self, x: Tensor, alpha: Tensor, var_noise: Tensor) -> tuple[Tensor, Tensor]:
        """log N(x; alpha mu_k, alpha^2 Sigma_k + var_noise I) and its gradient in x, per component.

        x: (B, D) float64; alpha, var_noise: (B,). Returns (B, K) and (B, K, D).
        """
        D = self.dim
        diff = x[:, None, :] - alpha[:, None, None] * self.means[None]  # (B, K, D)
        if self.stds is not None:
            v = alpha[:, None] ** 2 * self.stds[None] ** 2 + var_noise[:, None]  # (B, K)
            logpdf = -0.5 * (diff**2).sum(-1) / v - 0.5 * D * torch.log(2 * math.pi * v)
            return logpdf, -diff / v[..., None]
        eye = torch.eye(D, dtype=x.dtype)
        cov = alpha[:, None, None, None] ** 2 * self.covs[None] + var_noise[:, None, None, None] * eye
        chol = torch.linalg.cholesky(cov)  # (B, K, D, D)
        sol = torch.cholesky_solve(diff[..., None], chol)[..., 0]  # cov^{-1} diff
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        logpdf = -0.5 * (diff * sol).sum(-1) - 0.5 * logdet - 0.5 * D * math.log(2 * math.pi)
        return logpdf, -sol

    def _marginal(self, x: Tensor, sde: SDE | None, t) -> tuple[Tensor, Tensor]:
        x64 = x.reshape(x.shape[0], -1).double()
        if sde is None:
            alpha = torch.ones(x.shape[0], dtype=torch.float64)
            var_noise = torch.zeros(x.shape[0], dtype=torch.float64)
        else:
            alpha, std = sde.alpha_std(batch_times(t, x64).cpu())
            var_noise = std**2
        x64c = x64.cpu()
        logpdf, grad = self._component_logpdf(x64c, alpha, var_noise)
        log_joint = logpdf + torch.log(self.weights)[None]
        log_p = torch.logsumexp(log_joint, dim=1)
        resp = torch.softmax(log_joint, dim=1)
        score = (resp[..., None] * grad).sum(1)
        return log_p, score

    def log_prob(self, x: Tensor, sde: SDE | None = None, t=None) -> Tensor:
        """Exact log-density of the data (sde None) or of the perturbed marginal p_t under sde."""
        return self._marginal(x, sde, t)[0].to(device=x.device, dtype=x.dtype)

    def score(self, x: Tensor, sde: SDE | None = None, t=None) -> Tensor:
        """Exact grad_x log p_t(x)."""
        return self._marginal(x, sde, t)[1].reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def score_fn(self, sde: SDE) -> ScoreFn:
        """score(x, t) of the perturbed marginal under sde: the reference every sampler is tested with."""
        return lambda x, t: self.score(x, sde, t)

    def component_posterior(self, x: Tensor) -> Tensor:
        """p(k | x) under the data distribution, (N, K): used to assign samples to components."""
        logpdf, _ = self._component_logpdf(
            x.reshape(x.shape[0], -1).double().cpu(),
            torch.ones(x.shape[0], dtype=torch.float64),
            torch.zeros(x.shape[0], dtype=torch.float64),
        )
        return torch.softmax(logpdf + torch.log(self.weights)[None], dim=1)


def three_blobs() -> GaussianMixture:
    """The reference 2-D mixture of the tests and the demo: 3 well-separated, unequal-weight components."""
    return GaussianMixture(
        weights=[0.5, 0.3, 0.2],
        means=[[-2.0, 0.0], [2.0, 1.5], [1.0, -2.5]],
        stds=[0.35, 0.5, 0.25],
    )
