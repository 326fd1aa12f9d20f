"""Differential-privacy mechanisms for aggregated sums: L2 clipping and noise (no accounting).

Client-level Gaussian mechanism on a sum of vectors clipped to L2 norm C: the release carries
noise of standard deviation z*C per coordinate. `central`: the server adds N(0, (zC)^2) to the
decoded float sum. `distributed`: every client adds integer noise (discrete Gaussian or Skellam)
to its fixed-point encoding before masking, sized so that any `min_contributors` of them together
carry the central variance. All randomness comes from the AES-256-CTR keystream (docs/privacy.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np

from protocols.dp.samplers import (
    MAX_SIGMA_UNITS,
    MIN_SIGMA_UNITS,
    _check_size,
    _discrete_gaussian,
    _log_tail,
    _skellam,
    _tau,
    _Uniforms,
    discrete_gaussian,
    gaussian,
    skellam,
)
from protocols.errors import ParameterError, TooFewSurvivorsError

__all__ = [
    "DEFAULT_TAIL_BITS",
    "MAX_SIGMA_UNITS",
    "MAX_TAIL_BITS",
    "MIN_SIGMA_UNITS",
    "MIN_TAIL_BITS",
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
DEFAULT_TAIL_BITS = 100
MIN_TAIL_BITS, MAX_TAIL_BITS = 20, 200


def _check_tail_bits(tail_bits: int) -> int:
    if isinstance(tail_bits, bool) or not isinstance(tail_bits, int) or not (
        MIN_TAIL_BITS <= tail_bits <= MAX_TAIL_BITS
    ):
        raise ParameterError(f"tail_bits must be an int in [{MIN_TAIL_BITS}, {MAX_TAIL_BITS}], "
                             f"got {tail_bits!r}")
    return tail_bits


@dataclass(frozen=True, kw_only=True)
class DPSpec:
    """Client-level Gaussian mechanism: clip to l2_clip, released sum carries N(0, (z C)^2)."""

    mode: Mode
    noise_multiplier: float
    l2_clip: float
    noise: NoiseKind | None = None  # central: "gaussian"; distributed: "skellam" by default
    min_contributors: int | None = None  # distributed: the fewest clients ever summed
    # distributed: each draw's truncated tail has probability <= 2^-tail_bits (see
    # DistributedNoise); a long run at large epsilon needs more bits for its delta to hold
    tail_bits: int = DEFAULT_TAIL_BITS

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
        _check_tail_bits(self.tail_bits)

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


class DistributedNoise:
    """One client's share of distributed noise; implements protocols.session.RingNoise.

    Each client adds integer noise of variance (z C 2^f)^2 / min_contributors to its encoding,
    conditioned on |noise| <= floor(headroom 2^f) so the codec budget (n * (clip + headroom))
    can never be exceeded. The conditioning changes each draw by total variation at most
    `tail_probability(f)` (< 2^-tail_bits), which docs/privacy.md folds into delta.
    """

    def __init__(self, spec: DPSpec, *, tail_bits: int | None = None,
                 key: bytes | None = None) -> None:
        if spec.mode != "distributed":
            raise ParameterError("DistributedNoise needs a spec with mode='distributed'")
        tail_bits = _check_tail_bits(spec.tail_bits if tail_bits is None else tail_bits)
        self.spec, self.tail_bits = spec, tail_bits
        self._stream = _Uniforms(key)  # one stream, consumed forward: no draw is ever reused
        assert spec.min_contributors is not None
        assert spec.noise is not None  # DPSpec.__post_init__ fills in the default
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
        assert self.spec.noise is not None
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
    noise = gaussian(spec.central_sigma, total.size, key=key).reshape(total.shape)
    return cast(np.ndarray, total + noise)


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
