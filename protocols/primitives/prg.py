"""Cryptographic PRG: an AES-256-CTR or ChaCha20 keystream, expanded straight into ring vectors.

AES-256-CTR is the default. ChaCha20 (RFC 8439) is the option GPU clients can also compute on the
device, bit for bit: the same 32-byte key, and the 16-byte `nonce` read as cryptography's ChaCha20
reads it -- bytes 0-3 the initial 32-bit block counter (little-endian), bytes 4-15 the 96-bit
RFC 8439 nonce. The protocol's convention is all zeros (counter 0, nonce 0): every expansion key is
a fresh HKDF output used for one vector only, so a fixed nonce never repeats a (key, nonce) pair.
"""

from __future__ import annotations

import sys

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from protocols.errors import ParameterError

__all__ = ["ALGORITHMS", "KEY_BYTES", "NONCE_BYTES", "keystream_bytes", "uniform_ring"]

KEY_BYTES = 32
NONCE_BYTES = 16
# append only: an algorithm's index is its wire code in SessionOffer
ALGORITHMS = ("aes-256-ctr", "chacha20")
CHACHA20_BLOCK_BYTES = 64
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


def _check_algorithm(algorithm: str, nonce: bytes, nbytes: int) -> None:
    if algorithm not in ALGORITHMS:
        raise ParameterError(f"PRG algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "chacha20":
        # RFC 8439's block counter is 32 bits: a stream may not run past block 2^32 - 1.
        counter = int.from_bytes(bytes(nonce[:4]), "little")
        blocks = -(-nbytes // CHACHA20_BLOCK_BYTES)
        if counter + blocks > 1 << 32:
            raise ParameterError(
                f"ChaCha20 stream of {nbytes} bytes from block {counter} would overflow the 32-bit "
                "block counter"
            )


def _fill(key: bytes, nonce: bytes, out: np.ndarray, nbytes: int, algorithm: str) -> None:
    """Write the first nbytes of the keystream into out (a uint8 view with _SLACK spare bytes)."""
    if algorithm == "chacha20":
        cipher = Cipher(algorithms.ChaCha20(bytes(key), bytes(nonce)), mode=None)
    else:
        cipher = Cipher(algorithms.AES(bytes(key)), modes.CTR(bytes(nonce)))
    encryptor = cipher.encryptor()
    chunk = len(_ZERO_CHUNK)
    for start in range(0, nbytes, chunk):  # loops over 4 MiB chunks, never over elements
        stop = min(start + chunk, nbytes)
        encryptor.update_into(_ZERO_CHUNK[: stop - start], out[start : stop + _SLACK])


def keystream_bytes(
    key: bytes, nbytes: int, *, nonce: bytes = bytes(NONCE_BYTES), algorithm: str = "aes-256-ctr"
) -> bytes:
    """First nbytes of the AES-256-CTR (or ChaCha20) keystream for (key, nonce)."""
    _check_key_nonce(key, nonce)
    _check_count(nbytes, "nbytes")
    _check_algorithm(algorithm, nonce, nbytes)
    out = np.empty(nbytes + _SLACK, dtype=np.uint8)
    _fill(key, nonce, out, nbytes, algorithm)
    return out[:nbytes].tobytes()


def uniform_ring(
    key: bytes,
    length: int,
    *,
    ring_bits: int,
    nonce: bytes = bytes(NONCE_BYTES),
    algorithm: str = "aes-256-ctr",
) -> np.ndarray:
    """length uniform elements of Z_2^ring_bits (uint32 if ring_bits <= 32, else uint64).

    Element i is keystream word i (4 bytes if ring_bits <= 32, else 8), read little-endian and
    masked to ring_bits; the mask keeps each element exactly uniform since 2^k divides 2^32 / 2^64.
    `algorithm` picks the keystream: "aes-256-ctr" (default) or "chacha20" (see the module doc).
    """
    _check_key_nonce(key, nonce)
    _check_count(length, "length")
    if isinstance(ring_bits, bool) or not isinstance(ring_bits, int):
        raise ParameterError(f"ring_bits must be an int, got {ring_bits!r}")
    if not MIN_RING_BITS <= ring_bits <= MAX_RING_BITS:
        raise ParameterError(f"ring_bits must lie in [{MIN_RING_BITS}, {MAX_RING_BITS}]")
    dtype = np.dtype(np.uint32 if ring_bits <= 32 else np.uint64)
    width = dtype.itemsize
    _check_algorithm(algorithm, nonce, length * width)
    spare = -(-_SLACK // width)
    words = np.empty(length + spare, dtype=dtype)
    _fill(key, nonce, words.view(np.uint8), length * width, algorithm)
    out = words[:length]
    if not _LITTLE_ENDIAN:
        out.byteswap(inplace=True)
    if ring_bits not in (32, 64):
        np.bitwise_and(out, dtype.type((1 << ring_bits) - 1), out=out)
    return out
