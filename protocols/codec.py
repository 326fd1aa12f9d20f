"""Fixed-point codec: float vectors <-> the ring Z_2^k, with clipping and an overflow budget."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, cast

import numpy as np

from protocols.errors import (
    MalformedMessageError,
    NonFiniteInputError,
    OverflowBudgetError,
    ParameterError,
)
from protocols.primitives import prg

__all__ = ["FixedPointCodec"]

Rounding = Literal["stochastic", "nearest"]
MIN_RING_BITS, MAX_RING_BITS = 8, 64
# 2^f must be a finite float32 so that scaling a float32 input is a single exact multiply.
MAX_SCALE_BITS = 126
_BLOCK = 1 << 15  # elements per encode block: 128-256 KiB temporaries


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _max_abs_encoded(clip: float | Fraction, scale_bits: int) -> int:
    """ceil(R * 2^f) + 1: the largest |encoding| of one clipped value, with a spare unit."""
    return math.ceil(Fraction(clip) * (1 << scale_bits)) + 1


def _fits(n: int, clip: float | Fraction, scale_bits: int, ring_bits: int) -> bool:
    return n * _max_abs_encoded(clip, scale_bits) <= (1 << (ring_bits - 1)) - 1


@dataclass(frozen=True)
class FixedPointCodec:
    """Encodes v in [-clip, clip] as round(v * 2^scale_bits) in two's complement mod 2^ring_bits."""

    clip: float
    scale_bits: int
    ring_bits: int = 32
    rounding: Rounding = "stochastic"
    prg: str = "aes-256-ctr"  # keystream of the stochastic-rounding dither (and the masks)

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip", _checked_clip(self.clip))
        _check_ring_bits(self.ring_bits)
        if not _is_int(self.scale_bits) or not 0 <= self.scale_bits <= MAX_SCALE_BITS:
            raise ParameterError(
                f"scale_bits must be an int in [0, {MAX_SCALE_BITS}], got {self.scale_bits!r}"
            )
        if self.rounding not in ("stochastic", "nearest"):
            raise ParameterError(
                f"rounding must be 'stochastic' or 'nearest', got {self.rounding!r}"
            )
        if self.prg not in prg.ALGORITHMS:
            raise ParameterError(f"prg must be one of {prg.ALGORITHMS}, got {self.prg!r}")
        self.check_budget(1)

    # ---- parameter choice -------------------------------------------------------------------

    @classmethod
    def for_clients(
        cls,
        n_clients: int,
        *,
        clip: float,
        ring_bits: int = 32,
        rounding: Rounding = "stochastic",
        scale_bits: int | None = None,
        headroom: float = 0.0,
        prg: str = "aes-256-ctr",
    ) -> FixedPointCodec:
        """Codec whose ring holds the sum of n_clients clipped inputs (None: largest scale_bits).

        `headroom` reserves room for values each client adds after encoding (distributed DP
        noise of magnitude at most `headroom`): the budget then holds n * (clip + headroom).
        """
        _check_n(n_clients)
        clip = _checked_clip(clip)
        room = _room(clip, headroom)
        _check_ring_bits(ring_bits)
        if scale_bits is None:
            scale_bits = _largest_scale_bits(n_clients, room, ring_bits)
            if scale_bits is None:
                raise _budget_error(n_clients, room, 0, ring_bits, headroom)
        elif _is_int(scale_bits) and scale_bits >= 0 and not _fits(
            n_clients, room, scale_bits, ring_bits
        ):
            raise _budget_error(n_clients, room, scale_bits, ring_bits, headroom)
        return cls(clip=clip, scale_bits=scale_bits, ring_bits=ring_bits, rounding=rounding,
                   prg=prg)

    def check_budget(self, n_clients: int, *, headroom: float = 0.0) -> None:
        """Raise OverflowBudgetError unless n * (ceil((R + headroom) 2^f) + 1) <= 2^(k-1) - 1."""
        # The signed sum of n encodings then lies in [-(2^(k-1) - 1), 2^(k-1) - 1], so the ring
        # sum decodes without wrapping. |encoding| <= ceil(R 2^f) already holds for both
        # roundings; the +1 is a spare unit. With headroom H, an encoding plus integer noise of
        # at most ceil(H 2^f) stays within ceil(R 2^f) + ceil(H 2^f) <= ceil((R + H) 2^f) + 1.
        _check_n(n_clients)
        room = _room(self.clip, headroom)
        if not _fits(n_clients, room, self.scale_bits, self.ring_bits):
            raise _budget_error(n_clients, room, self.scale_bits, self.ring_bits, headroom)

    def noise_units(self, headroom: float) -> int:
        """ceil(headroom * 2^f): the largest |integer noise| a client may add within headroom."""
        return math.ceil(Fraction(_checked_headroom(headroom)) * (1 << self.scale_bits))

    def max_clients(self) -> int:
        """Largest number of clients whose clipped inputs always sum without wrapping."""
        return ((1 << (self.ring_bits - 1)) - 1) // _max_abs_encoded(self.clip, self.scale_bits)

    def error_bound(self, n_summed: int) -> float:
        """Max |decoded sum - exact sum of the n clipped inputs|.

        Each element rounds by at most 2^-(f+1) (nearest) or strictly less than 2^-f (stochastic),
        so n elements give n * 2^-(f+1) or n * 2^-f. When the integer sum can exceed 2^53
        (ring_bits > 54), converting it to float64 adds up to 2^-53 of its largest magnitude.
        """
        _check_n(n_summed)
        quantum = math.ldexp(1.0, -self.scale_bits)
        per_element = quantum / 2 if self.rounding == "nearest" else quantum
        bound = n_summed * per_element
        largest = n_summed * _max_abs_encoded(self.clip, self.scale_bits)
        if largest > 1 << 53:
            bound += math.ldexp(largest, -53 - self.scale_bits)
        return bound

    # ---- ring ---------------------------------------------------------------------------------

    @property
    def dtype(self) -> np.dtype:
        """Ring element dtype: uint32 for ring_bits <= 32, else uint64."""
        return np.dtype(np.uint32 if self.ring_bits <= 32 else np.uint64)

    @property
    def modulus(self) -> int:
        """2^ring_bits."""
        return 1 << self.ring_bits

    @property
    def mask(self) -> int:
        """2^ring_bits - 1."""
        return (1 << self.ring_bits) - 1

    def _reduce(self, values: np.ndarray) -> np.ndarray:
        if self.ring_bits not in (32, 64):
            np.bitwise_and(values, self.dtype.type(self.mask), out=values)
        return values

    def _check_ring(self, values: np.ndarray, name: str) -> None:
        if not isinstance(values, np.ndarray) or values.dtype != self.dtype:
            raise ParameterError(f"{name} must be a numpy array of dtype {self.dtype}")

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(a + b) mod 2^k, as a new array."""
        self._check_ring(a, "a")
        self._check_ring(b, "b")
        return self._reduce(np.add(a, b))

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(a - b) mod 2^k, as a new array."""
        self._check_ring(a, "a")
        self._check_ring(b, "b")
        return self._reduce(np.subtract(a, b))

    def sum(self, arrays: Iterable[np.ndarray]) -> np.ndarray:
        """Ring sum of one or more equally shaped ring vectors."""
        total = None
        for i, a in enumerate(arrays):
            self._check_ring(a, f"arrays[{i}]")
            if total is None:
                total = a.copy()
            elif a.shape != total.shape:
                raise ParameterError(f"arrays[{i}] has shape {a.shape}, expected {total.shape}")
            else:
                np.add(total, a, out=total)
        if total is None:
            raise ParameterError("sum needs at least one array")
        return self._reduce(total)

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, x: np.ndarray, *, rounding_key: bytes | None = None) -> np.ndarray:
        """Clip, scale and round x (any shape; float16/32/64) into a flat ring vector (C order).

        Stochastic rounding takes element i's uniform from keystream word i of the session's PRG
        keyed by rounding_key (fresh random if None; never reuse a key for two vectors). The
        result is always floor or ceil of x * 2^f, and its mean is within 2^-22 (float32 work)
        or 2^-31 (float64 work) of a quantum of x * 2^f: unbiased up to the uniforms' resolution.
        float16/32 inputs are processed in float32 when clip is a float32 value (e.g. 1.0, 0.5),
        else in float64, so that clipping stays exact.
        """
        x = np.asarray(x)
        if x.dtype.kind != "f" or x.dtype.itemsize > 8:
            raise ParameterError(f"encode takes float16/32/64 arrays, got dtype {x.dtype}")
        flat = x.reshape(-1)
        out = np.empty(flat.size, dtype=np.int32 if self.ring_bits <= 32 else np.int64)
        # float32 scaling by 2^f, floor, frac and rint are exact; clipping is exact iff R is a
        # float32.
        f32_ok = x.dtype.itemsize <= 4 and float(np.float32(self.clip)) == self.clip
        work = np.float32 if f32_ok else np.float64
        scale = work(math.ldexp(1.0, self.scale_bits))
        limit = work(math.ldexp(self.clip, self.scale_bits))
        words = None
        if self.rounding == "stochastic":
            key = os.urandom(prg.KEY_BYTES) if rounding_key is None else rounding_key
            words = prg.uniform_word_blocks(key, flat.size, ring_bits=32, block=_BLOCK,
                                            algorithm=self.prg)
        scratch = _Scratch(min(_BLOCK, flat.size), work)
        # Blocks keep every temporary in L1/L2; the loop runs over blocks, never over elements.
        for start in range(0, flat.size, _BLOCK):
            stop = min(start + _BLOCK, flat.size)
            block = flat[start:stop]
            with np.errstate(over="ignore"):  # a huge float32 may become inf; clipped below
                s = np.multiply(block, scale, out=scratch.scaled[: stop - start])
            # min/max propagate NaN; an inf is an input inf or a huge value overflowing float32.
            low, high = float(s.min()), float(s.max())
            if not (math.isfinite(low) and math.isfinite(high)) and not np.isfinite(block).all():
                _raise_non_finite(flat)
            if high > limit or low < -limit:
                np.clip(s, -limit, limit, out=s)
            if words is None:
                np.rint(s, out=s)  # ties to even; |error| <= 1/2 either way
                np.copyto(out[start:stop], s, casting="unsafe")
            else:
                _round_stochastically(s, next(words), scratch, out[start:stop])
        # |q| <= ceil(R 2^f) < 2^(k-1), so every cast above was exact; the unsigned view of the
        # two's complement integers is their residue mod 2^32 / 2^64.
        return self._reduce(out.view(self.dtype))

    def decode_sum(self, ring_sum: np.ndarray, *, n_summed: int) -> np.ndarray:
        """Signed two's complement reading of a ring sum of n_summed encodings, / 2^f (float64)."""
        self.check_budget(n_summed)
        signed = self.signed(ring_sum, "ring_sum")
        return cast(np.ndarray, np.multiply(signed, math.ldexp(1.0, -self.scale_bits)))

    def signed(self, ring: np.ndarray, name: str = "ring") -> np.ndarray:
        """Two's complement reading of ring elements (int32 up to 32 ring bits, else int64)."""
        self._check_ring(ring, name)
        k = self.ring_bits
        if k in (32, 64):
            return ring.view(np.int32 if k == 32 else np.int64)
        if np.any(ring > self.mask):
            raise MalformedMessageError(f"{name} holds values >= 2^{k}")
        # shift the k-bit value to the top, then an arithmetic shift back sign-extends it.
        width = 8 * self.dtype.itemsize
        stype = np.int32 if width == 32 else np.int64
        return cast(np.ndarray, np.left_shift(ring, width - k).view(stype) >> (width - k))


