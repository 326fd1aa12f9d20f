"""Differential-privacy mechanisms for aggregated sums: L2 clipping and noise (no accounting).

Client-level Gaussian mechanism on a sum of vectors clipped to L2 norm C: the release carries
noise of standard deviation z*C per coordinate. `central`: the server adds N(0, (zC)^2) to the
decoded float sum. `distributed`: every client adds integer noise (discrete Gaussian or Skellam)
to its fixed-point encoding before masking, sized so that any `min_contributors` of them together
carry the central variance. All randomness comes from the AES-256-CTR keystream (docs/privacy.md).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from protocols.errors import ParameterError, TooFewSurvivorsError
from protocols.primitives import prg

__all__ = [
    "MAX_SIGMA_UNITS",
    "MIN_SIGMA_UNITS",
    "DPSpec",
    "DistributedNoise",
    "accounting_noise_multiplier",
    "add_central_noise",
    "check_contributors",
    "clip_l2",
    "discrete_gaussian",
    "gaussian",
    "skellam",
]

Mode = Literal["central", "distributed"]
NoiseKind = Literal["gaussian", "discrete_gaussian", "skellam"]
# Samplers work in float64: above 2^40 units the geometric/PTRS arithmetic loses exactness, and
# below 16 units the Skellam tail bound used for the headroom no longer holds (see _tau).
MAX_SIGMA_UNITS = float(2**40)
MIN_SIGMA_UNITS = 16.0
DEFAULT_TAIL_BITS = 100


@dataclass(frozen=True, kw_only=True)
class DPSpec:
    """Client-level Gaussian mechanism: clip to l2_clip, released sum carries N(0, (z C)^2)."""

    mode: Mode
    noise_multiplier: float
    l2_clip: float
    noise: NoiseKind | None = None  # central: "gaussian"; distributed: "skellam" by default
    min_contributors: int | None = None  # distributed: the fewest clients ever summed

    def __post_init__(self) -> None:
        if self.mode not in ("central", "distributed"):
            raise ParameterError(f"mode must be 'central' or 'distributed', got {self.mode!r}")
        for name in ("noise_multiplier", "l2_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0
            ):
                raise ParameterError(f"{name} must be a finite number > 0, got {value!r}")
        noise = self.noise or ("gaussian" if self.mode == "central" else "skellam")
        allowed = ("gaussian",) if self.mode == "central" else ("discrete_gaussian", "skellam")
        if noise not in allowed:
            raise ParameterError(f"noise for mode {self.mode!r} must be one of {allowed}, "
                                 f"got {self.noise!r}")
        object.__setattr__(self, "noise", noise)
        t = self.min_contributors
        if self.mode == "distributed" and t is None:
            raise ParameterError("min_contributors is required in distributed mode: the fewest "
                                 "clients whose sum the server can ever unmask")
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ParameterError(f"min_contributors must be an int >= 1, got {t!r}")

    @property
    def central_sigma(self) -> float:
        """Standard deviation z*C of the noise on the released sum (value units)."""
        return self.noise_multiplier * self.l2_clip


def clip_l2(vector: np.ndarray, max_norm: float) -> tuple[np.ndarray, bool]:
    """A flat copy of vector scaled to L2 norm <= max_norm (same dtype), and whether it was."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not (
        math.isfinite(max_norm) and max_norm > 0
    ):
        raise ParameterError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    v = np.asarray(vector)
    if v.dtype.kind != "f":
        raise ParameterError(f"clip_l2 takes a float array, got dtype {v.dtype}")
    flat = v.reshape(-1)
    norm = float(np.linalg.norm(flat.astype(np.float64)))
    if not math.isfinite(norm):
        raise ParameterError("clip_l2 input holds NaN or inf")
    if norm <= max_norm:
        return flat.copy(), False
    # A margin above the rounding of the scaled copy (4 eps of its dtype) and of the float64
    # norm keeps the result's norm <= max_norm.
    margin = max(4.0 * float(np.finfo(flat.dtype).eps), 2.0**-40)
    factor = max_norm / norm * (1.0 - margin)
    return (flat.astype(np.float64) * factor).astype(flat.dtype), True


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


def _rejection(size: int, propose, rate: float) -> np.ndarray:
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
    return np.where(k >= 64, big, tiny)


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


