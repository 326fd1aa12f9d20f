"""ChaCha20 PRG option: RFC 8439 vectors, agreement with cryptography, counter limits, defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from protocols.errors import ParameterError
from protocols.primitives import prg

VECTORS = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "chacha20_rfc8439.json").read_text()
)
KEY = bytes(range(7, 39))


def reference_stream(key: bytes, nbytes: int, nonce: bytes = bytes(16)) -> bytes:
    """cryptography's ChaCha20 keystream, computed independently of prg."""
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(nbytes))


@pytest.mark.parametrize("v", VECTORS["keystream_vectors"], ids=lambda v: v["name"])
def test_keystream_matches_rfc8439(v):
    nonce = bytes.fromhex(v["nonce"])
    assert nonce == v["counter"].to_bytes(4, "little") + bytes.fromhex(v["rfc_nonce"])
    stream = prg.keystream_bytes(bytes.fromhex(v["key"]), 64, nonce=nonce, algorithm="chacha20")
    assert stream.hex() == v["keystream"]


@pytest.mark.parametrize("v", VECTORS["encryption_vectors"], ids=lambda v: v["name"])
def test_encryption_matches_rfc8439(v):
    plaintext = bytes.fromhex(v["plaintext"])
    stream = prg.keystream_bytes(bytes.fromhex(v["key"]), len(plaintext),
                                 nonce=bytes.fromhex(v["nonce"]), algorithm="chacha20")
    assert bytes(p ^ s for p, s in zip(plaintext, stream, strict=True)).hex() == v["ciphertext"]


@pytest.mark.parametrize("nbytes", [0, 1, 63, 64, 65, 1000, (1 << 22) + 5])
def test_keystream_bytes_match_cryptography(nbytes):
    nonce = (5).to_bytes(4, "little") + bytes(range(12))
    got = prg.keystream_bytes(KEY, nbytes, nonce=nonce, algorithm="chacha20")
    assert got == reference_stream(KEY, nbytes, nonce)


@pytest.mark.parametrize("ring_bits", [8, 20, 32, 33, 64])
def test_uniform_ring_reads_little_endian_words(ring_bits):
    width = 4 if ring_bits <= 32 else 8
    words = prg.uniform_ring(KEY, 37, ring_bits=ring_bits, algorithm="chacha20")
    expected = np.frombuffer(reference_stream(KEY, 37 * width), dtype=f"<u{width}")
    assert words.dtype == np.dtype(np.uint32 if width == 4 else np.uint64)
    assert words.tolist() == (expected & np.uint64((1 << ring_bits) - 1)).tolist()


def test_chacha20_differs_from_the_aes_default():
    aes = prg.uniform_ring(KEY, 64, ring_bits=32)
    assert aes.tolist() == prg.uniform_ring(KEY, 64, ring_bits=32, algorithm="aes-256-ctr").tolist()
    assert aes.tolist() != prg.uniform_ring(KEY, 64, ring_bits=32, algorithm="chacha20").tolist()


def test_stream_up_to_the_last_block_counter_is_allowed():
    nonce = (0xFFFFFFFE).to_bytes(4, "little") + bytes(12)
    got = prg.keystream_bytes(KEY, 128, nonce=nonce, algorithm="chacha20")
    assert got == reference_stream(KEY, 128, nonce)


def test_counter_overflow_is_refused():
    nonce = (0xFFFFFFFE).to_bytes(4, "little") + bytes(12)
    with pytest.raises(ParameterError, match="32-bit"):
        prg.keystream_bytes(KEY, 129, nonce=nonce, algorithm="chacha20")
    with pytest.raises(ParameterError, match="32-bit"):
        prg.uniform_ring(KEY, 33, ring_bits=32, nonce=nonce, algorithm="chacha20")


def test_unknown_algorithm_is_refused():
    with pytest.raises(ParameterError, match="algorithm"):
        prg.uniform_ring(KEY, 4, ring_bits=32, algorithm="rc4")
    with pytest.raises(ParameterError, match="algorithm"):
        prg.keystream_bytes(KEY, 4, algorithm="ChaCha20")
