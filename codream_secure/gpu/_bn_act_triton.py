"""Triton kernel of bn_act.bn_act_moments: eval BatchNorm, residual, ReLU and moments, one pass.

Imported only when triton is installed; bn_act.bn_act_moments is the public entry point.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from codream_secure.gpu.bn_act_blocks import BLOCK_M, row_blocks, rows_per_block

# 32 x 64 tiles on 4 warps: 16 elements per thread. ptxas for sm_90 gives at most 96
# registers and no spills (71 with a residual and several tiles); 64-row tiles took 190
# (tests/core/test_triton_compile.py).
_MAX_BLOCK_C = 64  # channels per tile; 64 bf16 channels are one 128-byte row segment
_WARPS = 4


@triton.jit
def _bn_act_moments_kernel(x_ptr, res_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, y_ptr,
                           part_ptr, M, C, eps, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr):
    """y = [relu]((x - mean) * rsqrt(var + eps) * weight + bias [+ res]) over an (M, C)
    row-major view; this program's column sums of x and x^2 (float32) into part[pid_m]."""
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    # eval BatchNorm as x * scale + shift, computed here: in the traced step these per-layer
    # vectors would each be one more tiny kernel
    scale = tl.rsqrt(tl.load(var_ptr + cols, mask=cmask, other=1.0).to(tl.float32) + eps)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    shift = -tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(TILES):
        rows = (pid_m * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = x * scale[None, :] + shift[None, :]
        if HAS_RES:
            z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:  # NaN stays NaN, as torch.relu keeps it, so the step's NaN check sees it
            z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)
        s1 += tl.sum(x, axis=0)
        s2 += tl.sum(x * x, axis=0)
    base = pid_m.to(tl.int64) * 2 * C
    tl.store(part_ptr + base + cols, s1, mask=cmask)
    tl.store(part_ptr + base + C + cols, s2, mask=cmask)


def bn_act_moments(x2d: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                   weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   res2d: torch.Tensor | None, relu: bool, y2d: torch.Tensor) -> torch.Tensor:
    """Fill y2d (M, C); return the (G, 2, C) float32 sums of x2d and x2d^2 over each block
    of rows_per_block(M) rows."""
    m, c = x2d.shape
    block_c = min(_MAX_BLOCK_C, triton.next_power_of_2(c))
    tiles, grid_m = rows_per_block(m) // BLOCK_M, row_blocks(m)
    partial = torch.empty((grid_m, 2, c), device=x2d.device, dtype=torch.float32)
    _bn_act_moments_kernel[(grid_m, triton.cdiv(c, block_c))](
        x2d, x2d if res2d is None else res2d, mean, var,
        var if weight is None else weight, var if bias is None else bias, y2d, partial, m, c,
        eps, HAS_RES=res2d is not None, RELU=relu, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_C=block_c, TILES=tiles,
        num_warps=_WARPS)
    return partial
