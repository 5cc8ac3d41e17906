"""KID, k-NN precision/recall and check_samples against exact answers: closed forms and brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from scorelab import metrics
from scorelab.metrics import check_samples, kid, precision_recall

# ---------------------------------------------------------------------------------------------
# KID


def _k(a: np.ndarray, b: np.ndarray) -> float:
    return (a @ b / len(a) + 1) ** 3


def _direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 U-statistic, pair by pair."""
    m = len(x)
    xx = sum(_k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2))
    yy = sum(_k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2))
    xy = sum(_k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m**2


def _gaussian_poly_kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
    """E (X.Y / d + 1)^3 for independent X ~ N(a, I), Y ~ N(b, I) in d dimensions, from the moments of
    u = X.Y: E u = a.b, E u^2 = (a.b)^2 + |a|^2 + |b|^2 + d,
    E u^3 = (a.b)^3 + 3 (a.b)(|a|^2 + |b|^2) + 3 (d + 2)(a.b)."""
    d, ab, aa, bb = len(a), a @ b, a @ a, b @ b
    u1, u2 = ab, ab**2 + aa + bb + d
    u3 = ab**3 + 3 * ab * (aa + bb) + 3 * (d + 2) * ab
    return 1 + 3 * u1 / d + 3 * u2 / d**2 + u3 / d**3


def test_kid_matches_direct_formula_on_the_whole_set():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((9, 3)), rng.standard_normal((9, 3)) + 0.3
    # One subset of every row is a permutation of the sets, and MMD^2 does not depend on the order.
    mean, std = kid(x, y, subset_size=100, subsets=3)
    assert mean == pytest.approx(_direct_mmd2(x, y), rel=1e-12)
    assert std == pytest.approx(0, abs=1e-12)


def test_kid_matches_direct_formula_on_the_drawn_subsets():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((12, 4)), rng.standard_normal((7, 4))
    m, subsets, seed = 5, 4, 3
    # The draws documented by kid: per subset, randperm of x's rows then of y's, from one CPU generator.
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        ix, iy = torch.randperm(12, generator=gen)[:m], torch.randperm(7, generator=gen)[:m]
        values.append(_direct_mmd2(x[ix.numpy()], y[iy.numpy()]))
    mean, std = kid(x, torch.as_tensor(y), subset_size=m, subsets=subsets, seed=seed)
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert std == pytest.approx(np.std(values), rel=1e-9)


def test_kid_point_masses_are_exact():
    a, b = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 2.0])
    x, y = np.tile(a, (20, 1)), np.tile(b, (30, 1))
    mean, std = kid(x, y, subset_size=10, subsets=5)
    assert mean == pytest.approx(_k(a, a) + _k(b, b) - 2 * _k(a, b), rel=1e-12)
    assert std == pytest.approx(0, abs=1e-12)


def test_kid_same_distribution_is_zero_within_noise():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 16, generator=gen), torch.randn(2000, 16, generator=gen)
    mean, std = kid(x, y, subset_size=500, subsets=50)
    assert std > 0
    assert abs(mean) < 3 * std


def test_kid_gaussian_shift_matches_closed_form():
    d, shift = 8, 0.5
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3000, d, generator=gen), torch.randn(3000, d, generator=gen) + shift
    a, b = np.zeros(d), np.full(d, shift)
    exact = (_gaussian_poly_kernel_mean(a, a) + _gaussian_poly_kernel_mean(b, b)
             - 2 * _gaussian_poly_kernel_mean(a, b))
    mean, std = kid(x, y, subset_size=500, subsets=50, seed=2)
    assert exact > 0.1
    assert mean > 3 * std  # clearly positive
    # Every subset estimate is unbiased, so their mean is within a few of their std of the exact value.
    assert abs(mean - exact) < 3 * std


def test_kid_is_deterministic_per_seed():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(50, 5, generator=gen), torch.randn(60, 5, generator=gen) + 0.2
    assert kid(x, y, subset_size=20, subsets=10, seed=7) == kid(x, y, subset_size=20, subsets=10, seed=7)
    assert kid(x, y, subset_size=20, subsets=10, seed=7) != kid(x, y, subset_size=20, subsets=10, seed=8)


