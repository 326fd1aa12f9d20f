"""ChaCha20 keystream (RFC 8439 block function) computed on a torch device, many keys at once.

Bit-exact with `cryptography`'s ChaCha20 and with `protocols.primitives.prg` (algorithm
"chacha20"): the same 32-byte key and the same 16-byte `nonce` convention -- bytes 0-3 the initial
32-bit block counter (little-endian), bytes 4-15 the 96-bit RFC 8439 nonce. Keystream word i is
state word i mod 16 of block i // 16, which is exactly the little-endian uint32 at bytes 4i..4i+3,
so ring elements come straight out of the block function without any byte shuffling.

Words live in int32 lanes (the uint32 bit pattern); int32 add/xor/shift wrap modulo 2^32 on every
torch backend, and the logical right shift is an arithmetic shift followed by a mask.
Backends: "torch" (eager, any device), "compiled" (torch.compile of one double round, reused ten
times: small enough to compile quickly), "triton" (a fused kernel; CUDA, or the Triton interpreter
under TRITON_INTERPRET=1). "auto" picks triton on CUDA when it imports, else torch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from codream_secure.errors import ConfigError
from codream_secure.gpu.triton_support import triton_importable, triton_runs_on

__all__ = [
    "BACKENDS",
    "available_backends",
    "host_to_device",
    "key_tensors",
    "keystream_bytes",
    "keystream_words",
    "resolve_backend",
    "uniform_ring",
]

BACKENDS = ("auto", "torch", "compiled", "triton")
KEY_BYTES, NONCE_BYTES, BLOCK_WORDS = 32, 16, 16
_SIGMA = np.frombuffer(b"expand 32-byte k", dtype="<u4").view("<i4")  # RFC 8439 constants


def available_backends(device: torch.device | str) -> tuple[str, ...]:
    """Backends that can run on `device` here (triton needs CUDA or TRITON_INTERPRET=1)."""
    names = ["torch", "compiled"]
    dev = torch.device(device)
    if triton_runs_on(dev):
        names.append("triton")
    return tuple(names)


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend `backend` runs as on `device` ('auto' resolved); unknown names are refused."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ConfigError(f"ChaCha20 backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "torch"
    if backend == "triton" and "triton" not in available_backends(device):
        raise ConfigError(f"the triton backend is not available on {device}")
    return backend


def _key_nonce_words(keys: Sequence[bytes], nonces: Sequence[bytes]) -> tuple[np.ndarray, ...]:
    """(K, 8) key words and (K, 4) counter+nonce words as int32 bit patterns."""
    for key in keys:
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise ConfigError(f"a ChaCha20 key must be exactly {KEY_BYTES} bytes")
    for nonce in nonces:
        if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_BYTES:
            raise ConfigError(f"a ChaCha20 nonce (counter || nonce) must be {NONCE_BYTES} bytes")
    key_words = np.frombuffer(b"".join(map(bytes, keys)), dtype="<u4").reshape(-1, 8)
    nonce_words = np.frombuffer(b"".join(map(bytes, nonces)), dtype="<u4").reshape(-1, 4)
    return key_words.view("<i4").astype(np.int32), nonce_words.view("<i4").astype(np.int32)


def host_to_device(words: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host words on `device` without waiting for the device's queue to drain.

    A plain copy from pageable memory synchronises the stream, which would stall the host behind
    every kernel queued before (the gradients of the step); a pinned source copies asynchronously.
    """
    host = torch.from_numpy(words)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _rotl(v: torch.Tensor, n: int) -> torch.Tensor:
    return (v << n) | ((v >> (32 - n)) & ((1 << n) - 1))


def _quarter(a, b, c, d):  # type: ignore[no-untyped-def]
    a = a + b
    d = _rotl(d ^ a, 16)
    c = c + d
    b = _rotl(b ^ c, 12)
    a = a + b
    d = _rotl(d ^ a, 8)
    c = c + d
    b = _rotl(b ^ c, 7)
    return a, b, c, d


def _double_round(a, b, c, d):  # type: ignore[no-untyped-def]
    """Column round on rows (a, b, c, d) of the 4x4 state, then the diagonal round."""
    a, b, c, d = _quarter(a, b, c, d)
    # Rolling rows 1-3 left by 1, 2, 3 lines the diagonals up as columns.
    a, b, c, d = _quarter(a, b.roll(-1, 0), c.roll(-2, 0), d.roll(-3, 0))
    return a, b.roll(1, 0), c.roll(2, 0), d.roll(3, 0)


@functools.cache
def _compiled_double_round():  # type: ignore[no-untyped-def]
    return torch.compile(_double_round, dynamic=False)


def _initial_state(key_words: torch.Tensor, nonce_words: torch.Tensor, blocks: int) -> torch.Tensor:
    """(16, K * blocks) int32 initial states, block counter = initial counter + block index."""
    device = key_words.device
    k = key_words.shape[0]
    counter = (nonce_words[:, 0].to(torch.int64) & 0xFFFFFFFF)[:, None] + torch.arange(
        blocks, device=device, dtype=torch.int64)
    # Counter values are < 2^32 (checked by the caller); map them onto their int32 bit pattern.
    counter = torch.where(counter >= 1 << 31, counter - (1 << 32), counter).to(torch.int32)
    sigma = torch.as_tensor(_SIGMA.astype(np.int32), device=device)
    rows = [sigma[i].expand(k, blocks) for i in range(4)]
    rows += [key_words[:, i : i + 1].expand(k, blocks) for i in range(8)]
    rows.append(counter)
    rows += [nonce_words[:, i : i + 1].expand(k, blocks) for i in range(1, 4)]
    return torch.stack(rows).reshape(16, k * blocks)


