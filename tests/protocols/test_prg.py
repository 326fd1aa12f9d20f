"""AES-256-CTR PRG: NIST and stored vectors, agreement with a direct keystream, chunk seams."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from protocols.errors import ParameterError
from protocols.primitives import prg

VECTORS = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "aes256_ctr_prg.json").read_text()
)
KEY = bytes(range(100, 132))


def reference_stream(key: bytes, nbytes: int, nonce: bytes = bytes(16)) -> bytes:
    """The keystream computed independently: encrypt zeros with cryptography's AES-CTR."""
    return Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor().update(bytes(nbytes))


def reference_ring(key: bytes, length: int, ring_bits: int, nonce: bytes = bytes(16)):
    width = 4 if ring_bits <= 32 else 8
    words = np.frombuffer(reference_stream(key, width * length, nonce), dtype=f"<u{width}")
    return words & np.uint64((1 << ring_bits) - 1)


def test_keystream_matches_nist_sp800_38a_ctr_aes256():
    v = VECTORS["nist_sp800_38a_f55"]
    plaintext, ciphertext = bytes.fromhex(v["plaintext"]), bytes.fromhex(v["ciphertext"])
    stream = prg.keystream_bytes(
        bytes.fromhex(v["key"]), len(plaintext), nonce=bytes.fromhex(v["initial_counter"])
    )
    assert bytes(p ^ s for p, s in zip(plaintext, stream, strict=True)) == ciphertext


@pytest.mark.parametrize("vector", VECTORS["prg_words"], ids=lambda v: f"bits{v['ring_bits']}")
def test_uniform_ring_matches_stored_vectors(vector):
    words = prg.uniform_ring(
        bytes.fromhex(vector["key"]), 16, ring_bits=vector["ring_bits"],
        nonce=bytes.fromhex(vector["nonce"]),
    )
    assert words.tolist() == vector["words"]


def test_counter_block_wraps_like_the_stored_vector():
    v = VECTORS["counter_wrap"]
    key, nonce = bytes.fromhex(v["key"]), bytes.fromhex(v["nonce"])
    words = prg.uniform_ring(key, 8, ring_bits=32, nonce=nonce)
    assert words.tolist() == v["words"]


@pytest.mark.parametrize("nbytes", [0, 1, 15, 16, 17, 1000, (1 << 22) + 5])
def test_keystream_bytes_match_direct_encryption(nbytes):
    nonce = bytes(range(16))
    assert prg.keystream_bytes(KEY, nbytes, nonce=nonce) == reference_stream(KEY, nbytes, nonce)


@pytest.mark.parametrize("ring_bits", [8, 13, 16, 31, 32, 33, 48, 63, 64])
@pytest.mark.parametrize("length", [0, 1, 5, 1001])
def test_uniform_ring_matches_direct_encryption(ring_bits, length):
    got = prg.uniform_ring(KEY, length, ring_bits=ring_bits)
    assert got.dtype == (np.uint32 if ring_bits <= 32 else np.uint64)
    assert got.shape == (length,)
    np.testing.assert_array_equal(got, reference_ring(KEY, length, ring_bits))
    if length:
        assert int(got.max()) < 1 << ring_bits


@pytest.mark.parametrize(("ring_bits", "length"), [(32, (1 << 20) + 3), (64, (1 << 19) + 3)])
def test_uniform_ring_is_seamless_across_internal_chunks(ring_bits, length):
    # 4 MiB of keystream is produced per internal chunk; these lengths cross one seam.
    got = prg.uniform_ring(KEY, length, ring_bits=ring_bits)
    np.testing.assert_array_equal(got, reference_ring(KEY, length, ring_bits))


@pytest.mark.parametrize("counter", [0, 1, 2, 3, 0xFFFFFFFE])
@pytest.mark.parametrize("nbytes", [1, 16, 31, 33, 1000, prg._GCM_MIN_BYTES,
                                    prg._GCM_MIN_BYTES + 17, (1 << 22) + 5])
def test_keystream_equals_ctr_whichever_cipher_mode_produces_it(counter, nbytes):
    # counters 0-2 in the low 32 bits are produced through AES-GCM, others through AES-CTR
    nonce = bytes(range(200, 212)) + counter.to_bytes(4, "big")
    assert prg.keystream_bytes(KEY, nbytes, nonce=nonce) == reference_stream(KEY, nbytes, nonce)


