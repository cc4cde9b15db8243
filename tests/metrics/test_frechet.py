"""Fréchet distance (docs/method.md §8) against an independent scipy reference; Gaussian statistics against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from tmd_lightning.metrics.frechet import frechet_distance, gaussian_stats


def _spd(rng: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
    """A random symmetric PSD matrix of the given rank (full rank by default), float64."""
    a = rng.standard_normal((dim, rank or dim))
    m = a @ a.T / (rank or dim)
    return (m + m.T) / 2 + (0 if rank else 0.05 * np.eye(dim))


def _reference(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's matrix square root of sqrt(S1) S2 sqrt(S1) (PSD, well posed)."""
    r1 = np.real(scipy.linalg.sqrtm(s1))
    covmean = np.real(scipy.linalg.sqrtm(r1 @ s2 @ r1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _reference_plain(mu1, s1, mu2, s2) -> float:
    """The form used by pytorch-fid / clean-fid: sqrtm(S1 S2)."""
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _fd(mu1, s1, mu2, s2) -> torch.Tensor:
    return frechet_distance(*(torch.from_numpy(np.asarray(a)) for a in (mu1, s1, mu2, s2)))


@pytest.mark.parametrize("dim", [1, 2, 5, 16, 64])
def test_matches_scipy_reference(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim) * 0.5 + 0.3
    s1, s2 = _spd(rng, dim), _spd(rng, dim) * 2.0
    got = _fd(mu1, s1, mu2, s2)
    assert got.dtype == torch.float64
    ref = _reference(mu1, s1, mu2, s2)
    assert float(got) == pytest.approx(ref, rel=1e-8, abs=1e-9)
    assert float(got) == pytest.approx(_reference_plain(mu1, s1, mu2, s2), rel=1e-6, abs=1e-8)
    assert float(got) > 0


@pytest.mark.parametrize("dim, rank", [(8, 3), (32, 10)])
def test_matches_scipy_reference_rank_deficient(dim, rank):
    """Fewer samples than feature dimensions give singular covariances (the usual FVD case at small N)."""
    rng = np.random.default_rng(100 + dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = _spd(rng, dim, rank), _spd(rng, dim)
    assert np.linalg.matrix_rank(s1) == rank
    ref = _reference(mu1, s1, mu2, s2)
    assert float(_fd(mu1, s1, mu2, s2)) == pytest.approx(ref, rel=1e-6, abs=1e-6)
    # both singular
    s2 = _spd(rng, dim, rank)
    ref = _reference(mu1, s1, mu2, s2)
    assert float(_fd(mu1, s1, mu2, s2)) == pytest.approx(ref, rel=1e-6, abs=1e-6)


def test_known_closed_forms():
    # same covariance: only the mean term remains
    s = _spd(np.random.default_rng(0), 6)
    mu1, mu2 = np.zeros(6), np.full(6, 2.0)
    assert float(_fd(mu1, s, mu2, s)) == pytest.approx(24.0, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert float(_fd([1.0], [[4.0]], [3.0], [[9.0]])) == pytest.approx(4.0 + 1.0, rel=1e-12)
    # commuting diagonal covariances: sum of (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    assert float(_fd(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b))) == pytest.approx(
        float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)), rel=1e-12
    )


@pytest.mark.parametrize("dim", [3, 20])
def test_identical_distributions_give_zero(dim):
    rng = np.random.default_rng(dim)
    mu, s = rng.standard_normal(dim), _spd(rng, dim)
    assert abs(float(_fd(mu, s, mu, s))) < 1e-8
    s_low = _spd(rng, dim, max(1, dim // 3))
    assert abs(float(_fd(mu, s_low, mu, s_low))) < 1e-6


def test_symmetric_in_its_arguments():
    rng = np.random.default_rng(3)
    for dim in (4, 16):
        mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
        s1, s2 = _spd(rng, dim), _spd(rng, dim, rank=dim // 2)
        # sqrt of round-off-sized eigenvalues of a singular product costs ~1e-9 relative
        assert float(_fd(mu1, s1, mu2, s2)) == pytest.approx(float(_fd(mu2, s2, mu1, s1)), rel=1e-7, abs=1e-8)


def test_float32_inputs_computed_in_float64():
    rng = np.random.default_rng(5)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    s1, s2 = _spd(rng, 10), _spd(rng, 10)
    got = frechet_distance(*(torch.from_numpy(a).float() for a in (mu1, s1, mu2, s2)))
    assert got.dtype == torch.float64
    ref = _reference(*(a.astype(np.float32).astype(np.float64) for a in (mu1, s1, mu2, s2)))
    assert float(got) == pytest.approx(ref, rel=1e-7, abs=1e-8)


def test_grows_with_mean_shift_and_scale():
    rng = np.random.default_rng(6)
    s, mu = _spd(rng, 5), rng.standard_normal(5)
    d = [float(_fd(mu, s, mu + k, s * (1 + k))) for k in (0.0, 0.5, 1.0, 2.0)]
    assert d[0] == pytest.approx(0.0, abs=1e-9)
    assert d == sorted(d) and d[1] > 0


# ---------------------------------------------------------------------------------------------------- stats


@pytest.mark.parametrize("n, dim", [(50, 4), (10, 30), (2, 3), (200, 1)])
def test_gaussian_stats_matches_numpy(n, dim):
    rng = np.random.default_rng(n * dim)
    x = rng.standard_normal((n, dim)) * rng.uniform(0.5, 3, dim) + rng.standard_normal(dim)
    mu, sigma = gaussian_stats(torch.from_numpy(x).float())
    assert mu.dtype == sigma.dtype == torch.float64
    assert mu.shape == (dim,) and sigma.shape == (dim, dim)
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu.numpy(), x32.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.atleast_2d(np.cov(x32, rowvar=False, ddof=1)), rtol=1e-10, atol=1e-12)


def test_gaussian_stats_single_sample_does_not_divide_by_zero():
    mu, sigma = gaussian_stats(torch.tensor([[1.0, 2.0, 3.0]]))
    torch.testing.assert_close(mu, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert torch.isfinite(sigma).all() and float(sigma.abs().max()) == 0.0


def test_stats_then_distance_of_large_samples_from_same_gaussian_is_small():
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((4000, 3)), rng.standard_normal((4000, 3))
    c = rng.standard_normal((4000, 3)) * 2 + 1
    fd_same = float(frechet_distance(*gaussian_stats(torch.from_numpy(a)), *gaussian_stats(torch.from_numpy(b))))
    fd_diff = float(frechet_distance(*gaussian_stats(torch.from_numpy(a)), *gaussian_stats(torch.from_numpy(c))))
    assert fd_same < 0.02
    assert fd_diff == pytest.approx(3 * 1.0 + 3 * 1.0, rel=0.1)  # |mu|^2 = 3, (2 - 1)^2 per dim = 3
