"""Torch ChaCha20 keystream: RFC 8439 vectors and byte-for-byte agreement with cryptography."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from codream_secure.errors import ConfigError
from codream_secure.gpu import chacha20
from protocols.primitives import prg

COMPILE_TESTS = bool(os.environ.get("CODREAM_TEST_COMPILE")) or torch.cuda.is_available()

VECTORS = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "chacha20_rfc8439.json").read_text()
)
KEYS = [bytes(range(32)), bytes(32), bytes([0xFF]) * 32, bytes(range(200, 232))]
NONCES = [
    bytes(16),  # the protocol's convention
    (1).to_bytes(4, "little") + bytes.fromhex("000000000000004a00000000"),
    (0x7FFFFFFE).to_bytes(4, "little") + bytes(range(12)),  # crosses the int32 sign bit
    (0xFFFFFFF0).to_bytes(4, "little") + bytes([7]) * 12,  # 16 blocks before the 2^32 limit
]


def reference(key: bytes, nonce: bytes, nbytes: int) -> bytes:
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(nbytes))


@pytest.mark.parametrize("v", VECTORS["keystream_vectors"], ids=lambda v: v["name"])
def test_rfc8439_keystream_vectors(v):
    got = chacha20.keystream_bytes(bytes.fromhex(v["key"]), 64, nonce=bytes.fromhex(v["nonce"]))
    assert got.hex() == v["keystream"]


@pytest.mark.parametrize("key", KEYS, ids=range(len(KEYS)))
@pytest.mark.parametrize("nonce", NONCES, ids=["zero", "rfc", "signbit", "last16"])
@pytest.mark.parametrize("nbytes", [0, 1, 4, 63, 64, 65, 130, 1000, 1024])
def test_bytes_equal_cryptography(key, nonce, nbytes):
    assert chacha20.keystream_bytes(key, nbytes, nonce=nonce) == reference(key, nonce, nbytes)


def test_many_keys_in_one_call_equal_separate_streams():
    keys = [os.urandom(32) for _ in range(5)]
    nonces = [os.urandom(12) + bytes(4) for _ in range(5)]  # random counters below 2^32 - 2^24
    words = chacha20.keystream_words(keys, 777, nonces=nonces)
    assert words.shape == (5, 777) and words.dtype == torch.int32
    for row, key, nonce in zip(words, keys, nonces, strict=True):
        expected = np.frombuffer(reference(key, nonce, 4 * 777), dtype="<i4")
        assert np.array_equal(row.numpy(), expected)


@pytest.mark.parametrize("ring_bits", [8, 17, 32, 33, 48, 64])
def test_uniform_ring_equals_the_protocol_prg(ring_bits):
    keys = [bytes(range(32)), bytes(range(1, 33))]
    got = chacha20.uniform_ring(keys, 301, ring_bits=ring_bits)
    dtype = np.uint32 if ring_bits <= 32 else np.uint64
    for row, key in zip(got, keys, strict=True):
        expected = prg.uniform_ring(key, 301, ring_bits=ring_bits, algorithm="chacha20")
        assert np.array_equal(row.numpy().view(dtype), expected)


def test_counter_overflow_is_refused_like_cryptography():
    nonce = NONCES[3]
    assert chacha20.keystream_bytes(KEYS[0], 16 * 64, nonce=nonce) == reference(
        KEYS[0], nonce, 16 * 64)
    with pytest.raises(ConfigError, match="32-bit"):
        chacha20.keystream_bytes(KEYS[0], 16 * 64 + 1, nonce=nonce)
    with pytest.raises(ValueError):  # cryptography refuses the same stream
        reference(KEYS[0], nonce, 16 * 64 + 1)


@pytest.mark.parametrize("bad", [{"key": bytes(31)}, {"nonce": bytes(12)}])
def test_bad_key_or_nonce_is_refused(bad):
    key, nonce = bad.get("key", bytes(32)), bad.get("nonce", bytes(16))
    with pytest.raises(ConfigError):
        chacha20.keystream_bytes(key, 8, nonce=nonce)


def test_unknown_backend_is_refused():
    with pytest.raises(ConfigError, match="backend"):
        chacha20.keystream_words([bytes(32)], 8, backend="cuda-magic")


@pytest.mark.triton
@pytest.mark.skipif("triton" not in chacha20.available_backends("cpu"),
                    reason="needs triton with TRITON_INTERPRET=1")
def test_triton_kernel_in_the_interpreter_equals_cryptography():
    # The interpreter runs the same kernel source on the CPU (slowly): keep streams short.
    for key, nonce in zip(KEYS, NONCES, strict=True):
        got = chacha20.keystream_bytes(key, 1000, nonce=nonce, backend="triton")
        assert got == reference(key, nonce, 1000)


@pytest.mark.slow
@pytest.mark.skipif(not COMPILE_TESTS, reason="torch.compile on the CPU takes about a minute; "
                    "set CODREAM_TEST_COMPILE=1 (always on with CUDA)")
def test_compiled_double_round_equals_eager():
    words = chacha20.keystream_words(KEYS[:2], 4096, nonces=NONCES[1:3], backend="compiled")
    assert torch.equal(words, chacha20.keystream_words(KEYS[:2], 4096, nonces=NONCES[1:3],
                                                       backend="torch"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "compiled", "auto"])
def test_cuda_keystream_equals_cryptography(backend):
    for key, nonce in zip(KEYS, NONCES, strict=True):
        for nbytes in (1, 65, 1024):
            got = chacha20.keystream_bytes(key, nbytes, nonce=nonce, device="cuda",
                                           backend=backend)
            assert got == reference(key, nonce, nbytes)
    big = chacha20.keystream_words([KEYS[3]], 1 << 20, device="cuda", backend=backend)
    expected = np.frombuffer(reference(KEYS[3], bytes(16), 4 << 20), dtype="<i4")
    assert np.array_equal(big.cpu().numpy()[0], expected)