@pytest.mark.parametrize("block", [1, 3, 8, 1024])
def test_streamed_words_cross_the_ctr_prefix_of_the_gcm_stream(block):
    # the first two CTR blocks (8 words) come before GCM's stream: read them in small pieces
    length = prg._GCM_MIN_BYTES // 4 + 3
    words = np.concatenate([w.copy() for w in prg.uniform_word_blocks(
        KEY, length, ring_bits=32, block=block)])
    np.testing.assert_array_equal(words, reference_ring(KEY, length, 32))


def test_gcm_is_used_only_for_long_streams_whose_32_bit_counter_cannot_wrap():
    zero_nonce = bytes(16)
    assert isinstance(prg._encryptor(KEY, zero_nonce, "aes-256-ctr", 1 << 20), prg._CtrThroughGcm)
    short = prg._GCM_MIN_BYTES - 1  # its setup would cost more than it saves
    assert not isinstance(prg._encryptor(KEY, zero_nonce, "aes-256-ctr", short),
                          prg._CtrThroughGcm)
    # blocks 0 .. 2^32 - 1 keep the carry out of the low 32 bits; block 2^32 would carry in
    # CTR and wrap in GCM, so a stream that reaches it goes through plain CTR
    longest = 16 << 32
    assert isinstance(prg._encryptor(KEY, zero_nonce, "aes-256-ctr", longest),
                      prg._CtrThroughGcm)
    assert not isinstance(prg._encryptor(KEY, zero_nonce, "aes-256-ctr", longest + 1),
                          prg._CtrThroughGcm)
    counter_three = bytes(15) + b"\x03"
    assert not isinstance(prg._encryptor(KEY, counter_three, "aes-256-ctr", 64),
                          prg._CtrThroughGcm)


def test_a_backend_without_gcm_falls_back_to_ctr_with_the_same_bits(monkeypatch):
    from cryptography.exceptions import UnsupportedAlgorithm

    def no_gcm(*args, **kwargs):
        raise UnsupportedAlgorithm("no GCM here")

    expected = prg.keystream_bytes(KEY, 1000)
    monkeypatch.setattr(prg, "_CtrThroughGcm", no_gcm)
    assert prg.keystream_bytes(KEY, 1000) == expected == reference_stream(KEY, 1000)


def test_output_is_writable_and_owned():
    a = prg.uniform_ring(KEY, 64, ring_bits=32)
    b = prg.uniform_ring(KEY, 64, ring_bits=32)
    a += np.uint32(1)
    assert not np.array_equal(a, b)


def test_streams_depend_on_key_and_nonce():
    base = prg.uniform_ring(KEY, 256, ring_bits=32)
    other_key = prg.uniform_ring(bytes(32), 256, ring_bits=32)
    other_nonce = prg.uniform_ring(KEY, 256, ring_bits=32, nonce=b"\x00" * 15 + b"\x01")
    assert not np.array_equal(base, other_key)
    assert not np.array_equal(base, other_nonce)
    # nonce + 1 is the same stream shifted by one 16-byte block (4 words): CTR counter semantics
    np.testing.assert_array_equal(base[4:], other_nonce[:-4])


@pytest.mark.parametrize("key", [bytes(16), bytes(31), bytes(33), "k" * 32, None])
def test_refuses_bad_keys(key):
    with pytest.raises(ParameterError):
        prg.uniform_ring(key, 4, ring_bits=32)
    with pytest.raises(ParameterError):
        prg.keystream_bytes(key, 4)


@pytest.mark.parametrize("nonce", [bytes(12), bytes(15), bytes(17), None])
def test_refuses_bad_nonces(nonce):
    with pytest.raises(ParameterError):
        prg.uniform_ring(KEY, 4, ring_bits=32, nonce=nonce)


@pytest.mark.parametrize("ring_bits", [7, 65, 0, True, 32.0])
def test_refuses_bad_ring_bits(ring_bits):
    with pytest.raises(ParameterError):
        prg.uniform_ring(KEY, 4, ring_bits=ring_bits)


@pytest.mark.parametrize("length", [-1, 2.0, None])
def test_refuses_bad_lengths(length):
    with pytest.raises(ParameterError):
        prg.uniform_ring(KEY, length, ring_bits=32)
    with pytest.raises(ParameterError):
        prg.keystream_bytes(KEY, length)