def _checked_clip(clip: float) -> float:
    if isinstance(clip, bool) or not isinstance(clip, (int, float)):
        raise ParameterError(f"clip must be a positive finite float, got {clip!r}")
    if not (math.isfinite(clip) and clip > 0):
        raise ParameterError(f"clip must be a positive finite float, got {clip!r}")
    return float(clip)


def _room(clip: float, headroom: float) -> Fraction:
    """clip + headroom, exactly: a float sum may round down, and at 64 bits one unit matters."""
    return Fraction(clip) + Fraction(_checked_headroom(headroom))


def _checked_headroom(headroom: float) -> float:
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)):
        raise ParameterError(f"headroom must be a finite float >= 0, got {headroom!r}")
    if not (math.isfinite(headroom) and headroom >= 0):
        raise ParameterError(f"headroom must be a finite float >= 0, got {headroom!r}")
    return float(headroom)


def _check_ring_bits(ring_bits: int) -> None:
    if not _is_int(ring_bits) or not MIN_RING_BITS <= ring_bits <= MAX_RING_BITS:
        raise ParameterError(
            f"ring_bits must be an int in [{MIN_RING_BITS}, {MAX_RING_BITS}], got {ring_bits!r}"
        )


def _check_n(n: int) -> None:
    if not _is_int(n) or n < 1:
        raise ParameterError(f"the number of clients must be an int >= 1, got {n!r}")


