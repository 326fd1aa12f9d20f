"""Cryptographic PRG: the AES-256-CTR keystream, expanded straight into numpy ring vectors."""

from __future__ import annotations

import sys

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from protocols.errors import ParameterError

__all__ = ["KEY_BYTES", "NONCE_BYTES", "keystream_bytes", "uniform_ring"]

KEY_BYTES = 32
NONCE_BYTES = 16
MIN_RING_BITS, MAX_RING_BITS = 8, 64

# Encrypting zeros yields the raw keystream. One shared all-zero chunk (read-only, lazily
# zero-filled pages) avoids allocating a plaintext per call; longer streams loop over chunks.
_ZERO_CHUNK = memoryview(bytes(1 << 22))
# Older cryptography releases want update_into buffers block_size - 1 bytes longer than the data.
_SLACK = 15
_LITTLE_ENDIAN = sys.byteorder == "little"


def _check_key_nonce(key: bytes, nonce: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ParameterError(f"PRG key must be exactly {KEY_BYTES} bytes")
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_BYTES:
        raise ParameterError(f"PRG nonce (initial counter block) must be {NONCE_BYTES} bytes")


def _check_count(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ParameterError(f"{name} must be a non-negative int, got {value!r}")


def _fill(key: bytes, nonce: bytes, out: np.ndarray, nbytes: int) -> None:
    """Write the first nbytes of the keystream into out (a uint8 view with _SLACK spare bytes)."""
    encryptor = Cipher(algorithms.AES(bytes(key)), modes.CTR(bytes(nonce))).encryptor()
    chunk = len(_ZERO_CHUNK)
    for start in range(0, nbytes, chunk):  # loops over 4 MiB chunks, never over elements
        stop = min(start + chunk, nbytes)
        encryptor.update_into(_ZERO_CHUNK[: stop - start], out[start : stop + _SLACK])


def keystream_bytes(key: bytes, nbytes: int, *, nonce: bytes = bytes(NONCE_BYTES)) -> bytes:
    """First nbytes of the AES-256-CTR keystream for (key, initial counter block nonce)."""
    _check_key_nonce(key, nonce)
    _check_count(nbytes, "nbytes")
    out = np.empty(nbytes + _SLACK, dtype=np.uint8)
    _fill(key, nonce, out, nbytes)
    return out[:nbytes].tobytes()


def uniform_ring(
    key: bytes, length: int, *, ring_bits: int, nonce: bytes = bytes(NONCE_BYTES)
) -> np.ndarray:
    """length uniform elements of Z_2^ring_bits (uint32 if ring_bits <= 32, else uint64).

    Element i is keystream word i (4 bytes if ring_bits <= 32, else 8), read little-endian and
    masked to ring_bits; the mask keeps each element exactly uniform since 2^k divides 2^32 / 2^64.
    """
    _check_key_nonce(key, nonce)
    _check_count(length, "length")
    if isinstance(ring_bits, bool) or not isinstance(ring_bits, int):
        raise ParameterError(f"ring_bits must be an int, got {ring_bits!r}")
    if not MIN_RING_BITS <= ring_bits <= MAX_RING_BITS:
        raise ParameterError(f"ring_bits must lie in [{MIN_RING_BITS}, {MAX_RING_BITS}]")
    dtype = np.dtype(np.uint32 if ring_bits <= 32 else np.uint64)
    width = dtype.itemsize
    spare = -(-_SLACK // width)
    words = np.empty(length + spare, dtype=dtype)
    _fill(key, nonce, words.view(np.uint8), length * width)
    out = words[:length]
    if not _LITTLE_ENDIAN:
        out.byteswap(inplace=True)
    if ring_bits not in (32, 64):
        np.bitwise_and(out, dtype.type((1 << ring_bits) - 1), out=out)
    return out
