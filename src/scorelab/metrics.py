"""Sample-quality metrics: Frechet distance of Gaussian statistics, sliced Wasserstein, and MMD.

Everything is computed in float64 on the CPU-or-GPU tensors given (numpy arrays are accepted too)
and returned as a Python float.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _f64(a: ArrayLike | float, device: torch.device | None = None) -> Tensor:
    t = a.detach() if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a))
    return t.to(device=device if device is not None else t.device, dtype=torch.float64)


def _sym_sqrt(s: Tensor) -> Tensor:
    """The PSD square root of a symmetric matrix; rounding's tiny negative eigenvalues are clamped to 0."""
    w, v = torch.linalg.eigh(0.5 * (s + s.T))
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), as in FID:

        |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2): that
    matrix is similar to S1 S2 but symmetric PSD, so no general (and for singular covariances
    unstable) matrix square root is needed.
    """
    mu1, mu2 = _f64(mu1).reshape(-1), _f64(mu2).reshape(-1)
    s1, s2 = _f64(sigma1, mu1.device), _f64(sigma2, mu1.device)
    s1, s2 = s1.reshape(mu1.numel(), mu1.numel()), s2.reshape(mu2.numel(), mu2.numel())
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: means have different dimensions {mu1.numel()} and {mu2.numel()}")
    r1 = _sym_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp(min=0).sqrt().sum()
    fd = (mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return max(float(fd), 0.0)  # a distance: rounding must not make it negative


def gaussian_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of (N, D) features in float64, the covariance unbiased (N - 1), as
    pytorch_fid's statistics files hold them."""
    f = _f64(features)
    f = f.reshape(f.shape[0], -1)
    if f.shape[0] < 2:
        raise ValueError(f"gaussian_stats needs at least 2 samples, got {f.shape[0]}")
    mu = f.mean(0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def _wasserstein_1d_pow(xs: Tensor, ys: Tensor, p: float) -> Tensor:
    """W_p^p between the empirical distributions of the columns of sorted xs (N, P) and ys (M, P).

    Both quantile functions are step functions; between consecutive breakpoints of the merged grid
    {i/N} U {j/M} each is constant, so the integral of |F^-1 - G^-1|^p is an exact finite sum.
    """
    n, m = xs.shape[0], ys.shape[0]
    if n == m:
        return (xs - ys).abs().pow(p).mean(0)
    dev = xs.device
    # Sorted, ending at 1; equal rationals i/N = j/M round to the same float, so unique merges them.
    q = torch.unique(torch.cat([torch.arange(1, k + 1, dtype=torch.float64, device=dev) / k for k in (n, m)]))
    widths = torch.diff(q, prepend=q.new_zeros(1))
    mid = q - widths / 2  # strictly inside each interval: no rounding at the breakpoints
    ix = (mid * n).floor().long().clamp(max=n - 1)
    iy = (mid * m).floor().long().clamp(max=m - 1)
    return ((xs[ix] - ys[iy]).abs().pow(p) * widths[:, None]).sum(0)


def sliced_wasserstein(x: ArrayLike, y: ArrayLike, n_projections: int = 256, seed: int = 0, p: float = 2) -> float:
    """Sliced p-Wasserstein distance (E_theta W_p^p(theta^T x, theta^T y))^(1/p) between the empirical
    distributions of x (N, ...) and y (M, ...), theta uniform on the unit sphere.

    Each 1-D W_p is exact (sorted quantile functions, unequal N and M included); the expectation over
    directions is a Monte-Carlo average over n_projections seeded directions, the same for every call
    with the same seed and dimension.
    """
    x, y = _f64(x), _f64(y)
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1).to(x.device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sliced_wasserstein: dimensions differ, {x.shape[1]} and {y.shape[1]}")
    if p < 1:
        raise ValueError(f"sliced_wasserstein needs p >= 1, got {p}")
    gen = torch.Generator().manual_seed(seed)  # directions drawn on the CPU: identical on every device
    theta = torch.randn(x.shape[1], n_projections, generator=gen, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    xs, ys = (x @ theta).sort(0).values, (y @ theta).sort(0).values
    return float(_wasserstein_1d_pow(xs, ys, p).mean() ** (1 / p))


def _median(v: Tensor) -> float:
    """The usual median (the mean of the two middle values for an even count; torch.median takes the
    lower one, and torch.quantile refuses more than 2^24 values)."""
    k = v.numel()
    lo = v.kthvalue((k + 1) // 2).values
    hi = v.kthvalue(k // 2 + 1).values
    return float(lo + hi) / 2


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    return (a.square().sum(1)[:, None] + b.square().sum(1)[None] - 2 * a @ b.T).clamp(min=0)


def mmd_rbf(x: ArrayLike, y: ArrayLike, bandwidths: Sequence[float] | None = None) -> float:
    """Unbiased estimate of MMD^2 between the distributions of x (N, ...) and y (M, ...), N, M >= 2,
    with the kernel k(a, b) = sum_s exp(-|a - b|^2 / (2 s^2)) over the bandwidths s.

    Default bandwidths: the median pairwise distance of the pooled sample times (0.5, 1, 2) (the median
    heuristic, widened so that one scale being off does not blind the test). The unbiased estimate
    drops the diagonal terms k(x_i, x_i) and can be slightly negative when the distributions agree.
    Memory is O((N + M)^2).
    """
    x, y = _f64(x), _f64(y)
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1).to(x.device)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd_rbf needs at least 2 samples on each side, got {n} and {m}")
    dxx, dyy, dxy = _sq_dists(x, x), _sq_dists(y, y), _sq_dists(x, y)
    if bandwidths is None:
        pooled = torch.cat([x, y])
        d = _sq_dists(pooled, pooled)
        iu = torch.triu_indices(n + m, n + m, offset=1, device=x.device)
        med = _median(d[iu[0], iu[1]].sqrt())
        bandwidths = [med * c for c in (0.5, 1.0, 2.0)]
    if len(bandwidths) == 0 or min(bandwidths) <= 0:
        raise ValueError(f"mmd_rbf needs positive bandwidths, got {list(bandwidths)}")

    def kernel(d2: Tensor) -> Tensor:
        return sum(torch.exp(-d2 / (2 * s * s)) for s in bandwidths)

    def within(d2: Tensor) -> Tensor:  # mean over pairs i != j
        k = kernel(d2)
        return (k.sum() - k.diagonal().sum()) / (k.shape[0] * (k.shape[0] - 1))

    return float(within(dxx) + within(dyy) - 2 * kernel(dxy).mean())