class _Scratch:
    """Per-call temporaries of one encode block."""

    def __init__(self, size: int, work: type) -> None:
        self.scaled: np.ndarray = np.empty(size, dtype=work)
        self.floor: np.ndarray = np.empty(size, dtype=work)
        self.up = np.empty(size, dtype=bool)
        self.uniform = np.empty(size, dtype=np.float64) if work is np.float64 else None


def _round_stochastically(
    s: np.ndarray, words: np.ndarray, scratch: _Scratch, out: np.ndarray
) -> None:
    """out <- floor(s) + [u < frac(s)], u uniform in [0, 1) from the keystream words."""
    m = s.size
    floor = np.floor(s, out=scratch.floor[:m])
    # s - floor(s) is exact except for negative |s| < 1/2, where it is rounded to a multiple of
    # 2^-24 (2^-53 in float64): an error below the uniforms' resolution.
    frac = np.subtract(s, floor, out=s)
    if s.dtype == np.float32:
        # 23 random mantissa bits under the exponent of 1.0 give a uniform in [1, 2); minus 1.
        np.right_shift(words, 9, out=words)
        np.bitwise_or(words, np.uint32(0x3F800000), out=words)
        u = np.subtract(words.view(np.float32), np.float32(1.0), out=words.view(np.float32))
    else:
        # a float64 block: _Scratch made `uniform` for it
        u = np.multiply(words, 2.0**-32, out=cast(np.ndarray, scratch.uniform)[:m])
    up = np.less(u, frac, out=scratch.up[:m])
    np.copyto(out, floor, casting="unsafe")
    np.add(out, up, out=out)


