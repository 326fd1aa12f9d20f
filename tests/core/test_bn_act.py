"""bn_act_moments: eval BatchNorm, residual, ReLU and per-channel sums in one op; gradients."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from codream_secure.gpu import bn_act
from codream_secure.gpu.bn_act import bn_act_moments

INTERPRETED = (os.environ.get("TRITON_INTERPRET") == "1"
               and importlib.util.find_spec("triton") is not None)


def inputs(shape, dtype=torch.float32, residual=True, channels_last=True, seed=0):
    """x, the BatchNorm's (mean, var, weight, bias) and optionally a residual like x."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    if channels_last and x.dim() == 4:
        x, r = (t.to(memory_format=torch.channels_last) for t in (x, r))
    stats = (torch.randn(c, generator=g) * 0.3, torch.rand(c, generator=g) + 0.5,
             torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g))
    return x, stats, r if residual else None


def expected(x, stats, residual, relu, eps=1e-5):
    """What the op should give: F.batch_norm, the add and the ReLU in float64, and the sums."""
    mean, var, weight, bias = (t.double() for t in stats)
    z = torch.nn.functional.batch_norm(x.double(), mean, var, weight, bias, False, 0.0, eps)
    if residual is not None:
        z = z + residual.double()
    y = torch.relu(z) if relu else z
    dims = [d for d in range(x.dim()) if d != 1]
    return y, torch.stack([x.double().sum(dims), x.double().square().sum(dims)])


