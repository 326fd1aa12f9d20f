"""Slot packing for Paillier: many bounded signed integers per plaintext, sums without carries.

Each value v in [-V, V] is stored offset as u = v + V in [0, 2V] in a slot of
    slot_bits = bitlen(2V) + ceil(log2 n) + guard_bits
bits, slot 0 in the lowest bits. The sum of n such slots is at most 2nV < 2^slot_bits, so adding
n packed plaintexts never carries from one slot into the next, and the packed sum stays below
2^(slots * slot_bits) <= 2^plaintext_bits < N (no wrap mod the Paillier modulus). Whoever unpacks
a sum of k uploads subtracts k * V from each slot. Unused slots of the last plaintext hold u = 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import IntegrityError, MalformedMessageError, OverflowBudgetError, ParameterError

__all__ = ["SlotLayout", "pack", "unpack_sum"]

INT64_MAX = (1 << 63) - 1
_BLOCK_VALUES = 1 << 16  # values per packing block: the bit matrix is 64 bytes per value


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SlotLayout:
    """Where each value sits in a plaintext, for sums of up to `max_summands` uploads."""

    value_bound: int  # V: every packed value lies in [-V, V]
    max_summands: int  # n: the most uploads a sum may hold
    plaintext_bits: int  # usable plaintext bits: bitlen(N) - 1, so every packing is < N
    guard_bits: int = 1

    def __post_init__(self) -> None:
        for name in ("value_bound", "max_summands", "plaintext_bits", "guard_bits"):
            value = getattr(self, name)
            if not _is_int(value) or value < (0 if name == "guard_bits" else 1):
                raise ParameterError(f"{name} must be a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))
        # slot sums are read back as uint64 and their signed value as int64
        if self.max_summands * self.value_bound > INT64_MAX:
            raise OverflowBudgetError(
                f"n * V = {self.max_summands} * {self.value_bound} exceeds 2^63 - 1: the sum of "
                "the uploads would not fit a signed 64-bit integer; lower scale_bits or noise_bound"
            )
        if self.slots < 1:
            raise OverflowBudgetError(
                f"a {self.slot_bits}-bit slot does not fit a {self.plaintext_bits}-bit plaintext"
            )

    @classmethod
    def for_modulus(cls, modulus: int, *, value_bound: int, max_summands: int,
                    guard_bits: int = 1) -> SlotLayout:
        """The layout for plaintexts below the Paillier modulus N."""
        return cls(value_bound, max_summands, int(modulus).bit_length() - 1, guard_bits)

    @property
    def value_bits(self) -> int:
        """Bits of one offset value u in [0, 2V]."""
        return (2 * self.value_bound).bit_length()

    @property
    def slot_bits(self) -> int:
        """value bits + ceil(log2 n) + guard bits."""
        return self.value_bits + math.ceil(math.log2(self.max_summands)) + self.guard_bits

    @property
    def slots(self) -> int:
        """Values per plaintext."""
        return self.plaintext_bits // self.slot_bits

    def plaintexts_for(self, length: int) -> int:
        """Plaintexts (= ciphertexts) that carry a vector of `length` values."""
        return -(-length // self.slots)


def pack(layout: SlotLayout, values: np.ndarray) -> list[int]:
    """Pack an int64 vector with every |value| <= V into ceil(m / slots) plaintext integers."""
    values = np.asarray(values)
    if values.dtype != np.int64 or values.ndim != 1 or values.size == 0:
        raise ParameterError("pack takes a non-empty 1-d int64 vector")
    bound = layout.value_bound
    low, high = int(values.min()), int(values.max())
    if low < -bound or high > bound:
        raise OverflowBudgetError(
            f"a value in [{low}, {high}] lies outside the packing bound [-{bound}, {bound}]"
        )
    # two's complement + V modulo 2^64 is exactly v + V, which lies in [0, 2V] < 2^64
    offset = values.astype(np.uint64) + np.uint64(bound)
    per_block = max(1, _BLOCK_VALUES // layout.slots) * layout.slots
    out: list[int] = []
    for start in range(0, offset.size, per_block):
        out.extend(_pack_block(layout, offset[start : start + per_block]))
    return out


def _pack_block(layout: SlotLayout, offset: np.ndarray) -> list[int]:
    s, w = layout.slots, layout.slot_bits
    count = -(-offset.size // s)
    padded = np.zeros(count * s, dtype="<u8")
    padded[: offset.size] = offset
    bits = np.unpackbits(padded.view(np.uint8), bitorder="little").reshape(-1, 64)
    # u <= 2V < 2^value_bits <= 2^w: bits cut off at w <= 64 are zero
    bits = bits[:, :w] if w <= 64 else np.pad(bits, ((0, 0), (0, w - 64)))
    rows = np.packbits(bits.reshape(count, s * w), axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in rows]


def unpack_sum(layout: SlotLayout, plaintexts: Sequence[int], *, length: int,
               n_summed: int) -> np.ndarray:
    """Signed int64 sums of `length` coordinates from the packed sum of `n_summed` uploads.

    Raises IntegrityError if a slot holds more than n_summed uploads could produce or a padding
    slot or bit is not zero: some party sent a value outside the agreed bounds.
    """
    if not _is_int(n_summed) or not 1 <= n_summed <= layout.max_summands:
        raise ParameterError(f"n_summed must be in [1, {layout.max_summands}], got {n_summed!r}")
    if not _is_int(length) or length < 1 or len(plaintexts) != layout.plaintexts_for(length):
        raise MalformedMessageError(
            f"{len(plaintexts)} plaintexts cannot carry {length} values at {layout.slots} a piece"
        )
    s, w = layout.slots, layout.slot_bits
    used = s * w
    nbytes = -(-used // 8)
    raw = bytearray()
    for p in plaintexts:
        if not _is_int(p) or p < 0 or int(p) >> used:
            raise IntegrityError("a decrypted sum has bits beyond its slots (a bound was broken)")
        raw += int(p).to_bytes(nbytes, "little")
    bits: np.ndarray = np.unpackbits(np.frombuffer(bytes(raw), np.uint8), bitorder="little")
    bits = bits.reshape(len(plaintexts), nbytes * 8)[:, :used].reshape(-1, w)
    if w > 64:
        if bits[:, 64:].any():
            raise IntegrityError("a slot sum exceeds 64 bits (a bound was broken)")
        bits = bits[:, :64]
    else:
        bits = np.pad(bits, ((0, 0), (0, 64 - w)))
    slot_sums = np.packbits(bits, axis=1, bitorder="little").view("<u8").reshape(-1)
    if np.any(slot_sums[length:]):
        raise IntegrityError("a padding slot of the sum is not zero (a bound was broken)")
    slot_sums = slot_sums[:length].astype(np.uint64)
    offset = n_summed * layout.value_bound  # <= n V <= 2^63 - 1
    if int(slot_sums.max()) > 2 * offset:
        raise IntegrityError(
            f"a slot sum exceeds 2 * {n_summed} * V: an upload broke the agreed value bound"
        )
    # (sum - kV) mod 2^64 read as int64 is exact: the true value lies in [-kV, kV]
    return (slot_sums - np.uint64(offset)).view(np.int64)
