"""Fused Triton ChaCha20 block kernel: one program instance computes BLOCK keystream blocks.

Imported only when triton is installed; chacha20.keystream_words is the public entry point.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 128  # keystream blocks per program instance (8 KiB of output)


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
def _chacha20_kernel(key_ptr, nonce_ptr, out_ptr, total_blocks, blocks_per_key,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < total_blocks
    k = offs // blocks_per_key
    index = (offs % blocks_per_key).to(tl.uint32)
    kp = key_ptr + k * 8
    np_ = nonce_ptr + k * 4
    # uint32 lanes: adds wrap modulo 2^32 and >> is a logical shift.
    k0 = tl.load(kp + 0, mask=live, other=0).to(tl.uint32, bitcast=True)
    k1 = tl.load(kp + 1, mask=live, other=0).to(tl.uint32, bitcast=True)
    k2 = tl.load(kp + 2, mask=live, other=0).to(tl.uint32, bitcast=True)
    k3 = tl.load(kp + 3, mask=live, other=0).to(tl.uint32, bitcast=True)
    k4 = tl.load(kp + 4, mask=live, other=0).to(tl.uint32, bitcast=True)
    k5 = tl.load(kp + 5, mask=live, other=0).to(tl.uint32, bitcast=True)
    k6 = tl.load(kp + 6, mask=live, other=0).to(tl.uint32, bitcast=True)
    k7 = tl.load(kp + 7, mask=live, other=0).to(tl.uint32, bitcast=True)
    n0 = tl.load(np_ + 0, mask=live, other=0).to(tl.uint32, bitcast=True) + index
    n1 = tl.load(np_ + 1, mask=live, other=0).to(tl.uint32, bitcast=True)
    n2 = tl.load(np_ + 2, mask=live, other=0).to(tl.uint32, bitcast=True)
    n3 = tl.load(np_ + 3, mask=live, other=0).to(tl.uint32, bitcast=True)
    s0 = tl.full([BLOCK], 0x61707865, tl.uint32)
    s1 = tl.full([BLOCK], 0x3320646E, tl.uint32)
    s2 = tl.full([BLOCK], 0x79622D32, tl.uint32)
    s3 = tl.full([BLOCK], 0x6B206574, tl.uint32)
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
    o = out_ptr + offs.to(tl.int64) * 16
    tl.store(o + 0, (x0 + s0).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 1, (x1 + s1).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 2, (x2 + s2).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 3, (x3 + s3).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 4, (x4 + k0).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 5, (x5 + k1).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 6, (x6 + k2).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 7, (x7 + k3).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 8, (x8 + k4).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 9, (x9 + k5).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 10, (x10 + k6).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 11, (x11 + k7).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 12, (x12 + n0).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 13, (x13 + n1).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 14, (x14 + n2).to(tl.int32, bitcast=True), mask=live)
    tl.store(o + 15, (x15 + n3).to(tl.int32, bitcast=True), mask=live)


def keystream_blocks(key_words: torch.Tensor, nonce_words: torch.Tensor,
                     blocks: int) -> torch.Tensor:
    """(K, blocks * 16) int32 keystream of K keys; the caller checked the counter range."""
    k = key_words.shape[0]
    total = k * blocks
    out = torch.empty(total * 16, dtype=torch.int32, device=key_words.device)
    grid = (triton.cdiv(total, _BLOCK),)
    _chacha20_kernel[grid](key_words.contiguous(), nonce_words.contiguous(), out, total, blocks,
                           BLOCK=_BLOCK)
    return out.reshape(k, blocks * 16)
