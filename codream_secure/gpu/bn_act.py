"""One pass per BatchNorm of the dream step: eval BN, residual add, ReLU and the BN term's sums.

In the compiled step, inductor computes a BatchNorm's output (fused with its ReLU) in one kernel
and the input's per-channel moments in another. It will not fuse the two, so every BatchNorm
input is read twice (docs/gpu.md, "The step's kernels, counted without a GPU"). `bn_act_moments`
reads it once. It is a custom op, opaque to inductor: a Triton kernel on channels_last CUDA
tensors (and on the CPU under TRITON_INTERPRET=1), torch operations elsewhere. Its backward is
written in torch operations, so inductor fuses it with its neighbours. Without a residual, the
backward takes the ReLU's mask from x, which it reads anyway, not from a saved output.
"""

from __future__ import annotations

import torch

from codream_secure.gpu.bn_act_blocks import row_blocks, rows_per_block
from codream_secure.gpu.triton_support import triton_runs_on

__all__ = ["bn_act_moments", "row_blocks", "rows_per_block", "triton_path"]

def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """t as an (M, C) row-major view of its storage (NHWC or (N, C)), or None if it is not."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # a view: no copy
    if t.dim() == 2 and t.is_contiguous():
        return t
    return None


def triton_path(x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether bn_act_moments runs its Triton kernel for these tensors."""
    dtype_ok = x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    layout_ok = _rows(x) is not None and (residual is None or (
        residual.shape == x.shape and residual.stride() == x.stride()))
    return dtype_ok and layout_ok and triton_runs_on(x.device)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or wider if it is (float64 stays float64, for gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _channel_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))


