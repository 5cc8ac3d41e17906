"""Sample-quality metrics: Frechet distance of Gaussian statistics, sliced Wasserstein, and MMD, and the
intervals and paired comparisons of them (bootstrap over samples, Student t over seeds, Holm's correction).

Everything is computed in float64 on the CPU-or-GPU tensors given (numpy arrays are accepted too)
and returned as a Python float. Gaussian statistics of features accumulate batch by batch (RunningStats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


class RunningStats:
    """Mean and covariance of feature rows fed batch by batch, in float64 on the first batch's device, so
    that 50k feature rows never need to be held at once:

        rs = RunningStats(keep=10_000)     # also keep the first 10,000 rows (for KID, precision/recall)
        for f in batches:                  # (B, D) tensors or arrays
            rs.update(f)
        mu, sigma = rs.stats()             # as gaussian_stats: numpy float64, covariance over N - 1

    Batches merge by Chan et al.'s pairwise update of the mean and the centred scatter sum (f - mu)(f - mu)^T,
    not by raw sums of squares, which cancel catastrophically when the mean is large against the spread.
    A single batch gives gaussian_stats' numbers bit for bit (gaussian_stats is this class)."""

    def __init__(self, keep: int = 0):
        self.n = 0
        self.keep = keep  # leading rows to keep (in float64), for the metrics that need rows
        self._mean: Tensor | None = None
        self._scatter: Tensor | None = None
        self._rows: list[Tensor] = []
        self._kept = 0

    def update(self, features: ArrayLike) -> RunningStats:
        f = _f64(features, None if self._mean is None else self._mean.device)
        b = f.shape[0]
        if b == 0:  # (an empty batch has no shape to reshape to)
            return self
        f = f.reshape(b, -1)
        if self._mean is not None and f.shape[1] != self._mean.numel():
            raise ValueError(f"RunningStats: features of dimension {f.shape[1]} after {self._mean.numel()}")
        if self._kept < self.keep:
            self._rows.append(f[:self.keep - self._kept])
            self._kept += self._rows[-1].shape[0]
        mean = f.mean(0)
        centred = f - mean
        scatter = centred.T @ centred
        if self._mean is None:  # the first batch as it is: one batch is exactly gaussian_stats' formula
            self._mean, self._scatter = mean, scatter
        else:
            total = self.n + b
            delta = mean - self._mean
            self._mean = self._mean + delta * (b / total)
            self._scatter = self._scatter + scatter + torch.outer(delta, delta) * (self.n * b / total)
        self.n += b
        return self

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean (D,), covariance (D, D)), the covariance unbiased (N - 1), as numpy float64 arrays."""
        if self.n < 2:
            raise ValueError(f"gaussian statistics need at least 2 samples, got {self.n}")
        return self._mean.cpu().numpy(), (self._scatter / (self.n - 1)).cpu().numpy()

    @property
    def rows(self) -> Tensor:
        """The first min(N, keep) rows fed, in float64 on the statistics' device."""
        if not self._rows:
            return torch.empty(0, 0 if self._mean is None else self._mean.numel(), dtype=torch.float64)
        return torch.cat(self._rows)


def gaussian_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of (N, D) features in float64, the covariance unbiased (N - 1), as
    pytorch_fid's statistics files hold them. ValueError for fewer than 2 rows."""
    return RunningStats().update(features).stats()


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


# ---------------------------------------------------------------------------------------------
# Kernel Inception Distance, k-NN precision/recall, and a guard for loaded samples.

_CDIST_ELEMENTS = 1 << 22  # distances per chunk of a k-NN search: 32 MiB in float64


def _pair(x: ArrayLike, y: ArrayLike, who: str) -> tuple[Tensor, Tensor]:
    """Two (N, D) float64 feature sets on x's device; ValueError when D differs."""
    fx, fy = _f64(x), _f64(y)
    fx, fy = fx.reshape(fx.shape[0], -1), fy.reshape(fy.shape[0], -1)
    if fx.shape[1] != fy.shape[1]:
        raise ValueError(f"{who}: feature dimensions differ, {fx.shape[1]} and {fy.shape[1]}")
    return fx, fy.to(fx.device)


_KID_KERNEL_ELEMENTS = 1 << 24  # up to this many kernel entries (128 MiB), KID computes each pair's kernel once


def _poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    return (a @ b.T / a.shape[1] + 1) ** 3