@pytest.mark.parametrize("kwargs, shapes, match", [
    ({}, ((10, 3), (10, 4)), "dimensions differ"),
    ({"subset_size": 1}, ((10, 3), (10, 3)), "at least 2"),
    ({}, ((1, 3), (10, 3)), "at least 2"),
    ({"subsets": 0}, ((10, 3), (10, 3)), "subsets >= 1"),
])
def test_kid_rejects_bad_input(kwargs, shapes, match):
    with pytest.raises(ValueError, match=match):
        kid(np.zeros(shapes[0]), np.zeros(shapes[1]), **kwargs)


# ---------------------------------------------------------------------------------------------
# Precision and recall


def _brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def dists(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))

    def radii(f):
        return np.sort(dists(f, f), axis=1)[:, k]  # column 0 is the point itself

    def coverage(q, c):
        return float(np.mean((dists(q, c) <= radii(c)[None]).any(1)))

    return coverage(fake, real), coverage(real, fake)


def test_precision_recall_identical_sets():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone()) == (1.0, 1.0)


def test_precision_recall_far_away_fake_set():
    gen = torch.Generator().manual_seed(1)
    real, fake = torch.randn(200, 8, generator=gen), torch.randn(150, 8, generator=gen) + 100
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_exact_one_dimensional_cases():
    real = np.arange(10.0)[:, None]  # k=1: every real ball has radius 1
    # A subset of the real points: all realistic; its balls (radius 1) reach reals 0..3 only.
    assert precision_recall(real, np.array([[0.0], [1.0], [2.0]]), k=1) == (1.0, 0.4)
    # One outlier at 20: not realistic, but its ball (radius 18, to 2) covers every real point.
    assert precision_recall(real, np.array([[0.0], [1.0], [2.0], [20.0]]), k=1) == (0.75, 1.0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k, monkeypatch):
    rng = np.random.default_rng(k)
    real = rng.standard_normal((120, 3))
    fake = 1.3 * rng.standard_normal((90, 3)) + 0.4
    expected = _brute_precision_recall(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case that tests something
    assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12)
    monkeypatch.setattr(metrics, "_CDIST_ELEMENTS", 500)  # several uneven chunks per matrix
    assert precision_recall(torch.as_tensor(real), fake, k=k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("k", [0, 5])
def test_precision_recall_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k="):
        precision_recall(np.zeros((5, 2)), np.zeros((8, 2)), k=k)


# ---------------------------------------------------------------------------------------------
# check_samples


def test_check_samples_accepts_good_samples():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    check_samples(x, shape=(1, 16, 16))
    check_samples(x.numpy().astype(np.float16), shape=[1, 16, 16])
    check_samples(torch.full((2, 3), 1 + 5e-4), shape=(3,))  # rounding slack
    check_samples(torch.full((2, 3), 7.0), shape=(3,), value_range=None)


def _with(value: float, index: tuple[int, ...] = (1, 0, 2, 3)) -> torch.Tensor:
    x = torch.zeros(3, 1, 16, 16)
    x[index] = value
    return x


@pytest.mark.parametrize("x, match", [
    (torch.zeros(3, 3, 16, 16), r"expected shape \(N, 1, 16, 16\), found \(3, 3, 16, 16\)"),
    (torch.zeros(1, 16, 16), r"expected shape \(N, 1, 16, 16\), found \(1, 16, 16\)"),
    (torch.zeros(0, 1, 16, 16), "expected at least one sample"),
    (torch.zeros(3, 1, 16, 16, dtype=torch.uint8), "expected a floating-point dtype, found torch.uint8"),
    (np.zeros((3, 1, 16, 16), np.int64), "expected a floating-point dtype, found int64"),
    (_with(float("nan")), r"expected finite values, found 1 NaN and 0 infinite \(first at index \(1, 0, 2, 3\)\)"),
    (_with(float("-inf")), "expected finite values, found 0 NaN and 1 infinite"),
    (_with(1.01), r"expected values in \[-1, 1\], found min 0, max 1.01"),
    (_with(-1.002), r"expected values in \[-1, 1\], found min -1.002, max 0"),
    ([[0.0]], "expected a tensor or numpy array, found list"),
])
def test_check_samples_names_what_is_wrong(x, match):
    with pytest.raises(ValueError, match=match) as e:
        check_samples(x, shape=(1, 16, 16), name="fake_samples")
    message = str(e.value)
    assert message.startswith("fake_samples: ") and "\n" not in message
