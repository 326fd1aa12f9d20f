"""AES-256-GCM envelopes: NIST answers, round trips, and every kind of tampering refused."""

from __future__ import annotations

import pytest

from protocols.errors import IntegrityError, ParameterError
from protocols.primitives.envelope import NONCE_BYTES, TAG_BYTES, open_envelope, seal

KEY = bytes(range(32))
NONCE = bytes(range(12))
AD = b"codream-secure/v1|share|session|1|2"


def test_matches_gcm_spec_test_case_13():
    # McGrew & Viega GCM spec, test case 13: zero key and IV, empty plaintext.
    sealed = seal(bytes(32), b"", nonce=bytes(12), associated_data=b"")
    assert sealed.hex() == "530f8afbc74536b9a963b4f1c4cb738b"


def test_matches_gcm_spec_test_case_14():
    sealed = seal(bytes(32), bytes(16), nonce=bytes(12), associated_data=b"")
    assert sealed.hex() == "cea7403d4d606b6e074ec5d3baf39d18" "d0d1c8a799996bf0265b98b5d48ab919"
    assert open_envelope(bytes(32), sealed, nonce=bytes(12), associated_data=b"") == bytes(16)


@pytest.mark.parametrize("plaintext", [b"", b"x", bytes(range(256)) * 3])
def test_round_trip(plaintext):
    sealed = seal(KEY, plaintext, nonce=NONCE, associated_data=AD)
    assert len(sealed) == len(plaintext) + TAG_BYTES
    assert open_envelope(KEY, sealed, nonce=NONCE, associated_data=AD) == plaintext


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("index", [0, 16, 32, -TAG_BYTES, -1])
def test_flipped_ciphertext_or_tag_bit_is_refused(index):
    sealed = seal(KEY, bytes(33), nonce=NONCE, associated_data=AD)
    with pytest.raises(IntegrityError):
        open_envelope(KEY, _flip(sealed, index), nonce=NONCE, associated_data=AD)


def test_wrong_key_nonce_or_associated_data_is_refused():
    sealed = seal(KEY, b"share", nonce=NONCE, associated_data=AD)
    with pytest.raises(IntegrityError):
        open_envelope(_flip(KEY, 0), sealed, nonce=NONCE, associated_data=AD)
    with pytest.raises(IntegrityError):
        open_envelope(KEY, sealed, nonce=_flip(NONCE, 11), associated_data=AD)
    with pytest.raises(IntegrityError):
        open_envelope(KEY, sealed, nonce=NONCE, associated_data=AD + b"x")
    with pytest.raises(IntegrityError):
        open_envelope(KEY, sealed, nonce=NONCE, associated_data=b"")


@pytest.mark.parametrize("cut", [1, TAG_BYTES, TAG_BYTES + 5])
def test_truncated_envelope_is_refused(cut):
    sealed = seal(KEY, b"hello", nonce=NONCE, associated_data=AD)
    with pytest.raises(IntegrityError):
        open_envelope(KEY, sealed[:-cut], nonce=NONCE, associated_data=AD)


@pytest.mark.parametrize("key", [bytes(16), bytes(31), bytes(33), None])
def test_open_with_wrong_key_size_is_an_integrity_failure(key):
    sealed = seal(KEY, b"share", nonce=NONCE, associated_data=AD)
    with pytest.raises(IntegrityError):
        open_envelope(key, sealed, nonce=NONCE, associated_data=AD)


@pytest.mark.parametrize("nonce", [bytes(8), bytes(16), None])
def test_open_with_wrong_nonce_size_is_an_integrity_failure(nonce):
    sealed = seal(KEY, b"share", nonce=NONCE, associated_data=AD)
    with pytest.raises(IntegrityError):
        open_envelope(KEY, sealed, nonce=nonce, associated_data=AD)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(key=bytes(16), nonce=NONCE),
        dict(key=bytes(31), nonce=NONCE),
        dict(key=KEY, nonce=bytes(NONCE_BYTES - 1)),
        dict(key=KEY, nonce=None),
    ],
)
def test_seal_refuses_bad_parameters(kwargs):
    with pytest.raises(ParameterError):
        seal(kwargs["key"], b"x", nonce=kwargs["nonce"], associated_data=AD)


def test_associated_data_is_required_keyword():
    with pytest.raises(TypeError):
        seal(KEY, b"x", nonce=NONCE)  # type: ignore[call-arg]