@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 7, 3, 3), (9, 4)])
@pytest.mark.parametrize("residual, relu", [(False, False), (True, True), (False, True)])
def test_float32_values_equal_the_plain_formula(shape, residual, relu):
    x, stats, r = inputs(shape, residual=residual)
    y, sums = bn_act_moments(x, *stats, residual=r, relu=relu)
    want_y, want_sums = expected(x, stats, r, relu)
    assert y.dtype == x.dtype and y.stride() == x.stride()
    torch.testing.assert_close(y.double(), want_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums.double(), want_sums, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual, relu", [(True, True), (False, True), (False, False)])
def test_gradients_pass_gradcheck(residual, relu):
    # every tensor input: x, the statistics, weight, bias and the residual
    x, stats, r = inputs((2, 3, 3, 2), residual=residual, seed=1)
    args = [t.double().requires_grad_() for t in (x, *stats)]
    if residual:
        args.append(r.double().requires_grad_())

    def f(x, mean, var, weight, bias, r=None):
        return bn_act_moments(x, mean, var, weight, bias, 1e-5, r, relu)

    assert torch.autograd.gradcheck(f, tuple(args))


def test_without_weight_and_bias_it_is_batch_norm_without_affine():
    x, (mean, var, _, _), _ = inputs((2, 3, 4, 4))
    y, _ = bn_act_moments(x, mean, var)
    want = torch.nn.functional.batch_norm(x, mean, var, None, None, False, 0.0, 1e-5)
    torch.testing.assert_close(y, want)


def test_the_raw_ops_per_block_sums_pass_gradcheck():
    # 40 positions: two blocks of partial sums, so the op's backward gets a different gradient
    # for each block (through the wrapper, which sums them, it is always the same)
    x, stats, r = inputs((2, 3, 5, 4), residual=True, seed=3)
    x, r = (t.double().requires_grad_() for t in (x, r))
    stats = tuple(t.double() for t in stats)
    assert bn_act.rows_per_block(40) < 40
    op = torch.ops.codream.bn_act_moments
    _, partial = op(x, *stats, 1e-5, r, True)
    assert partial.shape == (2, 2, 3)
    assert torch.autograd.gradcheck(lambda x, r: op(x, *stats, 1e-5, r, True), (x, r))


def test_nan_in_x_stays_visible_in_outputs_and_gradient():
    # the step's NaN check must see a NaN dream: the Triton path keeps NaN through its ReLU too
    x, stats, _ = inputs((2, 3, 2, 2), residual=False)
    x[0, 1, 0, 0] = float("nan")
    x.requires_grad_()
    y, sums = bn_act_moments(x, *stats, relu=True)
    assert torch.isnan(y[0, 1, 0, 0]) and torch.isnan(sums[:, 1]).all()
    assert not torch.isnan(sums[:, [0, 2]]).any()
    (y.sum() + sums.sum()).backward()
    assert torch.isnan(x.grad[0, 1, 0, 0])  # through the sums' gradient, 2 x
    assert not torch.isnan(x.grad[:, [0, 2]]).any()


def test_wrong_shapes_are_refused():
    x, (mean, var, weight, bias), r = inputs((2, 3, 2, 2))
    with pytest.raises(ValueError, match="needs \\(C,\\) statistics"):
        bn_act_moments(x, mean[:2], var)
    with pytest.raises(ValueError, match="'weight': \\(4,\\)"):
        bn_act_moments(x, mean, var, torch.ones(4))
    with pytest.raises(ValueError, match="residual"):
        bn_act_moments(x, mean, var, residual=r[:1])


def test_triton_runs_only_where_it_can(monkeypatch):
    x, _, r = inputs((2, 3, 2, 2))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not bn_act.triton_path(x, r)  # a CPU tensor, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not bn_act.triton_path(x.contiguous())  # not an (M, C) row-major storage
    assert not bn_act.triton_path(x, r.contiguous())  # residual in another layout
    assert not bn_act.triton_path(x.double())
    if importlib.util.find_spec("triton") is not None:
        assert bn_act.triton_path(x, r)


def test_the_op_traces_into_a_compiled_graph():
    x, stats, r = inputs((2, 3, 4, 4), seed=2)
    x.requires_grad_()

    def f(x, r):
        y, sums = bn_act_moments(x, *stats, residual=r, relu=True)
        return (y.square().sum() + sums.sum()), y

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss, y = compiled(x, r)
    (grad,) = torch.autograd.grad(loss, x)
    x2 = x.detach().clone().requires_grad_()
    loss2, y2 = f(x2, r)
    (grad2,) = torch.autograd.grad(loss2, x2)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(grad, grad2)


BF16_ULP = 2.0 ** -7  # relative: the interpreter and the GPU may round a bf16 store apart


@pytest.mark.triton
@pytest.mark.skipif(not INTERPRETED, reason="needs triton with TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (2, 70, 3, 3), (40, 130), (64, 8, 16, 16)])
@pytest.mark.parametrize("residual, relu", [(False, False), (True, True)])
def test_triton_kernel_in_the_interpreter_equals_the_torch_path(dtype, shape, residual, relu,
                                                               monkeypatch):
    # (64, 8, 16, 16) has 16,384 positions: the kernel's several-tiles-per-program path
    x, stats, r = inputs(shape, dtype=dtype, residual=residual)
    assert bn_act.triton_path(x, r)
    y, sums = bn_act_moments(x, *stats, residual=r, relu=relu)
    _, partial = torch.ops.codream.bn_act_moments(x, *stats, 1e-5, r, relu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not bn_act.triton_path(x, r)
    y_torch, sums_torch = bn_act_moments(x, *stats, residual=r, relu=relu)
    _, partial_torch = torch.ops.codream.bn_act_moments(x, *stats, 1e-5, r, relu)
    # the same blocks of positions in both paths (the backward relies on it)
    torch.testing.assert_close(partial, partial_torch, rtol=1e-5, atol=1e-4)
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_torch, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(y.float(), y_torch.float(), rtol=BF16_ULP, atol=1e-6)
    # float32 sums in another order: 1e-5 relative
    torch.testing.assert_close(sums, sums_torch, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(256, 64, 32, 32), (3, 130, 5, 7)])
def test_triton_kernel_on_cuda_equals_the_torch_path(shape):
    x, stats, r = inputs(shape, dtype=torch.bfloat16)
    x, r, stats = x.cuda(), r.cuda(), tuple(t.cuda() for t in stats)
    assert bn_act.triton_path(x, r)
    y, sums = bn_act_moments(x, *stats, residual=r, relu=True)
    want_y, want_sums = expected(x, stats, r, True)
    torch.testing.assert_close(y.double(), want_y, rtol=BF16_ULP, atol=1e-6)
    # float32 sums of up to 262,144 values per channel against float64
    torch.testing.assert_close(sums.double(), want_sums, rtol=1e-5, atol=1e-2)