def _blocks_torch(state: torch.Tensor, compiled: bool) -> torch.Tensor:
    rounds = _compiled_double_round() if compiled else _double_round
    a, b, c, d = state[0:4], state[4:8], state[8:12], state[12:16]
    for _ in range(10):  # 20 rounds
        a, b, c, d = rounds(a, b, c, d)
    return torch.cat([a, b, c, d]) + state  # (16, K * blocks)


def _check_counter(nonce_words: np.ndarray, blocks: int) -> None:
    counters = nonce_words[:, 0].view(np.uint32).astype(np.int64)
    if blocks and int(counters.max()) + blocks > 1 << 32:
        raise ConfigError(
            f"a ChaCha20 stream of {blocks} blocks would overflow the 32-bit block counter"
        )


def key_tensors(keys: Sequence[bytes], nonces: Sequence[bytes], blocks: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, 8) key and (K, 4) counter+nonce words on `device` for streams of `blocks` blocks.

    Refuses malformed keys and nonces and a stream that would pass the 32-bit block counter.
    """
    key_np, nonce_np = _key_nonce_words(keys, nonces)
    _check_counter(nonce_np, blocks)
    return host_to_device(key_np, device), host_to_device(nonce_np, device)


def keystream_words(
    keys: Sequence[bytes],
    n_words: int,
    *,
    nonces: Sequence[bytes] | None = None,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> torch.Tensor:
    """(len(keys), n_words) int32 tensor: the first n_words keystream words of each key.

    Each value is the uint32 keystream word as its int32 bit pattern. `nonces` defaults to
    all-zero 16-byte values (block counter 0, RFC nonce 0), the protocol's convention.
    """
    if isinstance(n_words, bool) or not isinstance(n_words, int) or n_words < 0:
        raise ConfigError(f"n_words must be an int >= 0, got {n_words!r}")
    keys = list(keys)
    nonces = [bytes(NONCE_BYTES)] * len(keys) if nonces is None else list(nonces)
    if not keys or len(nonces) != len(keys):
        raise ConfigError("keystream_words needs at least one key and one nonce per key")
    device = torch.device(device)
    backend = resolve_backend(backend, device)
    blocks = -(-n_words // BLOCK_WORDS)
    if blocks == 0:
        _key_nonce_words(keys, nonces)  # malformed keys are refused even for an empty stream
        return torch.empty(len(keys), 0, dtype=torch.int32, device=device)
    key_words, nonce_words = key_tensors(keys, nonces, blocks, device)
    if backend == "triton":
        from codream_secure.gpu._chacha20_triton import keystream_blocks

        out = keystream_blocks(key_words, nonce_words, blocks)  # (K, blocks * 16)
    else:
        state = _initial_state(key_words, nonce_words, blocks)
        words = _blocks_torch(state, compiled=backend == "compiled")
        out = words.reshape(16, len(keys), blocks).permute(1, 2, 0).reshape(len(keys), -1)
    return out[:, :n_words]


def keystream_bytes(
    key: bytes, nbytes: int, *, nonce: bytes = bytes(NONCE_BYTES),
    device: torch.device | str = "cpu", backend: str = "auto",
) -> bytes:
    """First nbytes of the keystream as bytes (for tests and known-answer checks)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ConfigError(f"nbytes must be an int >= 0, got {nbytes!r}")
    words = keystream_words([key], -(-nbytes // 4), nonces=[nonce], device=device,
                            backend=backend)
    return words.cpu().numpy().astype("<i4").tobytes()[:nbytes]


def uniform_ring(
    keys: Sequence[bytes], length: int, *, ring_bits: int,
    nonces: Sequence[bytes] | None = None, device: torch.device | str = "cpu",
    backend: str = "auto",
) -> torch.Tensor:
    """(len(keys), length) ring elements, equal to prg.uniform_ring(..., algorithm="chacha20").

    int32 bit patterns for ring_bits <= 32 (4-byte words), int64 for 33..64 (8-byte words, low
    word first), each masked to ring_bits.
    """
    if isinstance(ring_bits, bool) or not isinstance(ring_bits, int) or not 8 <= ring_bits <= 64:
        raise ConfigError(f"ring_bits must be an int in [8, 64], got {ring_bits!r}")
    if ring_bits <= 32:
        words = keystream_words(keys, length, nonces=nonces, device=device, backend=backend)
        return words if ring_bits == 32 else words & ((1 << ring_bits) - 1)
    words = keystream_words(keys, 2 * length, nonces=nonces, device=device, backend=backend)
    pairs = words.to(torch.int64).reshape(words.shape[0], length, 2)
    wide = (pairs[..., 0] & 0xFFFFFFFF) | (pairs[..., 1] << 32)
    return wide if ring_bits == 64 else wide & ((1 << ring_bits) - 1)
