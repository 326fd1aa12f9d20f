"""X25519 and HKDF wrappers: RFC known answers, domain separation, refusal of bad inputs."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import IntegrityError, MalformedMessageError, ParameterError
from protocols.primitives import kdf

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
HKDF_CASES = json.loads((VECTORS / "hkdf_sha256_rfc5869.json").read_text())["cases"]
X25519_VECTORS = json.loads((VECTORS / "x25519_rfc7748.json").read_text())


@pytest.mark.parametrize("case", HKDF_CASES, ids=lambda c: c["name"])
def test_hkdf_matches_rfc5869(case):
    ikm, salt, info = (bytes.fromhex(case[k]) for k in ("ikm", "salt", "info"))
    # RFC 5869: the PRK is HMAC-SHA256(salt or HashLen zeros, IKM); checked with the stdlib.
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).hexdigest()
    assert prk == case["prk"]
    okm = kdf.hkdf(ikm, length=case["length"], salt=salt or None, info=info)
    assert okm.hex() == case["okm"]


def test_hkdf_empty_salt_equals_absent_salt():
    case = HKDF_CASES[2]
    ikm = bytes.fromhex(case["ikm"])
    assert kdf.hkdf(ikm, length=42, salt=b"", info=b"").hex() == case["okm"]


@pytest.mark.parametrize("length", [0, -1, 255 * 32 + 1, 1.5, True])
def test_hkdf_refuses_bad_lengths(length):
    with pytest.raises(ParameterError):
        kdf.hkdf(b"ikm", length=length, salt=None, info=b"")


@pytest.mark.parametrize("vector", X25519_VECTORS["scalar_mult"], ids=["5.2-1", "5.2-2"])
def test_x25519_scalar_mult_matches_rfc7748(vector):
    private = X25519PrivateKey.from_private_bytes(bytes.fromhex(vector["scalar"]))
    assert kdf.agree(private, bytes.fromhex(vector["u"])).hex() == vector["out"]


def test_x25519_iterated_matches_rfc7748():
    k = u = bytes.fromhex(X25519_VECTORS["iterated"]["start"])
    for i in range(1000):
        k, u = kdf.agree(X25519PrivateKey.from_private_bytes(k), u), k
        if i == 0:
            assert k.hex() == X25519_VECTORS["iterated"]["after_1"]
    assert k.hex() == X25519_VECTORS["iterated"]["after_1000"]


def test_x25519_diffie_hellman_matches_rfc7748():
    v = X25519_VECTORS["diffie_hellman"]
    alice = X25519PrivateKey.from_private_bytes(bytes.fromhex(v["alice_private"]))
    bob = X25519PrivateKey.from_private_bytes(bytes.fromhex(v["bob_private"]))
    assert alice.public_key().public_bytes_raw().hex() == v["alice_public"]
    assert bob.public_key().public_bytes_raw().hex() == v["bob_public"]
    assert kdf.agree(alice, bytes.fromhex(v["bob_public"])).hex() == v["shared"]
    assert kdf.agree(bob, bytes.fromhex(v["alice_public"])).hex() == v["shared"]


def test_generated_keypairs_agree():
    a_private, a_public = kdf.generate_keypair()
    b_private, b_public = kdf.generate_keypair()
    assert len(a_public) == len(b_public) == kdf.PUBLIC_KEY_BYTES
    assert a_public == a_private.public_key().public_bytes_raw()
    assert kdf.agree(a_private, b_public) == kdf.agree(b_private, a_public)
    assert a_public != b_public


@pytest.mark.parametrize("peer", [b"", bytes(31), bytes(33), "00" * 32, None])
def test_agree_refuses_malformed_public_keys(peer):
    private, _ = kdf.generate_keypair()
    with pytest.raises(MalformedMessageError):
        kdf.agree(private, peer)


@pytest.mark.parametrize("u", [0, 1], ids=["zero", "one"])
def test_agree_refuses_low_order_points(u):
    # u = 0 and u = 1 are points of small order: the shared secret would be all zero.
    private, _ = kdf.generate_keypair()
    with pytest.raises(IntegrityError):
        kdf.agree(private, u.to_bytes(32, "little"))


def _u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def test_encode_info_layout():
    assert kdf.encode_info("ab", 7, b"\x00") == (
        b"S" + _u64(2) + b"ab" + b"I" + _u64(7) + b"B" + _u64(1) + b"\x00"
    )
    assert kdf.encode_info() == b""


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("ab", "c"), ("a", "bc")),
        ((b"1",), ("1",)),
        (("1",), (1,)),
        ((1, 2), (2, 1)),
        ((b"",), ()),
        ((0,), (b"\x00" * 8,)),
    ],
)
def test_encode_info_separates_lookalike_tuples(left, right):
    assert kdf.encode_info(*left) != kdf.encode_info(*right)


@pytest.mark.parametrize("part", [-1, 1 << 64, True, 1.0, None, [1]])
def test_encode_info_refuses_bad_parts(part):
    with pytest.raises(ParameterError):
        kdf.encode_info("x", part)


parts = st.lists(
    st.one_of(st.binary(max_size=12), st.text(max_size=6), st.integers(0, (1 << 64) - 1)),
    max_size=5,
).map(tuple)


@settings(max_examples=100, deadline=None)
@given(parts, parts)
def test_encode_info_is_injective(left, right):
    # Tuples are equal as typed values only: 1 == True and b"a" != "a" are handled by the tags.
    same = [(type(a), a) for a in left] == [(type(b), b) for b in right]
    assert (kdf.encode_info(*left) == kdf.encode_info(*right)) == same


def test_derive_key_is_hkdf_with_session_salt_and_encoded_info():
    secret, session = bytes(range(32)), b"session-7"
    info = kdf.encode_info("codream-secure/v1", "pair-mask", 3, b"\x01\x02")
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=session, info=info).derive(secret)
    got = kdf.derive_key(secret, session_id=session, purpose="pair-mask", context=(3, b"\x01\x02"))
    assert got == expected
    assert kdf.derive_key(secret, session_id=session, purpose="p", length=64) != bytes(64)
    assert len(kdf.derive_key(secret, session_id=session, purpose="p", length=64)) == 64


def test_derive_key_separates_every_input():
    base = dict(session_id=b"s1", purpose="self-mask", context=(1, 2))
    reference = kdf.derive_key(b"k" * 32, **base)
    variants = [
        kdf.derive_key(b"K" * 32, **base),
        kdf.derive_key(b"k" * 32, **{**base, "session_id": b"s2"}),
        kdf.derive_key(b"k" * 32, **{**base, "purpose": "pair-mask"}),
        kdf.derive_key(b"k" * 32, **{**base, "context": (1, 3)}),
        kdf.derive_key(b"k" * 32, **{**base, "context": (2, 1)}),
        kdf.derive_key(b"k" * 32, **{**base, "context": (1,)}),
    ]
    assert len({reference, *variants}) == len(variants) + 1


def test_derive_key_security_parameters_are_keyword_only():
    with pytest.raises(TypeError):
        kdf.derive_key(b"k", b"session", "purpose")  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(session_id=b"", purpose="p"),
        dict(session_id="s", purpose="p"),
        dict(session_id=b"s", purpose=""),
        dict(session_id=b"s", purpose=b"p"),
        dict(session_id=b"s", purpose="p", context=[1]),
        dict(session_id=b"s", purpose="p", context=(-1,)),
    ],
)
def test_derive_key_refuses_bad_parameters(kwargs):
    with pytest.raises(ParameterError):
        kdf.derive_key(b"k" * 32, **kwargs)
