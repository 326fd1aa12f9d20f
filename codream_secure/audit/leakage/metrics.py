"""Image and distribution metrics of the leakage benchmark: PSNR, SSIM, cosine, bootstrap, TV.

Images are float arrays N x C x H x W in one pixel space, [0, 1] (data range 1). Similarities
come as matrices (queries x references), so nearest-neighbour searches are one max per row.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from codream_secure.errors import ConfigError, DataError

__all__ = [
    "PSNR_CAP_DB",
    "SSIM_K1",
    "SSIM_K2",
    "bootstrap_mean_ci",
    "cap_psnr",
    "cosine_matrix",
    "gaussian_window",
    "histogram_from_probabilities",
    "psnr",
    "psnr_matrix",
    "ssim",
    "ssim_matrix",
    "ssim_window",
    "subsampled_nearest",
    "to_unit_pixels",
    "total_variation_distance",
]

SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004
# Means use min(PSNR, 60 dB): 60 dB is below 8-bit quantisation noise (58.9 dB), so a capped
# value means "a copy"; the raw per-dream values keep inf and copies are also counted apart.
PSNR_CAP_DB = 60.0
_EXACT_TOL = 1e-10  # expanded-form MSE below this is recomputed exactly (catches copies)

def to_unit_pixels(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Undo the per-channel normalisation (x * std + mean) and clip into [0, 1], as float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 4 or x.shape[1] != len(mean) or len(mean) != len(std):
        raise DataError(f"need N x C x H x W with C = {len(mean)} channels, got {x.shape}")
    scale = np.asarray(std, np.float64)[None, :, None, None]
    shift = np.asarray(mean, np.float64)[None, :, None, None]
    return np.clip(x * scale + shift, 0.0, 1.0)


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 4 or b.ndim != 4 or a.shape[1:] != b.shape[1:]:
        raise DataError(f"need two N x C x H x W batches of one image shape, got {a.shape} "
                        f"and {b.shape}")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise DataError("nearest-neighbour search needs non-empty query and reference sets")
    return a, b


def psnr_matrix(a: np.ndarray, b: np.ndarray, *, data_range: float = 1.0) -> np.ndarray:
    """PSNR (dB) of every pair (a_i, b_j); identical images give +inf."""
    a, b = _check_pair(a, b)
    fa, fb = a.reshape(len(a), -1), b.reshape(len(b), -1)
    d = fa.shape[1]
    mse = ((fa**2).sum(1)[:, None] + (fb**2).sum(1)[None, :] - 2.0 * fa @ fb.T) / d
    mse = np.maximum(mse, 0.0)
    for i, j in np.argwhere(mse < _EXACT_TOL):  # cancellation error: recompute these exactly
        mse[i, j] = float(np.mean((fa[i] - fb[j]) ** 2))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def psnr(a: np.ndarray, b: np.ndarray, *, data_range: float = 1.0) -> float:
    """PSNR (dB) of two C x H x W images; inf when they are identical."""
    return float(psnr_matrix(np.asarray(a)[None], np.asarray(b)[None], data_range=data_range)[0, 0])


def cap_psnr(values: np.ndarray, cap: float = PSNR_CAP_DB) -> np.ndarray:
    """min(PSNR, cap): the form PSNR takes in means, gaps and bootstraps (inf -> cap)."""
    return np.minimum(np.asarray(values, dtype=np.float64), cap)


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """(size, sigma) of the Gaussian SSIM window for H x W images.

    The standard window is 11 x 11 with sigma 1.5. Smaller images use the largest odd size
    <= min(H, W) / 2 + 1 (so at least a few window positions fit) with sigma scaled by size / 11,
    keeping the standard sigma-to-size ratio: 8 x 8 digits get 5 x 5, sigma 0.68, 16 positions.
    """
    side = min(height, width)
    if side < 3:
        raise DataError(f"SSIM needs images of at least 3 x 3 pixels, got {height} x {width}")
    size = min(11, side // 2 + 1)
    size -= 1 - size % 2  # make it odd
    return size, 1.5 * size / 11


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    """A size x size Gaussian window summing to 1."""
    if size < 1 or size % 2 == 0 or not sigma > 0:
        raise ConfigError(f"window size must be odd and positive and sigma > 0, got {size}, "
                          f"{sigma}")
    r = np.arange(size) - size // 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    window = np.outer(g, g)
    return window / window.sum()


def _constants(data_range: float) -> tuple[float, float]:
    return (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2


def _ssim_map(mu_a, mu_b, var_a, var_b, cov, c1: float, c2: float):
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1)
                                                        * (var_a + var_b + c2))


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float = 1.0) -> float:
    """SSIM of two C x H x W images (Gaussian window of `ssim_window`), mean over channels.

    Written the textbook way with scipy.ndimage (valid window positions only); `ssim_matrix`
    computes the same numbers for many pairs at once and is tested against this.
    """
    a, b = _check_pair(np.asarray(a)[None], np.asarray(b)[None])
    size, sigma = ssim_window(*a.shape[2:])
    window, r = gaussian_window(size, sigma), size // 2
    c1, c2 = _constants(data_range)

    def blur(img: np.ndarray) -> np.ndarray:
        out = ndimage.correlate(img, window, mode="constant")
        return out[r: img.shape[0] - r, r: img.shape[1] - r]

    values = []
    for x, y in zip(a[0], b[0], strict=True):
        mu_x, mu_y = blur(x), blur(y)
        var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
        cov = blur(x * y) - mu_x * mu_y
        values.append(_ssim_map(mu_x, mu_y, var_x, var_y, cov, c1, c2).mean())
    return float(np.mean(values))


def ssim_matrix(a: np.ndarray, b: np.ndarray, *, data_range: float = 1.0) -> np.ndarray:
    """SSIM of every pair (a_i, b_j), shape (len(a), len(b)); identical images give exactly 1.

    The cross term sum_q w_pq a_q b_q at window position p is a weighted inner product, so each
    position is one matrix product over the window's pixels.
    """
    a, b = _check_pair(a, b)
    _, channels, height, width = a.shape
    size, sigma = ssim_window(height, width)
    window = gaussian_window(size, sigma)
    c1, c2 = _constants(data_range)
    total = np.zeros((len(a), len(b)))
    positions = [(i, j) for i in range(height - size + 1) for j in range(width - size + 1)]
    for c in range(channels):
        for i, j in positions:
            pa = a[:, c, i:i + size, j:j + size].reshape(len(a), -1)
            pb = b[:, c, i:i + size, j:j + size].reshape(len(b), -1)
            w = window.reshape(-1)
            mu_a, mu_b = pa @ w, pb @ w
            var_a, var_b = (pa**2) @ w - mu_a**2, (pb**2) @ w - mu_b**2
            cov = (pa * w) @ pb.T - np.outer(mu_a, mu_b)
            total += _ssim_map(mu_a[:, None], mu_b[None, :], var_a[:, None], var_b[None, :],
                               cov, c1, c2)
    result = total / (channels * len(positions))
    same = np.isinf(psnr_matrix(a, b))  # exact copies: snap rounding error to the exact value 1
    result[same] = 1.0
    return result


def cosine_matrix(fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of feature rows, shape (len(fa), len(fb))."""
    fa = np.asarray(fa, dtype=np.float64).reshape(len(fa), -1)
    fb = np.asarray(fb, dtype=np.float64).reshape(len(fb), -1)
    na = np.linalg.norm(fa, axis=1, keepdims=True)
    nb = np.linalg.norm(fb, axis=1, keepdims=True)
    if np.any(na == 0) or np.any(nb == 0):
        raise DataError("cosine similarity of a zero feature vector is undefined")
    return np.clip((fa / na) @ (fb / nb).T, -1.0, 1.0)