def _scale_shift(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as x * scale + shift (per channel, float32 or wider)."""
    scale = torch.rsqrt(_wide(var) + eps)
    if weight is not None:
        scale = scale * _wide(weight)
    shift = -_wide(mean) * scale
    return scale, shift if bias is None else shift + _wide(bias)


def _pre_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
             residual: torch.Tensor | None) -> torch.Tensor:
    z = _wide(x) * _channel_view(scale, x) + _channel_view(shift, x)
    return z if residual is None else z + _wide(residual)


@torch.library.custom_op("codream::bn_act_moments", mutates_args=())
def _bn_act_moments(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    residual: torch.Tensor | None, relu: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, partial): partial[g] = (sum x, sum x^2) over block g of rows_per_block positions."""
    if triton_path(x, residual):
        from codream_secure.gpu._bn_act_triton import bn_act_moments as kernel

        y = torch.empty_like(x)
        partial = kernel(_rows(x), mean, var, weight, bias, eps,
                         None if residual is None else _rows(residual), relu, _rows(y))
        return y, partial
    z = _pre_act(x, *_scale_shift(mean, var, weight, bias, eps), residual)
    y = (torch.relu(z) if relu else z).to(x.dtype)
    rows = _wide(x).movedim(1, -1).reshape(-1, x.shape[1])  # (N, ..., C) order, as the kernel
    per_block, count = rows_per_block(rows.shape[0]), row_blocks(rows.shape[0])
    rows = torch.nn.functional.pad(rows, (0, 0, 0, count * per_block - rows.shape[0]))
    rows = rows.view(count, per_block, x.shape[1])
    return y, torch.stack([rows.sum(1), rows.square().sum(1)], dim=1)


@_bn_act_moments.register_fake
def _(x, mean, var, weight, bias, eps, residual, relu):  # type: ignore[no-untyped-def]
    wide = torch.promote_types(x.dtype, torch.float32)
    count = row_blocks(x.numel() // x.shape[1])
    return torch.empty_like(x), x.new_empty((count, 2, x.shape[1]), dtype=wide)


def _per_position(partial: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(G, C) per-block values spread over x's positions, in x's shape (N, C, ...)."""
    m = x.numel() // x.shape[1]
    rows = partial.repeat_interleave(rows_per_block(m), dim=0)[:m]
    return rows.reshape(*x.movedim(1, -1).shape).movedim(-1, 1)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, mean, var, weight, bias, eps, residual, relu = inputs
    ctx.eps, ctx.relu, ctx.has_residual = eps, relu, residual is not None
    ctx.residual_dtype = None if residual is None else residual.dtype
    # With a residual, the ReLU's mask is read off y (torch's own rule for relu's gradient):
    # y is kept anyway, as the next convolution's input. Without one, it is recomputed from x,
    # which the sums' gradient reads anyway, and y need not be kept.
    ctx.save_for_backward(x, mean, var, weight, bias,
                          output[0] if relu and residual is not None else None)


def _backward(ctx, grad_y, grad_partial):  # type: ignore[no-untyped-def]
    """Gradients of (y, partial) with respect to every tensor input."""
    x, mean, var, weight, bias, y = ctx.saved_tensors
    dims = [d for d in range(x.dim()) if d != 1]
    scale, shift = _scale_shift(mean, var, weight, bias, ctx.eps)
    grad_z = grad_y
    if ctx.relu:  # NaN in z gives no gradient, as relu's does
        active = y > 0 if y is not None else _pre_act(x, scale, shift, None) > 0
        # masked in grad_y's dtype: the residual's gradient, which the next kernel reads, is
        # then stored in bf16, not float32 (4 bytes per element less each way)
        grad_z = torch.where(active, grad_y,
                             torch.zeros((), dtype=grad_y.dtype, device=grad_y.device))
    xf, grad_zf = _wide(x), _wide(grad_z)
    grad_x = grad_zf * _channel_view(scale, x)
    if grad_partial is not None:
        grad_x = (grad_x + _per_position(grad_partial[:, 0], x)
                  + 2.0 * xf * _per_position(grad_partial[:, 1], x))
    needs = ctx.needs_input_grad  # x, mean, var, weight, bias, eps, residual, relu
    grad_mean = grad_var = grad_weight = grad_bias = None
    if any(needs[1:5]):  # y = (x - mean) * rsqrt(var + eps) * weight + bias
        centred = (grad_zf * (xf - _channel_view(_wide(mean), x))).sum(dims)
        sum_grad = grad_zf.sum(dims)
        inv_std = torch.rsqrt(_wide(var) + ctx.eps)
        gain = inv_std if weight is None else inv_std * _wide(weight)
        grad_mean = (-gain * sum_grad).to(mean.dtype) if needs[1] else None
        grad_var = (-0.5 * centred * gain / (_wide(var) + ctx.eps)).to(var.dtype) \
            if needs[2] else None
        grad_weight = (centred * inv_std).to(weight.dtype) if needs[3] else None
        grad_bias = sum_grad.to(bias.dtype) if needs[4] else None
    grad_residual = grad_z.to(ctx.residual_dtype) if ctx.has_residual and needs[6] else None
    return (grad_x.to(x.dtype), grad_mean, grad_var, grad_weight, grad_bias, None,
            grad_residual, None)


_bn_act_moments.register_autograd(_backward, setup_context=_setup_context)


def bn_act_moments(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-5, residual: torch.Tensor | None = None, relu: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """([relu](BN(x) [+ residual]), stack([sum x, sum x^2])) per channel (dim 1).

    BN is eval-mode BatchNorm with these running statistics, weight and bias, as
    F.batch_norm(x, mean, var, weight, bias, False, 0, eps) computes it; the arithmetic is
    float32 (float64 for float64 x) and y has x's dtype. The sums are over every dimension
    but the channel's.
    """
    channels = (x.shape[1],) if x.dim() >= 2 else None
    given = {"mean": mean, "var": var, "weight": weight, "bias": bias}
    wrong = {k: tuple(v.shape) for k, v in given.items() if v is not None and v.shape != channels}
    if channels is None or wrong:
        raise ValueError(f"bn_act_moments: x {tuple(x.shape)} needs (C,) statistics and "
                         f"parameters, got {wrong}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"bn_act_moments: residual {tuple(residual.shape)} is not x's shape "
                         f"{tuple(x.shape)}")
    y, partial = _bn_act_moments(x, mean, var, weight, bias, float(eps), residual, relu)
    # summed outside the op: traced, inductor fuses this sum with what reads the sums
    return y, partial.sum(0)
