"""Cryptographic PRG: an AES-256-CTR or ChaCha20 keystream, expanded straight into ring vectors.

AES-256-CTR is the default. ChaCha20 (RFC 8439) is the option GPU clients can also compute on the
device, bit for bit: the same 32-byte key, and the 16-byte `nonce` read as cryptography's ChaCha20
reads it -- bytes 0-3 the initial 32-bit block counter (little-endian), bytes 4-15 the 96-bit
RFC 8439 nonce. The protocol's convention is all zeros (counter 0, nonce 0): every expansion key is
a fresh HKDF output used for one vector only, so a fixed nonce never repeats a (key, nonce) pair.

A long AES-256-CTR keystream is produced by OpenSSL's AES-GCM where its 32-bit counter cannot
wrap (the same bits: `_CtrThroughGcm`), which ran twice as fast as AES-CTR on our VAES CPU.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import numpy as np
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from protocols.errors import ParameterError

__all__ = ["ALGORITHMS", "KEY_BYTES", "NONCE_BYTES", "add_uniform_rings", "keystream_bytes",
           "uniform_ring", "uniform_word_blocks"]

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
# Words per streamed block: 256-512 KiB, so a block's keystream and the slice it is added to stay
# in L2 instead of each mask making its own trip through DRAM (2x faster for 4 masks of 3 MiB).
STREAM_BLOCK_WORDS = 1 << 16
# Setting up the GCM route costs about 6 us more than plain CTR: it pays from about 128 KiB.
_GCM_MIN_BYTES = 1 << 18


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


class _CtrThroughGcm:
    """The AES-CTR keystream of a counter block N || c (c <= 2), produced by AES-GCM.

    NIST SP 800-38D: GCM under the 96-bit IV N encrypts with the CTR blocks N || 2, N || 3, ...
    (a 32-bit increment), so GCM's ciphertext of zeros is the CTR keystream from block N || 2 on,
    as long as the low 32 bits never wrap (the caller checks). Blocks c..1 come from plain CTR.
    Why: OpenSSL's stitched AES-GCM runs at about twice its AES-CTR speed on CPUs with VAES
    (14 against 7.4 GB/s on our 2-core Xeon), so the same bits cost half the time. The tag is
    never used.
    """

    def __init__(self, key: bytes, nonce: bytes) -> None:
        first = int.from_bytes(nonce[12:], "big")
        self._pending = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor().update(
            bytes(16 * (2 - first)))
        self._gcm = Cipher(algorithms.AES(key), modes.GCM(nonce[:12])).encryptor()

    def update_into(self, data: memoryview, buf: np.ndarray) -> int:
        """Encrypt zeros `data` into buf, like a CipherContext's update_into."""
        head = min(len(self._pending), len(data))
        if head:
            buf[:head] = np.frombuffer(self._pending[:head], dtype=np.uint8)
            self._pending = self._pending[head:]
        if head < len(data):
            # ndarray is a writable buffer; the cryptography stubs name only bytes-like types
            self._gcm.update_into(data[head:], buf[head:])  # type: ignore[arg-type]
        return len(data)