def _poly_mmd2(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 of equal-size x, y (m, d) with k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018):
    the within-set means leave out the diagonal k(x_i, x_i); the cross term keeps every pair."""
    m = x.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * kxy.mean()


def kid(x_features: ArrayLike, y_features: ArrayLike, *, subset_size: int = 1000, subsets: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) over `subsets` random subsets of the unbiased MMD^2 with the
    cubic polynomial kernel, as torch-fidelity and the KID paper report it (std with ddof 0).

    Each subset draws subset_size rows without replacement from each set independently (subset_size
    is capped at the smaller set). Unbiased: the mean is about 0 for samples of one distribution, and
    may be slightly negative. The subsets are drawn on the CPU from `seed`: the same on every device.
    """
    x, y = _pair(x_features, y_features, "kid")
    n_x, n_y = x.shape[0], y.shape[0]
    m = min(subset_size, n_x, n_y)
    if m < 2:
        raise ValueError(f"kid needs subsets of at least 2 samples, got subset_size {subset_size} "
                         f"with {n_x} and {n_y} samples")
    if subsets < 1:
        raise ValueError(f"kid needs subsets >= 1, got {subsets}")
    gen = torch.Generator().manual_seed(seed)
    mmds = torch.empty(subsets, dtype=torch.float64)
    # Subsets of N from N samples (and from a reference not much larger) overlap heavily: each pair's kernel
    # is then computed once and every subset gathers its entries, the same numbers at a fraction of the cost.
    # A subset's kernel sums are then quadratic forms u^T K v of 0/1 indicator vectors.
    full = (n_x + n_y) ** 2 <= _KID_KERNEL_ELEMENTS
    draws = [(torch.randperm(n_x, generator=gen)[:m], torch.randperm(n_y, generator=gen)[:m]) for _ in range(subsets)]
    if not full:
        for s, (ix, iy) in enumerate(draws):
            mmds[s] = _poly_mmd2(x[ix.to(x.device)], y[iy.to(x.device)]).cpu()
        return float(mmds.mean()), float(mmds.std(correction=0))
    ux = torch.zeros(subsets, n_x, dtype=torch.float64)
    uy = torch.zeros(subsets, n_y, dtype=torch.float64)
    for s, (ix, iy) in enumerate(draws):
        ux[s, ix], uy[s, iy] = 1.0, 1.0
    ux, uy = ux.to(x.device), uy.to(x.device)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    within = (((ux @ kxx) * ux).sum(1) - ux @ kxx.diagonal() + ((uy @ kyy) * uy).sum(1) - uy @ kyy.diagonal())
    mmds = (within / (m * (m - 1)) - 2 * ((ux @ kxy) * uy).sum(1) / (m * m)).cpu()
    return float(mmds.mean()), float(mmds.std(correction=0))