def subsampled_nearest(similarities: np.ndarray, *, size: int, repeats: int,
                       rng: np.random.Generator) -> np.ndarray:
    """Each query's best similarity within a random `size`-subset of the references.

    `similarities` is a queries x references matrix; the result has shape (repeats, queries).
    Nearest-neighbour similarity grows with the reference set, so comparisons between two sets
    subsample both to one size; a set of exactly `size` is used whole (repeats identical rows).
    """
    similarities = np.asarray(similarities, dtype=np.float64)
    n_ref = similarities.shape[1]
    if size < 1 or size > n_ref:
        raise ConfigError(f"subsample size must be in [1, {n_ref}], got {size}")
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    if size == n_ref:
        return np.repeat(similarities.max(axis=1)[None], repeats, axis=0)
    picks = [rng.choice(n_ref, size=size, replace=False) for _ in range(repeats)]
    return np.stack([similarities[:, p].max(axis=1) for p in picks])


def bootstrap_mean_ci(values: np.ndarray, *, level: float = 0.95, resamples: int = 2000,
                      rng: np.random.Generator) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of `values` (finite, 1-D)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise DataError("the bootstrap needs a non-empty array of finite values (cap PSNR first)")
    if not 0 < level < 1 or resamples < 1:
        raise ConfigError(f"need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    means = np.empty(resamples)
    chunk = max(1, 2**22 // values.size)  # bounded memory for large arrays
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, values.size, size=(stop - start, values.size))
        means[start:stop] = values[idx].mean(axis=1)
    tail = 50 * (1 - level)
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def histogram_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """A label-histogram estimate: mean probability per class, negatives clipped, renormalised.

    Noisy (DP) soft labels can dip below zero; a row of all non-positive mass gives uniform.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise DataError(f"need an N x classes array of soft labels, got {probs.shape}")
    mass = np.clip(probs.mean(axis=0), 0.0, None)
    total = mass.sum()
    if not math.isfinite(total):
        raise DataError("soft labels hold NaN or inf")
    return mass / total if total > 0 else np.full(probs.shape[1], 1.0 / probs.shape[1])


def total_variation_distance(p: np.ndarray, q: np.ndarray) -> float:
    """0.5 * sum |p - q| of two histograms, each normalised to sum 1 first (in [0, 1])."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise DataError(f"histograms need one 1-D shape, got {p.shape} and {q.shape}")
    if np.any(p < 0) or np.any(q < 0) or p.sum() <= 0 or q.sum() <= 0:
        raise DataError("histograms need non-negative counts with a positive total")
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())