def _encryptor(key: bytes, nonce: bytes, algorithm: str, nbytes: int):  # type: ignore[no-untyped-def]
    """A streaming encryptor whose update_into on zeros writes the keystream of `nbytes` bytes."""
    key, nonce = bytes(key), bytes(nonce)
    if algorithm == "chacha20":
        return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    first = int.from_bytes(nonce[12:], "big")
    # GCM's counter must not carry out of the low 32 bits, where CTR's would
    if nbytes >= _GCM_MIN_BYTES and first <= 2 and first + -(-nbytes // 16) <= 1 << 32:
        try:
            return _CtrThroughGcm(key, nonce)
        except UnsupportedAlgorithm:  # a backend without GCM (or refusing a caller's IV): CTR
            pass
    return Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()


def _ring_dtype(ring_bits: int) -> np.dtype:
    if isinstance(ring_bits, bool) or not isinstance(ring_bits, int):
        raise ParameterError(f"ring_bits must be an int, got {ring_bits!r}")
    if not MIN_RING_BITS <= ring_bits <= MAX_RING_BITS:
        raise ParameterError(f"ring_bits must lie in [{MIN_RING_BITS}, {MAX_RING_BITS}]")
    return np.dtype(np.uint32 if ring_bits <= 32 else np.uint64)


class _WordStream:
    """One (key, nonce) keystream read as consecutive little-endian words into a caller's buffer."""

    def __init__(self, key: bytes, length: int, dtype: np.dtype, nonce: bytes,
                 algorithm: str) -> None:
        _check_key_nonce(key, nonce)
        _check_algorithm(algorithm, nonce, length * dtype.itemsize)
        self._encryptor = _encryptor(key, nonce, algorithm, length * dtype.itemsize)

    def read_into(self, buffer: np.ndarray, count: int) -> np.ndarray:
        """The next count words, written to buffer (with _SLACK spare bytes) and returned."""
        nbytes, raw = count * buffer.itemsize, buffer.view(np.uint8)
        chunk = len(_ZERO_CHUNK)
        for start in range(0, nbytes, chunk):  # loops over 4 MiB chunks, never over elements
            stop = min(start + chunk, nbytes)
            self._encryptor.update_into(_ZERO_CHUNK[: stop - start], raw[start : stop + _SLACK])
        words = buffer[:count]
        if not _LITTLE_ENDIAN:
            words.byteswap(inplace=True)
        return words


def _word_buffer(dtype: np.dtype, words: int) -> np.ndarray:
    return np.empty(words + -(-_SLACK // dtype.itemsize), dtype=dtype)


def keystream_bytes(
    key: bytes, nbytes: int, *, nonce: bytes = bytes(NONCE_BYTES), algorithm: str = "aes-256-ctr"
) -> bytes:
    """First nbytes of the AES-256-CTR (or ChaCha20) keystream for (key, nonce)."""
    _check_count(nbytes, "nbytes")
    dtype = np.dtype(np.uint8)
    stream = _WordStream(key, nbytes, dtype, nonce, algorithm)
    return stream.read_into(_word_buffer(dtype, nbytes), nbytes).tobytes()


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
    _check_count(length, "length")
    dtype = _ring_dtype(ring_bits)
    stream = _WordStream(key, length, dtype, nonce, algorithm)
    out = stream.read_into(_word_buffer(dtype, length), length)
    if ring_bits not in (32, 64):
        np.bitwise_and(out, dtype.type((1 << ring_bits) - 1), out=out)
    return out


def uniform_word_blocks(
    key: bytes,
    length: int,
    *,
    ring_bits: int,
    block: int = STREAM_BLOCK_WORDS,
    nonce: bytes = bytes(NONCE_BYTES),
    algorithm: str = "aes-256-ctr",
) -> Iterator[np.ndarray]:
    """uniform_ring(key, length, ...) in consecutive blocks of `block` elements (the last shorter).

    Every block is a view of one buffer that the next block overwrites: use it before asking for
    the next. Concatenated, the blocks equal uniform_ring's vector, bit for bit.
    """
    dtype = _ring_dtype(ring_bits)
    _check_count(length, "length")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ParameterError(f"block must be a positive int, got {block!r}")
    stream = _WordStream(key, length, dtype, nonce, algorithm)  # checks key, nonce, counter now
    return _blocks(stream, _word_buffer(dtype, min(block, length)), length, block, ring_bits)


def _blocks(stream: _WordStream, buffer: np.ndarray, length: int, block: int,
            ring_bits: int) -> Iterator[np.ndarray]:
    for start in range(0, length, block):
        words = stream.read_into(buffer, min(block, length - start))
        if ring_bits not in (32, 64):
            np.bitwise_and(words, buffer.dtype.type((1 << ring_bits) - 1), out=words)
        yield words


def add_uniform_rings(
    total: np.ndarray,
    signed_keys: Sequence[tuple[bytes, int]],
    *,
    ring_bits: int,
    nonce: bytes = bytes(NONCE_BYTES),
    algorithm: str = "aes-256-ctr",
) -> None:
    """total <- total + sum(sign * uniform_ring(key)) mod 2^ring_bits, in place; sign is +1 or -1.

    Equal, bit for bit, to adding each uniform_ring vector in turn, but no mask is ever held
    whole: every keystream is read block by block beside the others and added to that block of
    total while both are in cache. total must be a 1-D C-contiguous array of the ring's dtype
    (uint32 up to 32 bits, else uint64) holding ring elements; the result is reduced.
    """
    dtype = _ring_dtype(ring_bits)
    if not isinstance(total, np.ndarray) or total.dtype != dtype or total.ndim != 1:
        raise ParameterError(
            f"total must be a 1-D {dtype} array for a {ring_bits}-bit ring, got "
            f"{getattr(total, 'dtype', type(total).__name__)} with shape "
            f"{getattr(total, 'shape', None)}")
    if not total.flags.c_contiguous or not total.flags.writeable:
        raise ParameterError("total must be C-contiguous and writeable (it is updated in place)")
    streams = []
    for key, sign in signed_keys:
        if isinstance(sign, bool) or not isinstance(sign, (int, np.integer)) or sign not in (1, -1):
            raise ParameterError(f"a mask's sign must be +1 or -1, got {sign!r}")
        streams.append((_WordStream(key, total.size, dtype, nonce, algorithm),
                        np.add if sign > 0 else np.subtract))
    block = STREAM_BLOCK_WORDS
    buffer = _word_buffer(dtype, min(block, total.size))
    for start in range(0, total.size, block):
        part = total[start : start + block]
        for stream, combine in streams:
            # Unmasked words suffice: 2^k divides 2^32 (2^64), so reducing once at the end
            # gives what masking every word to k bits first would.
            combine(part, stream.read_into(buffer, part.size), out=part)
    if ring_bits not in (32, 64):
        np.bitwise_and(total, dtype.type((1 << ring_bits) - 1), out=total)