class DistributedNoise:
    """One client's share of distributed noise; implements protocols.secagg.client.RingNoise.

    Each client adds integer noise of variance (z C 2^f)^2 / min_contributors to its encoding,
    conditioned on |noise| <= floor(headroom 2^f) so the codec budget (n * (clip + headroom))
    can never be exceeded. The conditioning changes each draw by total variation at most
    `tail_probability(f)` (< 2^-tail_bits), which docs/privacy.md folds into delta.
    """

    def __init__(self, spec: DPSpec, *, tail_bits: int = DEFAULT_TAIL_BITS,
                 key: bytes | None = None) -> None:
        if spec.mode != "distributed":
            raise ParameterError("DistributedNoise needs a spec with mode='distributed'")
        if isinstance(tail_bits, bool) or not isinstance(tail_bits, int) or not (
            20 <= tail_bits <= 200
        ):
            raise ParameterError(f"tail_bits must be an int in [20, 200], got {tail_bits!r}")
        self.spec, self.tail_bits = spec, tail_bits
        self._stream = _Uniforms(key)  # one stream, consumed forward: no draw is ever reused
        assert spec.min_contributors is not None
        self.local_sigma = spec.central_sigma / math.sqrt(spec.min_contributors)  # value units
        self.headroom = _tau(spec.noise, tail_bits) * self.local_sigma

    def sigma_units(self, scale_bits: int) -> float:
        """Per-client noise standard deviation in fixed-point units: z C 2^f / sqrt(t)."""
        sigma = math.ldexp(self.local_sigma, scale_bits)
        if not MIN_SIGMA_UNITS <= sigma <= MAX_SIGMA_UNITS:
            raise ParameterError(
                f"local noise sigma is {sigma:.4g} fixed-point units at scale_bits={scale_bits}; "
                f"it must lie in [{MIN_SIGMA_UNITS:g}, 2^40]: choose scale_bits accordingly")
        return sigma

    def bound_units(self, scale_bits: int) -> int:
        """floor(headroom 2^f): the largest |noise| a client adds (<= the codec's noise_units)."""
        return math.floor(math.ldexp(self.headroom, scale_bits))

    def tail_probability(self, scale_bits: int) -> float:
        """Upper bound on P(|untruncated draw| > bound_units): the TV cost of one draw."""
        sigma = self.sigma_units(scale_bits)
        return math.exp(_log_tail(self.spec.noise, sigma, self.bound_units(scale_bits) + 1.0))

    def sample(self, length: int, scale_bits: int) -> np.ndarray:
        """length int64 noise values in fixed-point units for an encoding at scale_bits."""
        _check_size(length)
        sigma, bound = self.sigma_units(scale_bits), self.bound_units(scale_bits)
        if self.spec.noise == "discrete_gaussian":
            return _discrete_gaussian(sigma, length, self._stream, bound)
        return _skellam(sigma * sigma, length, self._stream, bound)


def add_central_noise(decoded_sum: np.ndarray, spec: DPSpec, *,
                      key: bytes | None = None) -> np.ndarray:
    """decoded_sum + N(0, (z C)^2) per coordinate (float64): the server's step in central mode."""
    if spec.mode != "central":
        raise ParameterError("add_central_noise needs a spec with mode='central'")
    total = np.asarray(decoded_sum, dtype=np.float64)
    return total + gaussian(spec.central_sigma, total.size, key=key).reshape(total.shape)


def check_contributors(spec: DPSpec, n_summed: int) -> None:
    """Raise TooFewSurvivorsError if a distributed-noise sum holds fewer than t contributions."""
    if spec.mode == "distributed" and n_summed < (spec.min_contributors or 1):
        raise TooFewSurvivorsError(needed=spec.min_contributors or 1, remaining=n_summed,
                                   context="distributed DP noise")


def accounting_noise_multiplier(spec: DPSpec, *, dim: int, scale_bits: int | None) -> float:
    """The Gaussian noise multiplier to give an RDP accountant (q = 1) for one release.

    Rounding to the 2^-f grid moves each coordinate by < 1 unit, so the L2 sensitivity is
    D2 = C 2^f + sqrt(d) units (L1: D1 <= sqrt(d) D2); scale_bits=None means no rounding (plain
    float sums). Central: z C / (C + sqrt(d) 2^-f). Distributed, sum of >= t shares:
    discrete Gaussian (Kairouz et al. 2021, Prop. 14, third term): 1 / (D2 / s_t + sqrt(d) tau);
    Skellam (Agarwal et al. 2021): RDP(a) <= a D2^2/(2V) + 3 D1/(2V) <= a (D2^2 + 3 D1)/(2V) for
    integer a >= 1, i.e. s_t / sqrt(D2^2 + 3 D1) (use integer RDP orders with it).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ParameterError(f"dim must be a positive int, got {dim!r}")
    z, c = spec.noise_multiplier, spec.l2_clip
    if scale_bits is None:
        if spec.mode == "distributed":
            raise ParameterError("distributed noise lives on the fixed-point grid: give scale_bits")
        return z
    rounding = math.sqrt(dim)
    if spec.mode == "central":
        return z * c / (c + math.ldexp(rounding, -scale_bits))
    t = spec.min_contributors or 1
    total_sigma = math.ldexp(spec.central_sigma, scale_bits)  # of any sum of >= t shares
    local = total_sigma / math.sqrt(t)
    d2 = math.ldexp(c, scale_bits) + rounding
    if spec.noise == "discrete_gaussian":
        tau = 10.0 * sum(math.exp(-2.0 * math.pi**2 * local**2 * k / (k + 1)) for k in range(1, t))
        return 1.0 / (d2 / total_sigma + rounding * tau)
    d1 = rounding * d2
    return total_sigma / math.sqrt(d2 * d2 + 3.0 * d1)