def _raise_non_finite(flat: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(flat))
    raise NonFiniteInputError(
        f"input holds {bad.size} non-finite value(s) (NaN or inf); the first at index {bad[0]}"
    )


def _largest_scale_bits(n: int, clip: float | Fraction, ring_bits: int) -> int | None:
    """Largest f <= MAX_SCALE_BITS with n * (ceil(R 2^f) + 1) <= 2^(k-1) - 1, or None."""
    if not _fits(n, clip, 0, ring_bits):
        return None
    lo, hi = 0, MAX_SCALE_BITS  # fits(f) is monotone in f: binary search
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(n, clip, mid, ring_bits):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _budget_error(n: int, clip: float | Fraction, scale_bits: int, ring_bits: int,
                  headroom: float = 0.0) -> OverflowBudgetError:
    """The refusal, with what would fit instead (`clip` includes any noise `headroom`)."""
    limit = (1 << (ring_bits - 1)) - 1
    per_client = _max_abs_encoded(clip, scale_bits)
    advice = [f"at most {limit // per_client} clients fit at scale_bits={scale_bits}"]
    best = _largest_scale_bits(n, clip, ring_bits)
    if best is not None:
        advice.append(f"scale_bits <= {best} fits {n} clients")
    wider = next(
        (k for k in range(ring_bits + 1, MAX_RING_BITS + 1) if _fits(n, clip, scale_bits, k)), None
    )
    if wider is not None:
        advice.append(f"ring_bits >= {wider} fits them at scale_bits={scale_bits}")
    return OverflowBudgetError(
        f"the sum of n={n} clipped inputs can wrap with clip={float(clip)}"
        + (f" (including {headroom:g} of noise headroom)" if headroom else "")
        + f", scale_bits={scale_bits}, "
        f"ring_bits={ring_bits}: n * (ceil(clip * 2^scale_bits) + 1) = {n * per_client} "
        f"exceeds 2^{ring_bits - 1} - 1 = {limit}; " + "; ".join(advice)
    )
