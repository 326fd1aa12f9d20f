"""Leakage metrics on constructed cases: PSNR, SSIM, cosine, subsampled NN, bootstrap, TV."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codream_secure.audit.leakage.metrics import (
    PSNR_CAP_DB,
    bootstrap_mean_ci,
    cap_psnr,
    cosine_matrix,
    histogram_from_probabilities,
    psnr,
    psnr_matrix,
    ssim,
    ssim_matrix,
    ssim_window,
    subsampled_nearest,
    to_unit_pixels,
    total_variation_distance,
)
from codream_secure.errors import ConfigError, DataError


def _images(n: int, c: int = 1, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, c, h, w))


def test_psnr_known_value_and_identical_images_are_inf():
    a = np.zeros((1, 8, 8))
    assert psnr(a, a + 0.1) == pytest.approx(20.0)  # MSE 0.01, data range 1
    assert psnr(a, a) == math.inf


def test_psnr_matrix_finds_an_exact_copy_despite_cancellation():
    """The expanded |a|^2 + |b|^2 - 2ab form leaves rounding error; copies must still be inf."""
    refs = _images(30, seed=1)
    queries = np.concatenate([_images(5, seed=2), refs[[7]]])
    m = psnr_matrix(queries, refs)
    assert m.shape == (6, 30)
    assert np.isinf(m[5, 7]) and np.isinf(m).sum() == 1
    assert np.all(np.isfinite(np.delete(m.reshape(-1), 5 * 30 + 7)))
    assert m[0, 0] == pytest.approx(psnr(queries[0], refs[0]))


def test_cap_psnr_turns_inf_into_the_cap_only():
    assert list(cap_psnr(np.array([12.0, math.inf, 70.0]))) == [12.0, PSNR_CAP_DB, PSNR_CAP_DB]


@pytest.mark.parametrize(("side", "expected"), [(8, 5), (10, 5), (16, 9), (28, 11), (32, 11)])
def test_ssim_window_keeps_the_standard_ratio(side, expected):
    size, sigma = ssim_window(side, side)
    assert size == expected and size % 2 == 1
    assert sigma == pytest.approx(1.5 * size / 11)


def test_ssim_window_refuses_tiny_images():
    with pytest.raises(DataError):
        ssim_window(2, 8)


def test_ssim_of_an_image_with_itself_is_one():
    x = _images(4)
    assert ssim(x[0], x[0]) == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.diag(ssim_matrix(x, x)) == 1.0)


def test_ssim_of_constant_images_is_the_luminance_term():
    """Zero variance leaves (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1): a closed form."""
    a, b = np.full((1, 8, 8), 0.2), np.full((1, 8, 8), 0.4)
    c1 = 0.01**2
    assert ssim(a, b) == pytest.approx((2 * 0.08 + c1) / (0.04 + 0.16 + c1), rel=1e-12)


def test_ssim_decreases_as_noise_grows():
    rng = np.random.default_rng(3)
    x = _images(16, seed=4)
    scores = []
    for sigma in (0.0, 0.02, 0.05, 0.1, 0.3):
        noisy = np.clip(x + rng.normal(0, sigma, x.shape), 0, 1)
        scores.append(np.mean([ssim(a, b) for a, b in zip(x, noisy, strict=True)]))
    assert scores[0] == pytest.approx(1.0)
    assert all(hi > lo for hi, lo in itertools.pairwise(scores))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 12, 12), (1, 28, 28)])
def test_ssim_matrix_equals_the_textbook_ssim(shape):
    """The matrix form (matrix products per window) against scipy.ndimage filtering per pair."""
    a, b = _images(3, *shape, seed=5), _images(4, *shape, seed=6)
    m = ssim_matrix(a, b)
    expected = np.array([[ssim(x, y) for y in b] for x in a])
    np.testing.assert_allclose(m, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ssim_matrix(b, a), m.T, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_ssim_is_symmetric_and_bounded(seed, mix):
    x = _images(1, seed=seed)[0]
    y = mix * x + (1 - mix) * _images(1, seed=seed + 1)[0]
    s = ssim(x, y)
    assert s == pytest.approx(ssim(y, x), abs=1e-12)
    assert -1.0 - 1e-12 <= s <= 1.0 + 1e-12


def test_cosine_matrix_known_answers():
    f = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    np.testing.assert_allclose(cosine_matrix(f, f), [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    with pytest.raises(DataError):
        cosine_matrix(np.zeros((1, 2)), f)


def test_subsampled_nearest_uses_subsets_of_the_given_size():
    """Row i scores reference j as j: a size-s subset's best is its largest index, >= s - 1."""
    sims = np.tile(np.arange(100.0), (3, 1))
    rng = np.random.default_rng(0)
    best = subsampled_nearest(sims, size=10, repeats=50, rng=rng)
    assert best.shape == (50, 3)
    assert np.all(best >= 9) and np.all(best <= 99)
    assert np.all(best == best[:, :1])  # every query sees the same subset in one repeat
    # the whole set: no subsampling, the plain nearest neighbour
    assert np.all(subsampled_nearest(sims, size=100, repeats=2, rng=rng) == 99)
    # a smaller reference set has a lower expected best: the reason for equal sizes
    assert best.mean() < 99
    with pytest.raises(ConfigError):
        subsampled_nearest(sims, size=101, repeats=1, rng=rng)


