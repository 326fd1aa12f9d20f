"""Fused Triton ChaCha20 block kernel: one program instance computes BLOCK keystream blocks.

Imported only when triton is installed; chacha20.keystream_words is the public entry point.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 128  # keystream blocks per program instance (8 KiB of output)
_FUSED_BLOCK = 64  # blocks per program of the fused kernels (1,024 values)
# One thread per block: Triton lays a BLOCK-long vector over num_warps * 32 threads, and more
# threads than elements compute each element twice (the fused kernels did, with the default 4).
_WARPS = _BLOCK // 32
_FUSED_WARPS = _FUSED_BLOCK // 32


@triton.jit
def _rotl(v, n: tl.constexpr):
    return (v << n) | (v >> (32 - n))


@triton.jit
def _qr(a, b, c, d):
    a = a + b
    d = _rotl(d ^ a, 16)
    c = c + d
    b = _rotl(b ^ c, 12)
    a = a + b
    d = _rotl(d ^ a, 8)
    c = c + d
    b = _rotl(b ^ c, 7)
    return a, b, c, d


@triton.jit
def _block(k0, k1, k2, k3, k4, k5, k6, k7, n0, n1, n2, n3):
    """The 16 keystream words of the blocks with these state words (uint32 vectors)."""
    s0 = tl.full(n0.shape, 0x61707865, tl.uint32)
    s1 = tl.full(n0.shape, 0x3320646E, tl.uint32)
    s2 = tl.full(n0.shape, 0x79622D32, tl.uint32)
    s3 = tl.full(n0.shape, 0x6B206574, tl.uint32)
    x0, x1, x2, x3, x4, x5, x6, x7 = s0, s1, s2, s3, k0, k1, k2, k3
    x8, x9, x10, x11, x12, x13, x14, x15 = k4, k5, k6, k7, n0, n1, n2, n3
    for _ in range(10):  # a compact loop: 10 double rounds
        x0, x4, x8, x12 = _qr(x0, x4, x8, x12)
        x1, x5, x9, x13 = _qr(x1, x5, x9, x13)
        x2, x6, x10, x14 = _qr(x2, x6, x10, x14)
        x3, x7, x11, x15 = _qr(x3, x7, x11, x15)
        x0, x5, x10, x15 = _qr(x0, x5, x10, x15)
        x1, x6, x11, x12 = _qr(x1, x6, x11, x12)
        x2, x7, x8, x13 = _qr(x2, x7, x8, x13)
        x3, x4, x9, x14 = _qr(x3, x4, x9, x14)
    return (x0 + s0, x1 + s1, x2 + s2, x3 + s3, x4 + k0, x5 + k1, x6 + k2, x7 + k3,
            x8 + k4, x9 + k5, x10 + k6, x11 + k7, x12 + n0, x13 + n1, x14 + n2, x15 + n3)


@triton.jit
def _chacha20_kernel(key_ptr, nonce_ptr, out_ptr, total_blocks, blocks_per_key,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < total_blocks
    k = offs // blocks_per_key
    index = (offs % blocks_per_key).to(tl.uint32)
    kp = key_ptr + k * 8
    np_ = nonce_ptr + k * 4
    # uint32 lanes: adds wrap modulo 2^32 and >> is a logical shift.
    w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15 = _block(
        _lane_word(kp, 0, live), _lane_word(kp, 1, live), _lane_word(kp, 2, live),
        _lane_word(kp, 3, live), _lane_word(kp, 4, live), _lane_word(kp, 5, live),
        _lane_word(kp, 6, live), _lane_word(kp, 7, live),
        _lane_word(np_, 0, live) + index, _lane_word(np_, 1, live), _lane_word(np_, 2, live),
        _lane_word(np_, 3, live))
    o = out_ptr + offs.to(tl.int64) * 16
    tl.store(o + 0, w0.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 1, w1.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 2, w2.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 3, w3.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 4, w4.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 5, w5.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 6, w6.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 7, w7.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 8, w8.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 9, w9.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 10, w10.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 11, w11.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 12, w12.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 13, w13.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 14, w14.to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 15, w15.to(tl.int32, bitcast=True), mask=live)


@triton.jit
def _lane_word(ptr, i, live):
    """Word i of each lane's key or nonce (ptr is a vector of per-lane addresses)."""
    return tl.load(ptr + i, mask=live, other=0).to(tl.uint32, bitcast=True)


