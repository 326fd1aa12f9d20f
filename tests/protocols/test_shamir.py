"""Shamir sharing: hand-computed answers, the field's primality certificate, and properties."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import (
    IntegrityError,
    MalformedMessageError,
    ParameterError,
    TooFewSurvivorsError,
)
from protocols.primitives import shamir
from protocols.primitives.shamir import FIELD_256, PrimeField, combine, split

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "shamir.json").read_text())
GF257 = PrimeField(257)


def test_small_field_matches_hand_computed_shares():
    v = VECTORS["gf257"]
    shares = shamir._split_with_coefficients(
        bytes.fromhex(v["secret"]), v["coefficients"], range(1, 8), GF257
    )
    assert shares == {int(x): y.to_bytes(2, "big") for x, y in v["shares"].items()}


def test_small_field_any_three_hand_shares_recover_the_secret():
    v = VECTORS["gf257"]
    shares = {int(x): y.to_bytes(2, "big") for x, y in v["shares"].items()}
    for subset in itertools.combinations(sorted(shares), 3):
        got = combine({x: shares[x] for x in subset}, threshold=3, secret_length=1, field=GF257)
        assert got == bytes.fromhex(v["secret"])
    assert combine(shares, threshold=3, secret_length=1, field=GF257) == b"\x2a"


def test_field_256_matches_hand_computed_shares():
    v = VECTORS["field256"]
    shares = shamir._split_with_coefficients(
        bytes.fromhex(v["secret"]), v["coefficients"], [1, 2, 5, 7], FIELD_256
    )
    assert FIELD_256.element_bytes == 33
    assert shares == {int(x): y.to_bytes(33, "big") for x, y in v["shares"].items()}
    assert combine({5: shares[5], 7: shares[7]}, threshold=2) == bytes.fromhex(v["secret"])


def _is_small_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, valid for n < 3.3e24 with the first 13 prime bases."""
    assert n < 3_317_044_064_679_887_385_961_981
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    if n < 2:
        return False
    if n in bases:
        return True
    if any(n % b == 0 for b in bases):
        return False
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _pocklington(n: int, factorisation: list[list[int]], is_prime) -> bool:
    """n - 1 = prod q^e fully; each q prime; witness a: a^(n-1) = 1, gcd(a^((n-1)/q) - 1, n) = 1."""
    assert math.prod(q**e for q, e, _ in factorisation) == n - 1
    for q, _, a in factorisation:
        assert is_prime(q), q
        assert pow(a, n - 1, n) == 1
        assert math.gcd(pow(a, (n - 1) // q, n) - 1, n) == 1
    return True


def test_field_256_prime_has_a_valid_pocklington_certificate():
    cert = VECTORS["field256_certificate"]
    q = cert["q"]
    assert _pocklington(q, cert["q_minus_1"], _is_small_prime)

    def is_prime(factor: int) -> bool:
        return factor == q or _is_small_prime(factor)

    p = FIELD_256.prime
    assert p == 2**256 + 297
    assert _pocklington(p, cert["p_minus_1"], is_prime)
    # and it is the smallest prime above 2^256: every odd candidate below fails Fermat base 3
    # (base 2 would not do: 2^256 + 1 is a Fermat number, a base-2 pseudoprime)
    assert all(pow(3, m - 1, m) != 1 for m in range(2**256 + 1, p, 2))


def test_certificate_checker_can_fail():
    cert = VECTORS["field256_certificate"]
    wrong_witness = [[q, e, 1] for q, e, _ in cert["q_minus_1"]]  # a = 1 proves nothing
    with pytest.raises(AssertionError):
        _pocklington(cert["q"], wrong_witness, _is_small_prime)
    with pytest.raises(AssertionError):  # 2^256 + 299 is composite; its n - 1 is not this
        _pocklington(2**256 + 299, cert["p_minus_1"], _is_small_prime)
    assert not _is_small_prime(3_215_031_751)  # strong pseudoprime to bases 2, 3, 5, 7


def test_split_shapes_and_fresh_randomness():
    secret = bytes(range(32))
    a = split(secret, threshold=3, share_ids=[1, 2, 3, 4, 5])
    b = split(secret, threshold=3, share_ids=[1, 2, 3, 4, 5])
    assert sorted(a) == [1, 2, 3, 4, 5]
    assert all(len(s) == FIELD_256.element_bytes for s in a.values())
    assert a != b  # fresh coefficients from the CSPRNG
    assert combine(a, threshold=3) == combine(b, threshold=3) == secret


def test_threshold_one_shares_are_the_secret():
    shares = split(b"\x07" * 32, threshold=1, share_ids=[3, 9])
    assert set(shares.values()) == {(b"\x00" + b"\x07" * 32)}


secrets32 = st.binary(min_size=32, max_size=32)


@st.composite
def sharings(draw, field=FIELD_256):
    n = draw(st.integers(1, 9))
    threshold = draw(st.integers(1, n))
    ids = draw(st.lists(st.integers(1, min(field.prime - 1, 10**6)), min_size=n, max_size=n,
                        unique=True))
    return threshold, ids


@settings(max_examples=60, deadline=None)
@given(secrets32, sharings(), st.data())
def test_any_threshold_shares_reconstruct(secret, sharing, data):
    threshold, ids = sharing
    shares = split(secret, threshold=threshold, share_ids=ids)
    chosen = data.draw(st.lists(st.sampled_from(ids), min_size=threshold, unique=True))
    assert combine({x: shares[x] for x in chosen}, threshold=threshold) == secret


@settings(max_examples=60, deadline=None)
@given(secrets32, sharings(), st.data())
def test_fewer_than_threshold_shares_raise(secret, sharing, data):
    threshold, ids = sharing
    shares = split(secret, threshold=threshold, share_ids=ids)
    chosen = data.draw(st.lists(st.sampled_from(ids), max_size=threshold - 1, unique=True))
    with pytest.raises(TooFewSurvivorsError) as info:
        combine({x: shares[x] for x in chosen}, threshold=threshold)
    assert (info.value.needed, info.value.remaining) == (threshold, len(chosen))


@settings(max_examples=60, deadline=None)
@given(secrets32, st.integers(1, 6), st.integers(1, 4), st.data())
def test_a_tampered_share_among_extra_shares_is_detected(secret, threshold, extra, data):
    ids = list(range(1, threshold + extra + 1))
    shares = split(secret, threshold=threshold, share_ids=ids)
    victim = data.draw(st.sampled_from(ids))
    delta = data.draw(st.integers(1, FIELD_256.prime - 1))
    value = (int.from_bytes(shares[victim], "big") + delta) % FIELD_256.prime
    shares[victim] = value.to_bytes(FIELD_256.element_bytes, "big")
    with pytest.raises(IntegrityError):
        combine(shares, threshold=threshold)


def test_small_field_reconstructs_every_secret():
    for secret in range(256):
        shares = split(bytes([secret]), threshold=2, share_ids=[1, 100, 256], field=GF257)
        assert combine(shares, threshold=2, secret_length=1, field=GF257) == bytes([secret])


def test_reconstructed_value_wider_than_the_secret_is_refused():
    # shares of 256 (a field element of GF(257) that does not fit in one byte)
    shares = shamir._split_with_coefficients(b"\x01\x00", [3], [1, 2], GF257)
    with pytest.raises(IntegrityError):
        combine(shares, threshold=2, secret_length=1, field=GF257)
    assert combine(shares, threshold=2, secret_length=2, field=GF257) == b"\x01\x00"


@pytest.mark.parametrize(
    "bad",
    [
        {1: bytes(32)},  # too short
        {1: bytes(34)},  # too long
        {1: (2**256 + 297).to_bytes(33, "big")},  # not a field element
        {1: b"\xff" * 33},
        {0: bytes(33)},  # x = 0 would be the secret itself
        {-1: bytes(33)},
        {2**256 + 297: bytes(33)},
        {True: bytes(33)},
        {"1": bytes(33)},
        {1: "00" * 33},
    ],
)
def test_malformed_shares_are_refused(bad):
    good = split(bytes(32), threshold=2, share_ids=[5, 6])
    with pytest.raises(MalformedMessageError):
        combine({**good, **bad}, threshold=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(threshold=0, share_ids=[1, 2]),
        dict(threshold=3, share_ids=[1, 2]),
        dict(threshold=True, share_ids=[1, 2]),
        dict(threshold=1, share_ids=[0, 1]),
        dict(threshold=1, share_ids=[1, 1]),
        dict(threshold=1, share_ids=[2**256 + 297]),
        dict(threshold=1, share_ids=[True]),
    ],
)
def test_split_refuses_bad_parameters(kwargs):
    with pytest.raises(ParameterError):
        split(bytes(32), **kwargs)


def test_split_refuses_secrets_outside_the_field():
    with pytest.raises(ParameterError):
        split(b"\x01\x01", threshold=1, share_ids=[1], field=GF257)  # 257 == p
    with pytest.raises(ParameterError):
        split("secret", threshold=1, share_ids=[1])  # type: ignore[arg-type]


@pytest.mark.parametrize("prime", [2, 256, 0, -7, 7.0])
def test_field_refuses_obviously_bad_primes(prime):
    with pytest.raises(ParameterError):
        PrimeField(prime)


def test_combine_refuses_bad_threshold():
    shares = split(bytes(32), threshold=1, share_ids=[1])
    with pytest.raises(ParameterError):
        combine(shares, threshold=0)
