"""Noise samplers for protocols.dp, all fed by the AES-256-CTR keystream (never numpy's RNGs).

Gaussian (Box-Muller), discrete Gaussian (Canonne-Kamath-Steinke rejection) and Skellam
(difference of Poissons), vectorised; plus the tail bounds the ring headroom is sized from.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import cast

import numpy as np

from protocols.errors import ParameterError
from protocols.primitives import prg

# Samplers work in float64: above 2^40 units the geometric/PTRS arithmetic loses exactness, and
# below 16 units the Skellam tail bound used for the headroom no longer holds (see _tau).
MAX_SIGMA_UNITS = float(2**40)
MIN_SIGMA_UNITS = 16.0

# ---- cryptographic uniforms -----------------------------------------------------------------


class _Uniforms:
    """Consecutive, never repeated segments of one AES-256-CTR keystream read as uniforms."""

    def __init__(self, key: bytes | None) -> None:
        self._key = os.urandom(prg.KEY_BYTES) if key is None else key
        if not isinstance(self._key, (bytes, bytearray)) or len(self._key) != prg.KEY_BYTES:
            raise ParameterError(f"noise key must be {prg.KEY_BYTES} bytes")
        self._block = 0  # next unused 16-byte counter block

    def words(self, n: int) -> np.ndarray:
        out = prg.uniform_ring(self._key, n, ring_bits=64,
                               nonce=self._block.to_bytes(prg.NONCE_BYTES, "big"))
        self._block += -(-8 * n // 16)
        return out

    def open01(self, n: int) -> np.ndarray:
        """Uniforms on the grid (i + 1/2) 2^-52, i < 2^52: exact, strictly inside (0, 1)."""
        # int64 -> float64 converts faster than uint64 -> float64; both are exact below 2^53.
        return ((self.words(n) >> np.uint64(12)).view(np.int64).astype(np.float64) + 0.5) * 2.0**-52

    def dense01(self, n: int) -> np.ndarray:
        """Uniforms in (0, 1] with 53 significant bits down to 2^-63 (for -log u tails)."""
        return ((self.words(n) >> np.uint64(1)) | np.uint64(1)).view(np.int64).astype(
            np.float64) * 2.0**-63


def _rejection(size: int, propose: Callable[[int], tuple[np.ndarray, np.ndarray]],
               rate: float) -> np.ndarray:
    """size accepted int64 draws; propose(m) returns (values, accepted) for m proposals."""
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:  # loops over batches (about 2 for these rates), never over elements
        need = size - filled
        values, ok = propose(int(need / rate * 1.05) + 32)
        got = values[ok][:need]
        out[filled : filled + got.size] = got
        filled += got.size
    return out


def _check_sigma(sigma: float, name: str = "sigma") -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (
        math.isfinite(sigma) and 0 < sigma <= MAX_SIGMA_UNITS
    ):
        raise ParameterError(f"{name} must be in (0, 2^40], got {sigma!r}")
    return float(sigma)


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ParameterError(f"size must be a non-negative int, got {size!r}")


# ---- samplers -------------------------------------------------------------------------------


def uniform(size: int, *, key: bytes | None = None) -> np.ndarray:
    """size uniforms strictly inside (0, 1) (float64, on the 2^-52 grid) from the keystream."""
    _check_size(size)
    return _Uniforms(key).open01(size)


def gaussian(sigma: float, size: int, *, key: bytes | None = None) -> np.ndarray:
    """size draws of N(0, sigma^2), float64, by Box-Muller on keystream uniforms."""
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ParameterError(f"sigma must be a finite number > 0, got {sigma!r}")
    _check_size(size)
    stream, half = _Uniforms(key), -(-size // 2)
    radius = np.sqrt(-2.0 * np.log(stream.dense01(half)))
    angle = (2.0 * math.pi) * stream.open01(half)
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size] * sigma


def _discrete_gaussian(sigma: float, size: int, stream: _Uniforms, bound: int) -> np.ndarray:
    # Canonne-Kamath-Steinke 2020, Alg. 3: discrete Laplace proposal with scale t = floor(s)+1,
    # accepted with prob exp(-(|y| - s^2/t)^2 / (2 s^2)). Discrete Laplace = G1 - G2 with
    # G ~ Geometric(1 - e^(-1/t)) by inversion: floor(-t log u), P(G >= k) = e^(-k/t).
    t = math.floor(sigma) + 1.0

    def propose(m: int) -> tuple[np.ndarray, np.ndarray]:
        g = np.floor(-t * np.log(stream.dense01(2 * m)))
        y = g[:m] - g[m:]
        accept = stream.open01(m) < np.exp(-((np.abs(y) - sigma * sigma / t) ** 2)
                                           / (2.0 * sigma * sigma))
        return y.astype(np.int64), accept & (np.abs(y) <= bound)

    return _rejection(size, propose, 0.5)


def discrete_gaussian(sigma: float, size: int, *, key: bytes | None = None,
                      bound: int | None = None) -> np.ndarray:
    """size draws of N_Z(0, sigma^2) (int64), optionally conditioned on |x| <= bound."""
    sigma = _check_sigma(sigma)
    _check_size(size)
    return _discrete_gaussian(sigma, size, _Uniforms(key), _checked_bound(bound))


_SMALL_LAMBDA = 10.0
_LOG_FACT = np.array([math.lgamma(k + 1.0) for k in range(64)])


def _log_poisson_pmf(k: np.ndarray, lam: float, x: np.ndarray) -> np.ndarray:
    """log P(Poisson(lam) = k) for k >= 0, with x = (k - lam) / lam computed without cancellation.

    log p = -lam * phi(x) - log(2 pi k)/2 - r(k), phi(x) = (1+x) log1p(x) - x, r = Stirling's
    remainder of log k! (three terms: error < 1/(1680 k^7) < 2^-52 for k >= 64); small k use a
    table.
    """
    small = np.abs(x) < 1e-2
    # phi(x) = sum_{m>=2} (-1)^m x^m / (m (m-1)), by Horner; truncation error < |x|^11 / 110.
    series = np.zeros_like(x)
    for m in range(10, 1, -1):
        series = (series + (-1) ** m / (m * (m - 1))) * x
    series *= x
    xb = np.where(small | (k < 64), 0.0, x)  # x > -1 wherever k >= 64
    phi = np.where(small, series, (1.0 + xb) * np.log1p(xb) - xb)
    kk = np.maximum(k, 64.0)
    remainder = 1.0 / (12.0 * kk) - 1.0 / (360.0 * kk**3) + 1.0 / (1260.0 * kk**5)
    big = -lam * phi - 0.5 * np.log(2.0 * math.pi * kk) - remainder
    ks = np.clip(k, 0, 63).astype(np.int64)
    tiny = ks * math.log(lam) - lam - _LOG_FACT[ks]
    return cast(np.ndarray, np.where(k >= 64, big, tiny))


def _poisson_offsets(lam: float, size: int, stream: _Uniforms) -> np.ndarray:
    """size draws of K - floor(lam), K ~ Poisson(lam), exact offsets even for huge lam."""
    base = math.floor(lam)
    if lam < _SMALL_LAMBDA:  # inversion on a 100-term table; P(K > 100) < 2^-190 here
        log_pmf = [k * math.log(lam) - lam - math.lgamma(k + 1.0) for k in range(101)]
        cdf = np.cumsum(np.exp(log_pmf))
        k = np.minimum(np.searchsorted(cdf, stream.open01(size), side="right"), 100)
        return k.astype(np.int64) - base
    # Hoermann 1993 (PTRS) with its published constants, valid for lam >= 10; the proposal is
    # formed around frac(lam) so that huge lam keeps full integer precision in the offset.
    frac = lam - base
    b = 0.931 + 2.53 * math.sqrt(lam)
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    v_r = 0.9277 - 3.6224 / (b - 2.0)

    def propose(m: int) -> tuple[np.ndarray, np.ndarray]:
        u = stream.open01(m) - 0.5
        v = stream.open01(m)
        us = 0.5 - np.abs(u)
        j = np.floor((2.0 * a / us + b) * u + frac + 0.43)
        k = j + base
        accept = (us >= 0.07) & (v <= v_r)
        # The full test only for the ~12% the squeeze neither accepts nor rejects outright.
        test = np.flatnonzero(~accept & (k >= 0) & ((us >= 0.013) | (v <= us)))
        ut, vt, jt = us[test], v[test], j[test]
        lhs = np.log(vt * inv_alpha / (a / (ut * ut) + b))
        accept[test] = lhs <= _log_poisson_pmf(jt + base, lam, (jt - frac) / lam)
        return j.astype(np.int64), accept

    return _rejection(size, propose, 0.85)


def _skellam(variance: float, size: int, stream: _Uniforms, bound: int) -> np.ndarray:
    lam = variance / 2.0
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:  # conditioning on |x| <= bound; one pass except with prob ~2^-100
        need = size - filled
        x = _poisson_offsets(lam, need, stream) - _poisson_offsets(lam, need, stream)
        x = x[np.abs(x) <= bound]
        out[filled : filled + x.size] = x
        filled += x.size
    return out


def skellam(variance: float, size: int, *, key: bytes | None = None,
            bound: int | None = None) -> np.ndarray:
    """size draws of Poisson(v/2) - Poisson(v/2) (int64, variance v), optionally |x| <= bound."""
    if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not (
        math.isfinite(variance) and 0 < variance <= MAX_SIGMA_UNITS**2
    ):
        raise ParameterError(f"variance must be in (0, 2^80], got {variance!r}")
    _check_size(size)
    return _skellam(variance, size, _Uniforms(key), _checked_bound(bound))


def _checked_bound(bound: int | None) -> int:
    if bound is None:
        return 2**62
    if isinstance(bound, bool) or not isinstance(bound, int) or bound < 0:
        raise ParameterError(f"bound must be a non-negative int, got {bound!r}")
    return bound


# ---- tails and the ring ---------------------------------------------------------------------


def _log_tail(kind: str, sigma: float, u: float) -> float:
    """log of an upper bound on P(|X| >= u), u > 0, for the noise of standard deviation sigma."""
    if kind == "discrete_gaussian":  # N_Z(0, s^2) is s^2-sub-Gaussian (CKS 2020)
        return math.log(2.0) - u * u / (2.0 * sigma * sigma)
    # Skellam, variance V: E e^(sX) = exp(V (cosh s - 1)); Chernoff at the optimal s.
    v = sigma * sigma
    r = u / v
    # sqrt(1 + r^2) - 1 written as r^2 / (sqrt(1 + r^2) + 1): no cancellation for tiny r.
    return math.log(2.0) - v * (r * math.asinh(r) - r * r / (math.sqrt(1.0 + r * r) + 1.0))


def _tau(kind: str, tail_bits: int) -> float:
    """tau with P(|X| > tau * sigma) <= 2^-tail_bits for every sigma >= MIN_SIGMA_UNITS.

    The Skellam Chernoff exponent grows with sigma at fixed tau, so sigma = MIN_SIGMA_UNITS is
    the worst case; the sub-Gaussian bound does not depend on sigma.
    """
    target = -tail_bits * math.log(2.0)
    lo, hi = 0.0, 4.0 * math.sqrt(tail_bits) + 8.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _log_tail(kind, MIN_SIGMA_UNITS, mid * MIN_SIGMA_UNITS) <= target:
            hi = mid
        else:
            lo = mid
    return hi
