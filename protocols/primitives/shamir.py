"""Shamir t-of-n secret sharing of byte strings over a prime field, with consistency checks."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeGuard

from protocols.errors import (
    IntegrityError,
    MalformedMessageError,
    ParameterError,
    TooFewSurvivorsError,
)

__all__ = ["FIELD_256", "PrimeField", "check_share", "combine", "split"]


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class PrimeField:
    """The field Z_p; elements travel as fixed-width big-endian integers."""

    prime: int

    def __post_init__(self) -> None:
        # Only a cheap sanity check: callers use FIELD_256 or a small, known test prime.
        if not _is_int(self.prime) or self.prime < 3 or self.prime % 2 == 0:
            raise ParameterError(f"PrimeField.prime must be an odd prime, got {self.prime!r}")

    @property
    def element_bytes(self) -> int:
        """Width of one encoded field element."""
        return (self.prime.bit_length() + 7) // 8


# p = 2^256 + 297, the smallest prime above 2^256, so every 32-byte secret is a field element.
# Checked by a Pocklington certificate (tests/protocols/test_shamir.py re-verifies it):
# p - 1 = 2^3 * 3 * 13 * 67 * 9729922537253 * 1200461269659761894123
#         * 474233203066845416735444346211990045207, all prime; no prime lies in (2^256, p).
FIELD_256 = PrimeField(2**256 + 297)


def _check_share_ids(share_ids: Sequence[int], field: PrimeField) -> list[int]:
    ids = list(share_ids)
    if not all(_is_int(x) and 0 < x < field.prime for x in ids):
        raise ParameterError(f"share ids must be ints in [1, {field.prime - 1}]")
    if len(set(ids)) != len(ids):
        raise ParameterError("share ids must be distinct")
    return ids


def _check_threshold(threshold: int) -> None:
    if not _is_int(threshold) or threshold < 1:
        raise ParameterError(f"threshold must be an int >= 1, got {threshold!r}")


def _split_with_coefficients(
    secret: bytes, coefficients: Sequence[int], share_ids: Sequence[int], field: PrimeField
) -> dict[int, bytes]:
    """Shares of f(x) = secret + c1 x + c2 x^2 + ... (for known-answer tests; split draws c_i)."""
    value = int.from_bytes(secret, "big")
    if value >= field.prime:
        raise ParameterError("secret is not smaller than the field prime")
    p, width = field.prime, field.element_bytes
    poly = [value, *(c % p for c in coefficients)]
    shares = {}
    for x in share_ids:
        y = 0
        for c in reversed(poly):  # Horner
            y = (y * x + c) % p
        shares[x] = y.to_bytes(width, "big")
    return shares


def split(
    secret: bytes, *, threshold: int, share_ids: Sequence[int], field: PrimeField = FIELD_256
) -> dict[int, bytes]:
    """Split secret (big-endian integer < prime) into shares {x: f(x)}; any threshold recover it."""
    if not isinstance(secret, (bytes, bytearray)):
        raise ParameterError("secret must be bytes")
    _check_threshold(threshold)
    ids = _check_share_ids(share_ids, field)
    if threshold > len(ids):
        raise ParameterError(f"threshold {threshold} exceeds the number of shares {len(ids)}")
    coefficients = [secrets.randbelow(field.prime) for _ in range(threshold - 1)]
    return _split_with_coefficients(bytes(secret), coefficients, ids, field)


def check_share(share: object, field: PrimeField = FIELD_256, *, name: object = "") -> int:
    """The field element a share encodes; MalformedMessageError unless it is one, full width."""
    label = f"share {name}".rstrip()
    if not isinstance(share, (bytes, bytearray)) or len(share) != field.element_bytes:
        raise MalformedMessageError(f"{label} must be {field.element_bytes} bytes")
    y = int.from_bytes(share, "big")
    if y >= field.prime:
        raise MalformedMessageError(f"{label} is not a field element")
    return y


def _decode_share(x: object, share: object, field: PrimeField) -> tuple[int, int]:
    if not _is_int(x) or not 0 < x < field.prime:
        raise MalformedMessageError(f"share id must be an int in [1, p - 1], got {x!r}")
    return x, check_share(share, field, name=x)


def _batch_inverse(values: list[int], p: int) -> list[int]:
    """Inverses of nonzero values mod p with one modular exponentiation (Montgomery's trick)."""
    prefix = [1] * (len(values) + 1)
    for i, v in enumerate(values):
        prefix[i + 1] = prefix[i] * v % p
    inv = pow(prefix[-1], -1, p)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = prefix[i] * inv % p
        inv = inv * values[i] % p
    return out


def _interpolator(xs: list[int], ys: list[int], p: int) -> Callable[[int], int]:
    """Evaluator of the unique polynomial of degree < len(xs) through (xs, ys) (barycentric)."""
    denominators = []
    for i, xi in enumerate(xs):
        d = 1
        for j, xj in enumerate(xs):
            if j != i:
                d = d * (xi - xj) % p
        denominators.append(d)
    scaled = [y * w % p for y, w in zip(ys, _batch_inverse(denominators, p), strict=True)]

    def evaluate(z: int) -> int:
        # P(z) = L(z) * sum_i w_i y_i / (z - x_i), L(z) = prod (z - x_j); z is never a node.
        diffs = [(z - x) % p for x in xs]
        total = sum(s * inv for s, inv in zip(scaled, _batch_inverse(diffs, p), strict=True))
        node_poly = 1
        for d in diffs:
            node_poly = node_poly * d % p
        return node_poly * total % p

    return evaluate


def combine(
    shares: Mapping[int, bytes],
    *,
    threshold: int,
    secret_length: int = 32,
    field: PrimeField = FIELD_256,
) -> bytes:
    """Recover the secret from >= threshold shares; extra shares must agree, else IntegrityError."""
    _check_threshold(threshold)
    if not _is_int(secret_length) or secret_length < 1:
        raise ParameterError(f"secret_length must be an int >= 1, got {secret_length!r}")
    if len(shares) < threshold:
        raise TooFewSurvivorsError(needed=threshold, remaining=len(shares), context="shamir")
    points = sorted(_decode_share(x, s, field) for x, s in shares.items())
    base, extra = points[:threshold], points[threshold:]
    p = field.prime
    evaluate = _interpolator([x for x, _ in base], [y for _, y in base], p)
    # The base fixes a polynomial of degree < threshold; an honest extra share lies on it, so a
    # single altered share among threshold + 1 or more is always caught.
    for x, y in extra:
        if evaluate(x) != y:
            raise IntegrityError(f"share {x} is inconsistent with the other shares")
    value = evaluate(0)
    if value >= 1 << (8 * secret_length):
        raise IntegrityError(f"reconstructed value does not fit in {secret_length} bytes")
    return value.to_bytes(secret_length, "big")