@triton.jit
def _key_block(key_ptr, nonce_ptr, index):
    """Keystream words of blocks `index` (a uint32 vector) of the one key at key_ptr."""
    zero = tl.zeros(index.shape, tl.uint32)
    return _block(zero + _word(key_ptr, 0), zero + _word(key_ptr, 1), zero + _word(key_ptr, 2),
                  zero + _word(key_ptr, 3), zero + _word(key_ptr, 4), zero + _word(key_ptr, 5),
                  zero + _word(key_ptr, 6), zero + _word(key_ptr, 7),
                  index + _word(nonce_ptr, 0), zero + _word(nonce_ptr, 1),
                  zero + _word(nonce_ptr, 2), zero + _word(nonce_ptr, 3))


@triton.jit
def _word(ptr, i):
    """Word i of the one key or nonce at ptr, as uint32."""
    return tl.load(ptr + i).to(tl.uint32, bitcast=True)


@triton.jit
def _encode(x_ptr, offs, n, dither, scale, limit):
    """The codec's float32 stochastic encoding of x[offs] (uint32 residues; 0 past n).

    x * 2^f is exact, clamping and floor are exact, and the uniform is built from the dither
    word's top 23 bits exactly as protocols.codec does: no step rounds.
    """
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    scaled = tl.minimum(tl.maximum(x * scale, -limit), limit)
    floor = tl.floor(scaled)
    uniform = (((dither >> 9) & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True) - 1.0
    q = floor.to(tl.int32) + (uniform < scaled - floor).to(tl.int32)
    return q.to(tl.uint32, bitcast=True)


@triton.jit
def _store(out_ptr, offs, n, acc, RING_BITS: tl.constexpr):
    if RING_BITS < 32:
        acc = acc & ((1 << RING_BITS) - 1)
    tl.store(out_ptr + offs, acc.to(tl.int32, bitcast=True), mask=offs < n)


@triton.jit
def _add_signed_masks(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
                      key_ptr, nonce_ptr, sign_ptr, index, FIRST: tl.constexpr,
                      N_MASKS: tl.constexpr):
    """a_j + sum_k sign_k * word j of key k's blocks `index`, for keys FIRST..FIRST+N_MASKS-1.

    A sign of -1 is 0xFFFFFFFF as uint32: w * sign wraps to -w modulo 2^32.
    """
    # a loop, not tl.static_range: unrolled, ptxas hoisted every mask's key words and spilled
    # for 16 masks (tests/core/test_triton_compile.py checks that sm_90 builds spill nothing)
    for k in tl.range(FIRST, FIRST + N_MASKS, loop_unroll_factor=1):
        sign = tl.load(sign_ptr + k - FIRST).to(tl.uint32, bitcast=True)
        w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15 = _key_block(
            key_ptr + k * 8, nonce_ptr + k * 4, index)
        a0 += w0 * sign
        a1 += w1 * sign
        a2 += w2 * sign
        a3 += w3 * sign
        a4 += w4 * sign
        a5 += w5 * sign
        a6 += w6 * sign
        a7 += w7 * sign
        a8 += w8 * sign
        a9 += w9 * sign
        a10 += w10 * sign
        a11 += w11 * sign
        a12 += w12 * sign
        a13 += w13 * sign
        a14 += w14 * sign
        a15 += w15 * sign
    return a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15


@triton.jit
def _masked_upload_kernel(x_ptr, key_ptr, nonce_ptr, sign_ptr, out_ptr, n, scale, limit,
                          N_MASKS: tl.constexpr, RING_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """encode(x) + sum_k sign_k * PRG(key_k) for BLOCK keystream blocks (16 values each).

    Key 0 is the stochastic-rounding dither; keys 1..N_MASKS are the self and pair masks (a
    compile-time count: one variant per number of active peers). Value
    i is word i of each stream, as in keystream_blocks, so the result equals the unfused path.
    """
    blocks = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    index = blocks.to(tl.uint32)
    o = blocks.to(tl.int64) * 16
    d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12, d13, d14, d15 = _key_block(
        key_ptr, nonce_ptr, index)
    a0 = _encode(x_ptr, o + 0, n, d0, scale, limit)
    a1 = _encode(x_ptr, o + 1, n, d1, scale, limit)
    a2 = _encode(x_ptr, o + 2, n, d2, scale, limit)
    a3 = _encode(x_ptr, o + 3, n, d3, scale, limit)
    a4 = _encode(x_ptr, o + 4, n, d4, scale, limit)
    a5 = _encode(x_ptr, o + 5, n, d5, scale, limit)
    a6 = _encode(x_ptr, o + 6, n, d6, scale, limit)
    a7 = _encode(x_ptr, o + 7, n, d7, scale, limit)
    a8 = _encode(x_ptr, o + 8, n, d8, scale, limit)
    a9 = _encode(x_ptr, o + 9, n, d9, scale, limit)
    a10 = _encode(x_ptr, o + 10, n, d10, scale, limit)
    a11 = _encode(x_ptr, o + 11, n, d11, scale, limit)
    a12 = _encode(x_ptr, o + 12, n, d12, scale, limit)
    a13 = _encode(x_ptr, o + 13, n, d13, scale, limit)
    a14 = _encode(x_ptr, o + 14, n, d14, scale, limit)
    a15 = _encode(x_ptr, o + 15, n, d15, scale, limit)
    a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 = _add_signed_masks(
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
        key_ptr, nonce_ptr, sign_ptr, index, 1, N_MASKS)
    _store(out_ptr, o + 0, n, a0, RING_BITS)
    _store(out_ptr, o + 1, n, a1, RING_BITS)
    _store(out_ptr, o + 2, n, a2, RING_BITS)
    _store(out_ptr, o + 3, n, a3, RING_BITS)
    _store(out_ptr, o + 4, n, a4, RING_BITS)
    _store(out_ptr, o + 5, n, a5, RING_BITS)
    _store(out_ptr, o + 6, n, a6, RING_BITS)
    _store(out_ptr, o + 7, n, a7, RING_BITS)
    _store(out_ptr, o + 8, n, a8, RING_BITS)
    _store(out_ptr, o + 9, n, a9, RING_BITS)
    _store(out_ptr, o + 10, n, a10, RING_BITS)
    _store(out_ptr, o + 11, n, a11, RING_BITS)
    _store(out_ptr, o + 12, n, a12, RING_BITS)
    _store(out_ptr, o + 13, n, a13, RING_BITS)
    _store(out_ptr, o + 14, n, a14, RING_BITS)
    _store(out_ptr, o + 15, n, a15, RING_BITS)


@triton.jit
def _ring_word(row_ptr, offs, n):
    """One upload's values at offs as uint32 (0 past n)."""
    return tl.load(row_ptr + offs, mask=offs < n, other=0).to(tl.uint32, bitcast=True)


@triton.jit
def _add_rows(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
              u_ptr, o, n, m, N_ROWS: tl.constexpr):
    """a_j + sum over the N_ROWS uploads (rows of m int32 values) of value o + j (wraps)."""
    # one row per iteration, never unrolled: unrolled, ptxas spilled from 16 rows on
    for r in tl.range(0, N_ROWS, loop_unroll_factor=1):
        row = u_ptr + r * m
        a0 += _ring_word(row, o + 0, n)
        a1 += _ring_word(row, o + 1, n)
        a2 += _ring_word(row, o + 2, n)
        a3 += _ring_word(row, o + 3, n)
        a4 += _ring_word(row, o + 4, n)
        a5 += _ring_word(row, o + 5, n)
        a6 += _ring_word(row, o + 6, n)
        a7 += _ring_word(row, o + 7, n)
        a8 += _ring_word(row, o + 8, n)
        a9 += _ring_word(row, o + 9, n)
        a10 += _ring_word(row, o + 10, n)
        a11 += _ring_word(row, o + 11, n)
        a12 += _ring_word(row, o + 12, n)
        a13 += _ring_word(row, o + 13, n)
        a14 += _ring_word(row, o + 14, n)
        a15 += _ring_word(row, o + 15, n)
    return a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15


@triton.jit
def _decode_store(out_ptr, offs, n, acc, inv_scale, RING_BITS: tl.constexpr):
    """Signed reading of the ring value (sign-extended from RING_BITS) times 2^-f, float32."""
    if RING_BITS < 32:
        acc = acc << (32 - RING_BITS)
    signed = acc.to(tl.int32, bitcast=True)
    if RING_BITS < 32:
        signed = signed >> (32 - RING_BITS)  # arithmetic shift on int32: sign extension
    tl.store(out_ptr + offs, signed.to(tl.float32) * inv_scale, mask=offs < n)


@triton.jit
def _unmask_sum_kernel(u_ptr, key_ptr, nonce_ptr, sign_ptr, out_ptr, n, m, inv_scale,
                       N_ROWS: tl.constexpr, N_MASKS: tl.constexpr, RING_BITS: tl.constexpr,
                       BLOCK: tl.constexpr):
    """decode(sum_r u_r + sum_k sign_k * PRG(key_k)) for BLOCK keystream blocks, as float32.

    The server's side: the ring sum of the uploads, the removal of the masks it rebuilt (self
    masks of survivors, pair masks of dropped clients), and the decoding, in one pass.
    """
    blocks = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    index = blocks.to(tl.uint32)
    o = blocks.to(tl.int64) * 16
    zero = tl.zeros(index.shape, tl.uint32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 = _add_rows(
        zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero,
        zero, zero, u_ptr, o, n, m, N_ROWS)
    a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 = _add_signed_masks(
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
        key_ptr, nonce_ptr, sign_ptr, index, 0, N_MASKS)
    _decode_store(out_ptr, o + 0, n, a0, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 1, n, a1, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 2, n, a2, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 3, n, a3, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 4, n, a4, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 5, n, a5, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 6, n, a6, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 7, n, a7, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 8, n, a8, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 9, n, a9, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 10, n, a10, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 11, n, a11, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 12, n, a12, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 13, n, a13, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 14, n, a14, inv_scale, RING_BITS)
    _decode_store(out_ptr, o + 15, n, a15, inv_scale, RING_BITS)


def fused_unmask_sum(uploads: torch.Tensor, key_words: torch.Tensor, nonce_words: torch.Tensor,
                     signs: torch.Tensor, *, inv_scale: float, ring_bits: int) -> torch.Tensor:
    """One launch: float32 decoding of the ring sum of `uploads` (rows) plus the signed masks.

    The caller checked the counter range, the dtypes (int32 rows) and ring_bits <= 32.
    """
    rows, n = uploads.shape
    out = torch.empty(n, dtype=torch.float32, device=uploads.device)
    grid = (triton.cdiv(-(-n // 16), _FUSED_BLOCK),)
    _unmask_sum_kernel[grid](uploads.contiguous(), key_words.contiguous(),
                             nonce_words.contiguous(), signs.contiguous(), out, n, n, inv_scale,
                             N_ROWS=rows, N_MASKS=key_words.shape[0], RING_BITS=ring_bits,
                             BLOCK=_FUSED_BLOCK, num_warps=_FUSED_WARPS)
    return out


def fused_masked_upload(x: torch.Tensor, key_words: torch.Tensor, nonce_words: torch.Tensor,
                        signs: torch.Tensor, *, scale: float, limit: float,
                        ring_bits: int) -> torch.Tensor:
    """One launch: the float32 stochastic encoding of x plus the signed masks (int32 lanes).

    Row 0 of key_words/nonce_words is the dither key, rows 1.. the masks with `signs` (+1/-1).
    The caller checked the counter range, x's dtype (float32) and ring_bits <= 32.
    """
    n = x.numel()
    out = torch.empty(n, dtype=torch.int32, device=x.device)
    blocks = -(-n // 16)
    grid = (triton.cdiv(blocks, _FUSED_BLOCK),)
    _masked_upload_kernel[grid](x.contiguous(), key_words.contiguous(), nonce_words.contiguous(),
                                signs.contiguous(), out, n, scale, limit,
                                N_MASKS=key_words.shape[0] - 1, RING_BITS=ring_bits,
                                BLOCK=_FUSED_BLOCK, num_warps=_FUSED_WARPS)
    return out


def keystream_blocks(key_words: torch.Tensor, nonce_words: torch.Tensor,
                     blocks: int) -> torch.Tensor:
    """(K, blocks * 16) int32 keystream of K keys; the caller checked the counter range."""
    k = key_words.shape[0]
    total = k * blocks
    out = torch.empty(total * 16, dtype=torch.int32, device=key_words.device)
    grid = (triton.cdiv(total, _BLOCK),)
    _chacha20_kernel[grid](key_words.contiguous(), nonce_words.contiguous(), out, total, blocks,
                           BLOCK=_BLOCK, num_warps=_WARPS)
    return out.reshape(k, blocks * 16)