def test_bootstrap_ci_covers_the_true_mean_at_about_the_nominal_rate():
    """400 normal samples of n = 40: coverage of the 95% percentile CI.

    The percentile bootstrap of a mean is slightly narrow for n = 40 (z instead of t and a
    biased variance): about 0.94. With 400 trials the estimate's SD is 0.012, so [0.90, 0.98]
    is over 3 SD either side; a CI that were off by a factor 2 in width would land at ~0.68
    or ~0.999.
    """
    rng = np.random.default_rng(11)
    hits = 0
    for _ in range(400):
        sample = rng.normal(3.0, 2.0, size=40)
        lo, hi = bootstrap_mean_ci(sample, resamples=1000, rng=rng)
        hits += lo <= 3.0 <= hi
    assert 0.90 <= hits / 400 <= 0.98


def test_bootstrap_ci_refuses_inf_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError):
        bootstrap_mean_ci(np.array([1.0, math.inf]), rng=rng)
    small = np.diff(bootstrap_mean_ci(rng.normal(size=50), rng=rng))[0]
    large = np.diff(bootstrap_mean_ci(rng.normal(size=5000), rng=rng))[0]
    assert large < small / 5  # width ~ 1/sqrt(n): expected ratio 10


def test_total_variation_distance_known_answers():
    assert total_variation_distance(np.array([1, 0, 0]), np.array([0, 0, 5])) == 1.0
    assert total_variation_distance(np.array([2, 2, 0]), np.array([0, 1, 1])) == 0.5
    assert total_variation_distance(np.array([3, 1]), np.array([6, 2])) == 0.0
    with pytest.raises(DataError):
        total_variation_distance(np.array([-1, 2]), np.array([1, 1]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.01, 10), min_size=3, max_size=3),
       st.lists(st.floats(0.01, 10), min_size=3, max_size=3),
       st.lists(st.floats(0.01, 10), min_size=3, max_size=3))
def test_total_variation_is_a_metric_on_histograms(p, q, r):
    p, q, r = map(np.array, (p, q, r))
    d = total_variation_distance
    assert 0.0 <= d(p, q) <= 1.0
    assert d(p, q) == pytest.approx(d(q, p))
    assert d(p, r) <= d(p, q) + d(q, r) + 1e-12


def test_histogram_from_probabilities_means_clips_and_falls_back_to_uniform():
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    np.testing.assert_allclose(histogram_from_probabilities(probs), [0.5, 0.25, 0.25])
    noisy = np.array([[0.8, -0.4, 0.0], [0.8, 0.0, 0.4]])
    np.testing.assert_allclose(histogram_from_probabilities(noisy), [0.8, 0.0, 0.2])
    np.testing.assert_allclose(histogram_from_probabilities(-np.ones((2, 4))), [0.25] * 4)


def test_to_unit_pixels_inverts_the_normalisation_and_clips():
    x01 = _images(2, c=3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normalised = (x01 - np.array(mean)[None, :, None, None]) / np.array(std)[None, :, None, None]
    np.testing.assert_allclose(to_unit_pixels(normalised, mean, std), x01, atol=1e-12)
    assert to_unit_pixels(np.full((1, 3, 2, 2), 50.0), mean, std).max() == 1.0
    with pytest.raises(DataError):
        to_unit_pixels(x01, (0.5,), (0.2,))
