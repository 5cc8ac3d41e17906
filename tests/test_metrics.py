"""Metrics against exact answers: pytorch_fid's Frechet distance, closed forms, and brute force."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from scipy import stats

from scorelab.metrics import RunningStats, frechet_distance, gaussian_stats, mmd_rbf, sliced_wasserstein



def _reference_fd(mu1, s1, mu2, s2) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's sqrtm warns on (nearly) singular products
        return float(calculate_frechet_distance(mu1, s1, mu2, s2))


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------------------------
# Frechet distance


@pytest.mark.parametrize("d", [2, 64, 256])
def test_frechet_matches_pytorch_fid(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _spd(rng, d), _spd(rng, d)
    ref = _reference_fd(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    # Tensors of any float dtype are accepted too.
    tensors = [torch.as_tensor(a, dtype=torch.float64) for a in (mu1, s1, mu2, s2)]
    assert frechet_distance(*tensors) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("d, n", [(64, 50), (256, 100)])
def test_frechet_matches_pytorch_fid_when_nearly_singular(d, n):
    # Fewer samples than features: rank-deficient covariances, as FID on small sample sets has.
    rng = np.random.default_rng(n)
    f1 = 0.1 * rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    f2 = 0.1 * rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 0.05
    (mu1, s1), (mu2, s2) = gaussian_stats(f1), gaussian_stats(f2)
    assert np.linalg.matrix_rank(s1) < d
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-6)
    # One covariance of rank 5 (+1e-12 I) against a full one.
    low = rng.standard_normal((d, 5))
    s3 = low @ low.T + 1e-12 * np.eye(d)
    assert frechet_distance(mu1, s3, mu2, s2) == pytest.approx(_reference_fd(mu1, s3, mu2, s2), rel=1e-6)


def test_frechet_zero_for_identical_stats():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(64), _spd(rng, 64)
    assert frechet_distance(mu, s, mu, s) <= 1e-10 * np.trace(s)


def test_frechet_closed_form_for_diagonal_gaussians():
    # Commuting covariances: FD = |m1 - m2|^2 + sum (s1 - s2)^2 over the standard deviations.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[0.25]]) == pytest.approx(9.0 + 1.5**2, rel=1e-12)
    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal(10), rng.standard_normal(10)
    sd1, sd2 = rng.uniform(0, 2, 10), rng.uniform(0, 2, 10)
    sd1[:3] = 0.0  # singular: zero variance in some directions
    expected = ((m1 - m2) ** 2).sum() + ((sd1 - sd2) ** 2).sum()
    got = frechet_distance(torch.tensor(m1), torch.diag(torch.tensor(sd1**2)), m2, np.diag(sd2**2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_gaussian_stats_are_numpy_mean_and_cov():
    f = np.random.default_rng(2).standard_normal((100, 7))
    mu, sigma = gaussian_stats(torch.tensor(f, dtype=torch.float32))
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.astype(np.float32).mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float32).astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(np.ones((1, 3)))


@pytest.mark.parametrize("splits", [[500], [1, 499], [250, 250], [7, 64, 1, 300, 128], [2] * 250])
def test_running_stats_are_the_exact_float64_mean_and_cov_over_all_rows(splits):
    # a mean far from 0 against the spread: raw sums of squares would lose ~8 digits to cancellation here
    rng = np.random.default_rng(3)
    f = 1e4 + rng.standard_normal((500, 9)) @ rng.standard_normal((9, 9))
    rs = RunningStats()
    for part in np.split(f, np.cumsum(splits)[:-1]):
        rs.update(torch.from_numpy(part))
    mu, sigma = rs.stats()
    assert rs.n == 500 and mu.dtype == sigma.dtype == np.float64
    cov = np.cov(f, rowvar=False)
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-14, atol=0)  # within a few ulps of numpy's own rounding
    np.testing.assert_allclose(sigma, cov, rtol=0, atol=1e-12 * np.abs(cov).max())  # naive sums: ~3e-8


def test_running_stats_one_batch_is_gaussian_stats_bit_for_bit_and_keeps_leading_rows():
    f = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    mu, sigma = RunningStats().update(f).stats()
    ref_mu, ref_sigma = gaussian_stats(f)
    assert np.array_equal(mu, ref_mu) and np.array_equal(sigma, ref_sigma)

    rs = RunningStats(keep=130)
    for part in (f[:100], f[100:100], f[100:200], f[200:]):  # an empty batch changes nothing
        rs.update(part)
    assert rs.n == 300 and torch.equal(rs.rows, f[:130].double())
    assert RunningStats(keep=10).rows.shape == (0, 0)
    with pytest.raises(ValueError, match="dimension 4 after 5"):
        rs.update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        RunningStats().update(f[:1]).stats()


# ---------------------------------------------------------------------------------------------
# Sliced Wasserstein


def _w_pow_1d_bruteforce(a: np.ndarray, b: np.ndarray, p: float) -> float:
    """int_0^1 |F^-1 - G^-1|^p on the lcm(N, M) grid, where both quantile functions are constant per cell."""
    a, b = np.sort(a), np.sort(b)
    cells = math.lcm(len(a), len(b))
    q = (np.arange(cells) + 0.5) / cells
    return float(np.mean(np.abs(a[(q * len(a)).astype(int)] - b[(q * len(b)).astype(int)]) ** p))


def test_sliced_wasserstein_is_exact_in_one_dimension():
    # In 1-D every direction is +-1, so SW_p = W_p. Hand-computed: {0, 1} vs {0, 0.5, 1} has W2^2 = 1/12.
    assert sliced_wasserstein(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.5], [1.0]]), 16) == pytest.approx(
        math.sqrt(1 / 12), rel=1e-12
    )
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(30), 0.5 + 2 * rng.standard_normal(45)
    assert sliced_wasserstein(a[:, None], b[:, None], 8, p=1) == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-10)
    for p in (2, 3):
        expected = _w_pow_1d_bruteforce(a, b, p) ** (1 / p)
        assert sliced_wasserstein(a[:, None], b[:, None], 8, p=p) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("d", [2, 8, 32])
def test_sliced_wasserstein_of_a_shift(d):
    # y = x + c exactly: each projection's W2^2 is (theta . c)^2, whose mean over the sphere is |c|^2 / D
    # and whose variance is |c|^4 2 (D - 1) / (D^2 (D + 2)): the tolerance is 4 standard errors of the
    # mean over the projections (the samples themselves add no error).
    g = torch.Generator().manual_seed(d)
    x = torch.randn(500, d, generator=g, dtype=torch.float64)
    c = torch.randn(d, generator=g, dtype=torch.float64)
    n_proj = 1024
    c2 = float(c.square().sum())
    sd = c2 * math.sqrt(2 * (d - 1) / (d**2 * (d + 2)) / n_proj)
    sw = sliced_wasserstein(x, x + c, n_projections=n_proj, seed=1)
    assert abs(sw**2 - c2 / d) < 4 * sd + 1e-12
    # Unequal sizes: y repeats every point of x + c twice, the same distribution.
    sw2 = sliced_wasserstein(x, torch.cat([x + c, x + c]), n_projections=n_proj, seed=1)
    assert sw2 == pytest.approx(sw, rel=1e-10)


def test_sliced_wasserstein_zero_and_seeded():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(x, x[torch.randperm(200)]) == pytest.approx(0.0, abs=1e-12)
    y = x + 0.3
    assert sliced_wasserstein(x, y, seed=4) == sliced_wasserstein(x.numpy(), y.numpy(), seed=4)
    assert sliced_wasserstein(x, y, seed=4) != sliced_wasserstein(x, y, seed=5)
    with pytest.raises(ValueError, match="dimensions"):
        sliced_wasserstein(x, x[:, :3])


# ---------------------------------------------------------------------------------------------
# MMD


def _mmd_bruteforce(x: np.ndarray, y: np.ndarray, bandwidths) -> float:
    def k(a: np.ndarray, b: np.ndarray) -> float:
        return sum(math.exp(-float(np.sum((a - b) ** 2)) / (2 * s * s)) for s in bandwidths)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_matches_the_definition():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((9, 3)) + 0.4
    assert mmd_rbf(x, y, bandwidths=[0.5, 2.0]) == pytest.approx(_mmd_bruteforce(x, y, [0.5, 2.0]), rel=1e-10)
    # Default: the median pooled pairwise distance times (0.5, 1, 2).
    pooled = np.concatenate([x, y])
    med = np.median([np.linalg.norm(a - b) for i, a in enumerate(pooled) for b in pooled[i + 1 :]])
    expected = _mmd_bruteforce(x, y, [0.5 * med, med, 2 * med])
    assert mmd_rbf(torch.tensor(x), torch.tensor(y)) == pytest.approx(expected, rel=1e-10)


def test_mmd_expectation_for_gaussians():
    # For N(m1, s^2 I) vs N(m2, s^2 I) and one bandwidth b, the unbiased estimator's mean is
    # 2 (b^2 / (b^2 + 2 s^2))^(D/2) (1 - exp(-|m1 - m2|^2 / (2 (b^2 + 2 s^2)))).
    d, s, b, n, reps = 3, 1.0, 1.5, 150, 40
    shift = torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    r = b**2 / (b**2 + 2 * s**2)
    expected = 2 * r ** (d / 2) * (1 - math.exp(-float(shift.square().sum()) / (2 * (b**2 + 2 * s**2))))
    g = torch.Generator().manual_seed(6)
    vals = torch.tensor([
        mmd_rbf(torch.randn(n, d, generator=g, dtype=torch.float64),
                torch.randn(n, d, generator=g, dtype=torch.float64) + shift, bandwidths=[b])
        for _ in range(reps)
    ])
    se = float(vals.std()) / math.sqrt(reps)
    assert abs(float(vals.mean()) - expected) < 4 * se


def test_mmd_same_versus_shifted_distribution():
    g = torch.Generator().manual_seed(8)
    n, d, reps = 200, 4, 30
    same = torch.tensor([
        mmd_rbf(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)) for _ in range(reps)
    ])
    null_sd = float(same.std())
    # Unbiased: mean 0 under the null, every draw within a few null standard deviations.
    assert abs(float(same.mean())) < 4 * null_sd / math.sqrt(reps)
    assert float(same.abs().max()) < 4 * null_sd
    shifted = mmd_rbf(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) + 0.5)
    assert shifted > 10 * null_sd
    with pytest.raises(ValueError, match="at least 2"):
        mmd_rbf(torch.randn(1, d), torch.randn(5, d))


# ---------------------------------------------------------------------------------------------
# Intervals and pairwise comparisons, on synthetic data with known answers

from scorelab.metrics import (bootstrap_indices, bootstrap_interval, frechet_replicates, holm,  # noqa: E402
                              paired_difference, paired_t, sliced_wasserstein_replicates, t_interval)


def _covered(trials: int, draw) -> float:
    return float(np.mean([lo <= truth <= hi for lo, hi, truth in (draw(t) for t in range(trials))]))


def test_bootstrap_indices_are_seeded_and_shared():
    a = bootstrap_indices(50, 7, (0, 1))
    assert a.shape == (7, 50) and a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(a, bootstrap_indices(50, 7, (0, 1)))
    assert not np.array_equal(a, bootstrap_indices(50, 7, (0, 2)))
    with pytest.raises(ValueError, match="replicates >= 1"):
        bootstrap_indices(50, 0, 0)


def test_bootstrap_interval_of_a_mean_covers_the_truth_at_its_level():
    """x ~ N(3, 2^2), n = 60: the 90% interval of the sample mean covers 3 in about 90% of 400 data sets."""

    def draw(t):
        x = np.random.default_rng(t).normal(3.0, 2.0, 60)
        reps = x[bootstrap_indices(60, 400, t)].mean(1)
        return (*bootstrap_interval(x.mean(), reps, 0.90), 3.0)

    rate = _covered(400, draw)
    assert 0.85 <= rate <= 0.95, rate  # binomial sd 1.5%; the percentile bootstrap runs a little narrow


def test_t_interval_is_students_and_covers_at_its_level():
    v = np.array([1.0, 2.0, 4.0])
    half = stats.t.ppf(0.975, 2) * v.std(ddof=1) / math.sqrt(3)
    assert t_interval(v) == pytest.approx((v.mean() - half, v.mean() + half))
    assert all(math.isnan(x) for x in t_interval([1.0]))
    rate = _covered(2000, lambda t: (*t_interval(np.random.default_rng(t).normal(5, 1, 3), 0.95), 5.0))
    assert 0.935 <= rate <= 0.965, rate  # exact for normal values: binomial sd 0.5%


def test_frechet_replicates_are_frechet_distances_of_the_resamples():
    rng = np.random.default_rng(1)
    f, mu, s = rng.standard_normal((40, 5)), rng.standard_normal(5), _spd(rng, 5)
    idx = bootstrap_indices(40, 6, 0)
    expected = [frechet_distance(*gaussian_stats(f[i]), mu, s) for i in idx]
    np.testing.assert_allclose(frechet_replicates(f, idx, mu, s), expected, rtol=1e-9)
    y = rng.standard_normal((30, 5))
    np.testing.assert_allclose(sliced_wasserstein_replicates(f, y, idx, n_projections=16, seed=3),
                               [sliced_wasserstein(f[i], y, n_projections=16, seed=3) for i in idx], rtol=1e-12)


def test_paired_frechet_difference_covers_the_known_difference():
    """A ~ N(mu + delta, S), B ~ N(mu, S), both against the exact reference N(mu, S): the expected difference
    of their Frechet distances is exactly |delta|^2 (the bias terms are the same for both), and the 90%
    paired interval covers it at about its level. (Where a distance is near 0, as real against real, the
    bootstrap's interval is wider than needed: the distance is flat at its minimum, its resamples are not.)"""
    rng0 = np.random.default_rng(0)
    d, n, delta = 3, 150, np.array([1.0, 0.0, 0.0])
    mu, s = np.zeros(d), _spd(rng0, d)
    chol = np.linalg.cholesky(s)

    def draw(t):
        rng = np.random.default_rng(100 + t)
        a = rng.standard_normal((n, d)) @ chol.T + delta
        b = rng.standard_normal((n, d)) @ chol.T
        idx = bootstrap_indices(n, 150, t)
        diff = paired_difference(frechet_distance(*gaussian_stats(a), mu, s), frechet_replicates(a, idx, mu, s),
                                 frechet_distance(*gaussian_stats(b), mu, s), frechet_replicates(b, idx, mu, s),
                                 level=0.90)
        return diff.low, diff.high, float(delta @ delta)

    rate = _covered(200, draw)
    assert 0.84 <= rate <= 0.96, rate  # binomial sd 2.1%


def test_paired_difference_calls_equal_distributions_ties_and_different_ones_significant():
    """Means of paired samples: at alpha = 0.05, equal distributions are called different in about 5% of
    data sets; a shift of 0.5 sd with n = 200 (z = 5) is called different every time."""

    def p_value(t, shift):
        rng = np.random.default_rng(t)
        a, b = rng.normal(shift, 1.0, 200), rng.normal(0.0, 1.0, 200)
        idx = bootstrap_indices(200, 400, t)
        return paired_difference(a.mean(), a[idx].mean(1), b.mean(), b[idx].mean(1)).p_value

    false_alarms = np.mean([p_value(t, 0.0) <= 0.05 for t in range(300)])
    assert false_alarms <= 0.09, false_alarms  # binomial sd 1.3% around 5%
    assert all(p_value(t, 0.5) <= 0.05 for t in range(20))
    with pytest.raises(ValueError, match="same resamples"):
        paired_difference(0.0, np.zeros(3), 0.0, np.zeros(4))


def test_holm_step_down():
    # alpha 0.05 over 4: 0.01 <= 0.0125 and 0.016 <= 0.0167 rejected; 0.03 > 0.025 stops the rest
    assert holm([0.03, 0.01, 0.2, 0.016]) == [False, True, False, True]
    assert holm([0.04, 0.04]) == [False, False]  # 0.04 > 0.05 / 2
    assert holm([]) == []


def test_paired_t_covers_the_known_difference_and_calls_ties_and_differences():
    """Per-seed values with a shared seed effect: A - B = 0.5 exactly in expectation. Over 3 seeds the 90%
    interval covers 0.5 in about 90% of 2000 draws; equal means are called different in about 5% of draws at
    alpha 0.05; a difference of 10 noise sds is called different every time."""

    def draw(t, shift):
        rng = np.random.default_rng(t)
        common = rng.normal(0, 5, 3)  # the seed's own luck, shared by both sides
        return common + shift + rng.normal(0, 0.2, 3), common + rng.normal(0, 0.2, 3)

    rate = _covered(2000, lambda t: (*(lambda d: (d.low, d.high))(paired_t(*draw(t, 0.5), level=0.90)), 0.5))
    assert 0.88 <= rate <= 0.92, rate  # exact for normal values: binomial sd 0.7%
    false_alarms = np.mean([paired_t(*draw(t, 0.0)).p_value <= 0.05 for t in range(2000)])
    assert 0.035 <= false_alarms <= 0.065, false_alarms
    assert all(paired_t(*draw(t, 2.0)).p_value <= 0.05 for t in range(50))
    with pytest.raises(ValueError, match="one value per seed"):
        paired_t([1.0, 2.0], [1.0])