def _chunk_rows(n_cols: int) -> int:
    """Rows of a distance matrix with n_cols columns that fit in _CDIST_ELEMENTS."""
    return max(1, _CDIST_ELEMENTS // max(1, n_cols))


def _knn_radii(f: Tensor, k: int) -> Tensor:
    """Distance of each row to its k-th nearest neighbour in f, itself excluded (it is the 0th)."""
    radii = torch.empty(f.shape[0], dtype=f.dtype, device=f.device)
    step = _chunk_rows(f.shape[0])
    for i in range(0, f.shape[0], step):
        radii[i:i + step] = torch.cdist(f[i:i + step], f).kthvalue(k + 1, dim=1).values
    return radii


def _coverage(queries: Tensor, centres: Tensor, radii: Tensor) -> float:
    """Fraction of queries inside at least one ball |q - centre_j| <= radius_j."""
    inside, step = 0, _chunk_rows(centres.shape[0])
    for i in range(0, queries.shape[0], step):
        d = torch.cdist(queries[i:i + step], centres)
        inside += int((d <= radii[None]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real_features: ArrayLike, fake_features: ArrayLike, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of (N, D) feature sets.

    Each set's manifold is the union of balls around its points, a ball's radius the distance to the
    point's k-th nearest neighbour in its own set. precision: the fraction of fake points inside the
    real manifold (are the samples realistic?); recall: the fraction of real points inside the fake
    manifold (is the data covered?). Distances are computed in chunks: memory O(N) beyond the features.
    """
    real, fake = _pair(real_features, fake_features, "precision_recall")
    if k < 1 or k >= min(real.shape[0], fake.shape[0]):
        raise ValueError(f"precision_recall needs 1 <= k < the size of each set, got k={k} "
                         f"with {real.shape[0]} real and {fake.shape[0]} fake samples")
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall


def check_samples(x: ArrayLike, *, shape: Sequence[int], value_range: tuple[float, float] | None = (-1, 1),
                  name: str = "samples") -> None:
    """Raise ValueError, with a one-line message naming `name`, unless x is a non-empty (N, *shape)
    floating tensor or array of finite values inside value_range (1e-3 slack for rounding; None skips
    the range check). Meant for samples loaded from disk before any metric sees them."""
    shape = tuple(int(s) for s in shape)
    if not isinstance(x, (Tensor, np.ndarray)):
        raise ValueError(f"{name}: expected a tensor or numpy array, found {type(x).__name__}")
    found = tuple(x.shape)
    if found[1:] != shape or len(found) != len(shape) + 1:
        raise ValueError(f"{name}: expected shape (N, {', '.join(map(str, shape))}), found {found}")
    if found[0] == 0:
        raise ValueError(f"{name}: expected at least one sample, found shape {found}")
    floating = x.is_floating_point() if isinstance(x, Tensor) else np.issubdtype(x.dtype, np.floating)
    if not floating:
        raise ValueError(f"{name}: expected a floating-point dtype, found {x.dtype}")
    t = _f64(x)
    bad = ~torch.isfinite(t)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: expected finite values, found {int(t.isnan().sum())} NaN and "
                         f"{int(t.isinf().sum())} infinite (first at index {first})")
    if value_range is not None:
        lo, hi = value_range
        t_min, t_max = float(t.min()), float(t.max())
        if t_min < lo - 1e-3 or t_max > hi + 1e-3:
            raise ValueError(f"{name}: expected values in [{lo}, {hi}], found min {t_min:.6g}, max {t_max:.6g}")


# ---------------------------------------------------------------------------------------------
# Intervals and pairwise comparisons.
#
# The evaluate stage resamples each seed's N samples with replacement, with indices drawn from the seed
# alone (bootstrap_indices), so every variant and setting of the same N and seeds sees the same resamples:
# replicate b of variant A and replicate b of variant B are paired, as sample i of a seed starts from the
# same noise in both. The report then differences replicates, never recomputing a feature.


def bootstrap_indices(n: int, replicates: int, seed: int | Sequence[int]) -> np.ndarray:
    """(replicates, n) int64 row indices drawn with replacement, from numpy's generator seeded by `seed`
    (an int or a sequence of ints, e.g. (params.seed, sample seed)): the same for every caller with the
    same n and seed."""
    if n < 1 or replicates < 1:
        raise ValueError(f"bootstrap_indices needs n >= 1 and replicates >= 1, got n={n}, replicates={replicates}")
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n), dtype=np.int64)


def frechet_replicates(features: ArrayLike, indices: np.ndarray, mu: ArrayLike, sigma: ArrayLike) -> np.ndarray:
    """Frechet distance of features[idx] to N(mu, sigma) for each row idx of `indices` (B, N): (B,) float64,
    each equal to frechet_distance(*gaussian_stats(features[idx]), mu, sigma) up to rounding.

    Batched: a resample is a weight vector of counts over the rows, so every replicate's mean and
    covariance come from two matrix products, and the reference's square root is taken once."""
    f = _f64(features)
    f = f.reshape(f.shape[0], -1)
    idx = torch.as_tensor(np.asarray(indices), device=f.device).long()
    b, n = idx.shape
    if n < 2:
        raise ValueError(f"frechet_replicates needs resamples of at least 2 rows, got {n}")
    ref_mu, ref_sigma = _f64(mu, f.device).reshape(-1), _f64(sigma, f.device)
    ref_sigma = ref_sigma.reshape(ref_mu.numel(), ref_mu.numel())
    r = _sym_sqrt(ref_sigma)
    out = []
    step = max(1, _CDIST_ELEMENTS // (f.shape[0] * f.shape[1]))  # replicates per batch: bounded memory
    for i in range(0, b, step):
        w = torch.zeros(len(idx[i:i + step]), f.shape[0], dtype=torch.float64, device=f.device)
        w.scatter_add_(1, idx[i:i + step], torch.ones_like(idx[i:i + step], dtype=torch.float64))
        w /= n
        mean = w @ f
        cov = ((w[:, :, None] * f).transpose(1, 2) @ f - mean[:, :, None] * mean[:, None, :]) * (n / (n - 1))
        m = r @ cov @ r
        tr_covmean = torch.linalg.eigvalsh(0.5 * (m + m.transpose(1, 2))).clamp(min=0).sqrt().sum(-1)
        out.append((mean - ref_mu).square().sum(-1) + cov.diagonal(dim1=1, dim2=2).sum(-1) + torch.trace(ref_sigma)
                   - 2 * tr_covmean)
    return torch.cat(out).clamp(min=0).cpu().numpy()


def sliced_wasserstein_replicates(x: ArrayLike, y: ArrayLike, indices: np.ndarray, n_projections: int = 256,
                                  seed: int = 0, p: float = 2) -> np.ndarray:
    """sliced_wasserstein(x[idx], y, n_projections, seed, p) for each row idx of `indices` (B, N): (B,)
    float64. The directions, and y's sorted projections, are computed once."""
    x, y = _f64(x), _f64(y)
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1).to(x.device)
    gen = torch.Generator().manual_seed(seed)  # as sliced_wasserstein: the same directions
    theta = torch.randn(x.shape[1], n_projections, generator=gen, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    xp, ys = x @ theta, (y @ theta).sort(0).values
    out = np.empty(len(indices), dtype=np.float64)
    for b, idx in enumerate(indices):
        xs = xp[torch.as_tensor(idx, device=x.device)].sort(0).values
        out[b] = float(_wasserstein_1d_pow(xs, ys, p).mean() ** (1 / p))
    return out


def _quantiles(v: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(v, [a, 1 - a])
    return float(lo), float(hi)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"the confidence level must lie strictly between 0 and 1, got {level}")


def bootstrap_interval(estimate: float, replicates: ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """The level-interval of `estimate` from bootstrap replicates of it: the replicates' central quantiles
    about their own mean, added to the estimate. Only the replicates' spread is used, not their centre:
    a resample holds duplicates, which biases distances such as the Frechet distance upwards."""
    _check_level(level)
    r = np.asarray(replicates, dtype=np.float64).reshape(-1)
    if r.size < 2 or not np.isfinite(r).all():
        return math.nan, math.nan
    lo, hi = _quantiles(r - r.mean(), level)
    return estimate + lo, estimate + hi


def t_interval(values: ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """Student-t level-interval of the mean of independent values (one per seed): mean -/+ t * s / sqrt(k);
    (nan, nan) for fewer than two values."""
    from scipy import stats

    _check_level(level)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size < 2 or not np.isfinite(v).all():
        return math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return float(v.mean()) - half, float(v.mean()) + half


@dataclass(frozen=True)
class Difference:
    """estimate_a - estimate_b with its bootstrap interval and two-sided p-value (of "no difference")."""

    estimate: float
    low: float
    high: float
    p_value: float


def paired_difference(estimate_a: float, replicates_a: ArrayLike, estimate_b: float, replicates_b: ArrayLike,
                      level: float = 0.95) -> Difference:
    """A - B from paired bootstrap replicates (replicate b of each from the same resample indices).

    The interval is bootstrap_interval of the replicates' differences; the p-value is the share of
    centred differences at least as far from 0 as the observed one, (1 + #) / (1 + B), so never 0."""
    ra = np.asarray(replicates_a, dtype=np.float64).reshape(-1)
    rb = np.asarray(replicates_b, dtype=np.float64).reshape(-1)
    if ra.shape != rb.shape:
        raise ValueError(f"paired_difference: {ra.size} and {rb.size} replicates; pairs need the same resamples")
    d = estimate_a - estimate_b
    lo, hi = bootstrap_interval(d, ra - rb, level)
    centred = (ra - rb) - (ra - rb).mean()
    p = float((1 + np.count_nonzero(np.abs(centred) >= abs(d))) / (1 + centred.size))
    return Difference(d, lo, hi, p)


def paired_t(values_a: Sequence[float], values_b: Sequence[float], level: float = 0.95) -> Difference:
    """mean(A - B) over paired values (one per seed, the same seeds on both sides) with its Student-t
    level-interval and two-sided p-value (scipy's paired t-test); nan interval and p = 1 for fewer than two
    pairs, and p = 1 when every difference is the same (no spread to test against)."""
    from scipy import stats

    d = np.asarray(values_a, dtype=np.float64) - np.asarray(values_b, dtype=np.float64)
    if d.shape != (len(values_a),) or len(values_a) != len(values_b):
        raise ValueError(f"paired_t: {len(values_a)} and {len(values_b)} values; pairs need one value per seed each")
    lo, hi = t_interval(d, level)
    p = float(stats.ttest_rel(values_a, values_b).pvalue) if d.size >= 2 and d.std() > 0 else 1.0
    return Difference(float(d.mean()), lo, hi, p)


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down procedure: which hypotheses are rejected with family-wise error rate <= alpha."""
    _check_level(1 - alpha)
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break  # step-down: every larger p-value is kept too
        rejected[i] = True
    return rejected
