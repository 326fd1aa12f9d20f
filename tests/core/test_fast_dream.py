"""The optimised dream step computes dreams.dream_gradient's gradient (fp32), batched or not."""

from __future__ import annotations

import os

import pytest
import torch

from codream_secure.dreams import DreamLossWeights, dream_gradient
from codream_secure.errors import ConfigError
from codream_secure.gpu.fast_dream import (
    BatchedDreamStep,
    FastDreamStep,
    dream_gradients,
    group_by_architecture,
)
from codream_secure.models import build_model

COMPILE_TESTS = bool(os.environ.get("CODREAM_TEST_COMPILE")) or torch.cuda.is_available()

SHAPE = (3, 8, 8)
W = DreamLossWeights()


def model(name: str, seed: int) -> torch.nn.Module:
    """A zoo model whose BatchNorm running statistics are not the initial 0/1."""
    torch.manual_seed(seed)
    m = build_model(name, input_shape=SHAPE, num_classes=10)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, *SHAPE) * 1.5 + 0.3)
    return m.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def dreams(seed: int = 0, batch: int = 5) -> torch.Tensor:
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))


# fp32 differs from the reference only in summation order: ~1e-7 observed, 1e-5 allowed.
@pytest.mark.parametrize("name", ["smallcnn", "resnet8", "wrn16_1", "mobilenet", "vgg11"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fp32_step_equals_the_reference(name, channels_last):
    m, x = model(name, 1), dreams()
    expected = dream_gradient(m, x, W)
    x_before = x.clone()
    got = FastDreamStep(m, W, channels_last=channels_last)(x)
    assert got.dtype == torch.float32 and got.shape == x.shape and got.is_contiguous()
    assert rel(got, expected) < 1e-5
    assert torch.equal(x, x_before)
    assert all(p.grad is None for p in m.parameters())


def test_without_bn_statistics_equals_the_reference():
    m, x = model("resnet8", 2), dreams(1)
    weights = DreamLossWeights(tv=1e-2, l2=1e-3)
    expected = dream_gradient(m, x, weights, use_bn_statistics=False)
    assert rel(FastDreamStep(m, weights, use_bn_statistics=False)(x), expected) < 1e-5
    assert rel(FastDreamStep(m, weights)(x), expected) > 1e-2  # the BN term does matter


# E[x^2] - E[x]^2 in float32 loses ~1e-7 * E[x]^2/var relative; activations here have
# E[x]^2/var below 1e2, so 1e-5 holds with room (observed ~1e-7).
@pytest.mark.parametrize("name", ["resnet8", "wrn16_1"])
def test_one_pass_bn_moments_equal_the_reference(name):
    m, x = model(name, 5), dreams(5)
    expected = dream_gradient(m, x, W)
    assert rel(FastDreamStep(m, W, bn_moments="sums")(x), expected) < 1e-5
    got = BatchedDreamStep([m, model(name, 6)], W, bn_moments="sums")(x)
    assert rel(got[0], expected) < 1e-5


def test_one_pass_bn_moments_keep_the_variance_non_negative():
    # a constant channel: E[x^2] - E[x]^2 may round below zero; the variance is clamped at 0
    from codream_secure.gpu.fast_dream import _moments

    x = torch.full((4, 3, 5, 5), 0.1)
    mean, var = _moments(x, [0, 2, 3], "sums")
    assert torch.allclose(mean, torch.full((3,), 0.1))
    assert bool((var >= 0).all()) and float(var.max()) < 1e-6


# Zero channels add exact zeros to every sum: only summation order may differ (1e-5 as above).
@pytest.mark.parametrize("name", ["resnet8", "vgg11", "mobilenet", "wrn16_1"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_padded_stem_equals_the_reference(name, channels_last):
    from codream_secure.gpu.fast_dream import _PaddedStemConv

    m, x = model(name, 7), dreams(7)
    step = FastDreamStep(m, W, channels_last=channels_last, stem_channels=8)
    padded = [mod for mod in step._skeleton.modules() if isinstance(mod, _PaddedStemConv)]
    first_conv = next(mod for mod in step._skeleton.modules()
                      if isinstance(mod, torch.nn.Conv2d))
    assert padded == [first_conv]
    got = step(x)
    assert got.shape == x.shape
    assert rel(got, dream_gradient(m, x, W)) < 1e-5
    assert all(type(mod) is torch.nn.Conv2d for mod in m.modules()  # the live model untouched
               if isinstance(mod, torch.nn.Conv2d))


def test_padded_stem_refuses_too_few_channels_and_other_stems():
    with pytest.raises(ConfigError, match="stem_channels: 3 must exceed the stem's 3"):
        FastDreamStep(model("resnet8", 1), W, stem_channels=3)
    reflecting = model("smallcnn", 1)
    next(m for m in reflecting.modules() if isinstance(m, torch.nn.Conv2d)).padding_mode = \
        "reflect"
    with pytest.raises(ConfigError, match="groups=1 and zero padding, got groups=1, 'reflect'"):
        FastDreamStep(reflecting, W, stem_channels=8)


def test_padded_stem_traces_without_graph_breaks():
    m, x = model("smallcnn", 8), dreams(8, batch=4)
    step = FastDreamStep(m, W, stem_channels=8, compile_model=True, compile_backend="aot_eager")
    assert rel(step(x), dream_gradient(m, x, W)) < 1e-5


# The same norms summed in another order: fp32 rounding only (1e-5 as above).
@pytest.mark.parametrize("name", ["resnet8", "vgg11", "mobilenet", "wrn16_1"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_bn_norms_equal_the_reference(name, channels_last):
    m, x = model(name, 9), dreams(9)
    expected = dream_gradient(m, x, W)
    got = FastDreamStep(m, W, channels_last=channels_last, bn_norms="grouped")(x)
    assert rel(got, expected) < 1e-5
    batched = BatchedDreamStep([m, model(name, 10)], W, bn_norms="grouped")(x)
    assert rel(batched[0], expected) < 1e-5
    assert rel(batched[1], dream_gradient(model(name, 10), x, W)) < 1e-5


def count_vector_norms(step: FastDreamStep, x: torch.Tensor) -> int:
    """vector_norm calls in the traced dream loss."""
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(lambda state, inputs: step._loss_fn(state, inputs))(step._state(), x).graph
    return sum(1 for node in graph.nodes
               if node.op == "call_function" and "linalg_vector_norm" in str(node.target))


def test_grouped_bn_norms_take_one_norm_call_per_channel_width():
    m = build_model("resnet18", input_shape=(3, 16, 16), num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    layers = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    widths = {b.num_features for b in layers}
    assert (len(layers), len(widths)) == (20, 4)
    # one more norm in both: the loss's l2 term of x
    assert count_vector_norms(FastDreamStep(m, W), x) == 2 * len(layers) + 1
    assert count_vector_norms(FastDreamStep(m, W, bn_norms="grouped"), x) == len(widths) + 1


def test_grouped_bn_norms_trace_without_graph_breaks():
    m, x = model("resnet8", 11), dreams(11, batch=4)
    step = FastDreamStep(m, W, bn_norms="grouped", compile_model=True,
                         compile_backend="aot_eager")
    assert rel(step(x), dream_gradient(m, x, W)) < 1e-5


# fuse_bn: the same loss through bn_act_moments; float32 sums in another order (1e-5 as above)
@pytest.mark.parametrize("name", ["resnet8", "smallcnn", "wrn16_1", "vgg11"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_bn_equals_the_reference(name, channels_last):
    m, x = model(name, 12), dreams(12)
    got = FastDreamStep(m, W, channels_last=channels_last, bn_moments="sums", fuse_bn=True)(x)
    assert rel(got, dream_gradient(m, x, W)) < 1e-5


def test_fused_bn_with_grouped_norms_equals_the_reference():
    m, x = model("resnet8", 13), dreams(13)
    got = FastDreamStep(m, W, bn_moments="sums", fuse_bn=True, bn_norms="grouped")(x)
    assert rel(got, dream_gradient(m, x, W)) < 1e-5


@pytest.mark.parametrize("name, calls, with_residual", [
    ("resnet8", 9, 3),  # the stem; 2 + 3 + 3 BatchNorms of 3 blocks, 3 adds
    ("smallcnn", 3, 0),  # conv-BN-ReLU three times in a Sequential
    ("wrn16_1", 1, 0),  # pre-activation blocks stay as they are; the final BN-ReLU fuses
])
def test_fused_bn_routes_only_the_known_patterns(name, calls, with_residual, monkeypatch):
    from codream_secure.gpu import fast_dream

    seen: list[bool] = []
    op = fast_dream.bn_act_moments

    def counted(x, mean, var, weight, bias, eps, residual, relu):
        seen.append(residual is not None)
        return op(x, mean, var, weight, bias, eps, residual, relu)

    m, x = model(name, 14), dreams(14, batch=2)
    step = FastDreamStep(m, W, bn_moments="sums", fuse_bn=True)
    monkeypatch.setattr(fast_dream, "bn_act_moments", counted)
    step(x)
    assert (len(seen), sum(seen)) == (calls, with_residual)
    assert any(type(layer) is torch.nn.ReLU for layer in m.modules())  # the live model keeps
    # its own modules: only the skeleton's ReLUs that were folded became identities


def test_fused_bn_refuses_what_it_cannot_fuse():
    m = model("resnet8", 15)
    with pytest.raises(ConfigError, match="bn_moments='sums'"):
        FastDreamStep(m, W, fuse_bn=True)  # Welford moments: not what the op computes
    with pytest.raises(ConfigError, match="use_bn_statistics=True"):
        FastDreamStep(m, W, bn_moments="sums", fuse_bn=True, use_bn_statistics=False)
    with pytest.raises(ConfigError, match="no BatchNorm of this model"):
        FastDreamStep(model("mobilenet", 15), W, bn_moments="sums", fuse_bn=True)


def test_fused_bn_traces_without_graph_breaks():
    m, x = model("resnet8", 16), dreams(16, batch=4)
    step = FastDreamStep(m, W, bn_moments="sums", fuse_bn=True, compile_model=True,
                         compile_backend="aot_eager")
    assert rel(step(x), dream_gradient(m, x, W)) < 1e-5


def test_unknown_bn_norms_are_refused():
    with pytest.raises(ConfigError, match="bn_norms must be 'per-layer' or 'grouped'"):
        FastDreamStep(model("resnet8", 1), W, bn_norms="fused")  # type: ignore[arg-type]


def test_unknown_bn_moments_are_refused():
    with pytest.raises(ConfigError, match="bn_moments"):
        FastDreamStep(model("resnet8", 1), W, bn_moments="welford")  # type: ignore[arg-type]


def test_compile_options_reach_torch_compile_with_cuda_graphs(monkeypatch):
    # inductor settings must travel as options: a patched global config is ignored when Dynamo
    # reuses a graph compiled with equal options (seen on an H100). No CUDA needed: the step's
    # settings are built here and torch.compile is replaced by a recorder.
    from codream_secure.gpu import fast_dream

    calls = []
    monkeypatch.setattr(fast_dream.torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    config = fast_dream._Config(torch.device("cuda"), "bf16", True, True, False, True,
                                "inductor", {"coordinate_descent_tuning": True})
    config.wrap(lambda x: x)
    assert calls == [{"fullgraph": True, "backend": "inductor",
                      "options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}]
    fast_dream._Config(torch.device("cuda"), "bf16", True, True, False, True,
                       "inductor").wrap(lambda x: x)
    assert calls[1] == {"mode": "reduce-overhead", "fullgraph": True, "backend": "inductor"}


def test_bad_compile_options_are_refused():
    m = model("resnet8", 1)
    with pytest.raises(ConfigError, match="no_such_setting"):
        FastDreamStep(m, W, compile_model=True, compile_options={"no_such_setting": 1})
    with pytest.raises(ConfigError, match="inductor"):
        FastDreamStep(m, W, compile_model=True, compile_backend="aot_eager",
                      compile_options={"coordinate_descent_tuning": True})


def test_the_step_follows_the_live_parameters():
    m, x = model("smallcnn", 3), dreams(2)
    step = FastDreamStep(m, W)
    before = step(x)
    with torch.no_grad():
        m.fc.weight.mul_(2.0)
        m.features[1].running_mean.add_(0.5)
    after = step(x)
    assert rel(after, before) > 1e-3
    assert rel(after, dream_gradient(m, x, W)) < 1e-5
    m.fc.weight = torch.nn.Parameter(torch.randn_like(m.fc.weight))  # a new tensor object
    replaced = step(x)
    assert rel(replaced, after) > 1e-3
    assert rel(replaced, dream_gradient(m, x, W)) < 1e-5
    m.fc.weight.data = m.fc.weight.data * 3.0  # same object, new memory
    moved = step(x)
    assert rel(moved, replaced) > 1e-3
    assert rel(moved, dream_gradient(m, x, W)) < 1e-5
    m.fc = torch.nn.Linear(m.fc.in_features, m.fc.out_features)  # a new submodule
    swapped = step(x)
    assert rel(swapped, moved) > 1e-3
    assert rel(swapped, dream_gradient(m, x, W)) < 1e-5


def test_a_model_without_batchnorm_needs_the_bn_term_off():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    m(torch.zeros(1, *SHAPE))
    with pytest.raises(ConfigError, match="BatchNorm"):
        FastDreamStep(m, W)
    FastDreamStep(m, W, use_bn_statistics=False)(dreams())


def test_bf16_autocast_on_cpu_stays_close():
    # bf16 keeps 8 significant bits (2^-9 relative per rounding) and the BN term subtracts close
    # numbers, so bf16 moves grad_x by 7-20% relative here against fp32 -- for the reference
    # under the same autocast too. The tight check is therefore against that reference (observed
    # 0.6-0.9% apart: our BN statistics are computed in fp32); against fp32 only the direction is
    # checked (observed cosine >= 0.98).
    m, x = model("resnet8", 4), dreams(3, batch=16)
    fp32 = dream_gradient(m, x, W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference_bf16 = dream_gradient(m, x, W)
    got = FastDreamStep(m, W, precision="bf16")(x)
    assert got.dtype == torch.float32
    assert rel(got, reference_bf16) < 0.03
    assert torch.nn.functional.cosine_similarity(got.flatten(), fp32.flatten(), dim=0) > 0.95


def test_vmapped_clients_equal_per_client_steps():
    models = [model("resnet8", s) for s in range(3)]
    x = dreams(4)
    step = BatchedDreamStep(models, W)
    grads = step(x)
    assert grads.shape == (3, *x.shape)
    for k, m in enumerate(models):
        assert rel(grads[k], FastDreamStep(m, W)(x)) < 1e-5
        assert rel(grads[k], dream_gradient(m, x, W)) < 1e-5
    with torch.no_grad():  # an optimiser step on one client must be seen (restacking)
        models[1].fc.bias.add_(1.0)
    assert rel(step(x)[1], dream_gradient(models[1], x, W)) < 1e-5


def test_clients_are_grouped_by_architecture():
    four_classes = build_model("resnet8", input_shape=SHAPE, num_classes=4)  # another head
    models = [model("smallcnn", 1), model("resnet8", 2), model("smallcnn", 3), four_classes,
              model("smallcnn", 4)]
    assert group_by_architecture(models) == [[0, 2, 4], [1], [3]]


def test_vmap_refuses_different_architectures():
    with pytest.raises(ConfigError, match="architecture"):
        BatchedDreamStep([model("resnet8", 0), model("smallcnn", 0)], W)


def test_heterogeneous_clients_on_cpu_run_one_after_another():
    models = [model(name, 5) for name in ("smallcnn", "wrn16_1")]
    x = dreams(5)
    grads = dream_gradients([FastDreamStep(m, W) for m in models], x)
    for g, m in zip(grads, models, strict=True):
        assert rel(g, dream_gradient(m, x, W)) < 1e-5


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="precision"):
        FastDreamStep(model("smallcnn", 0), W, precision="fp8")


@pytest.mark.slow
@pytest.mark.skipif(not COMPILE_TESTS, reason="torch.compile on the CPU takes about a minute; "
                    "set CODREAM_TEST_COMPILE=1 (always on with CUDA)")
@pytest.mark.parametrize("bn_moments", ["var_mean", "sums"])
def test_compiled_without_graph_breaks_equals_eager(bn_moments):
    # aot_eager runs Dynamo + AOTAutograd (where graph breaks and functionalisation happen)
    # without inductor's slow CPU code generation; fullgraph=True turns a break into an error.
    models = [model("smallcnn", s) for s in range(2)]
    x = dreams(6, batch=4)
    options = {"compile_model": True, "compile_backend": "aot_eager", "bn_moments": bn_moments}
    single = FastDreamStep(models[0], W, **options)
    batched = BatchedDreamStep(models, W, **options)
    assert rel(single(x), dream_gradient(models[0], x, W)) < 1e-5
    grads = batched(x)
    for k, m in enumerate(models):
        assert rel(grads[k], dream_gradient(m, x, W)) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_optimised_cuda_step_matches_the_fp32_reference():
    m = build_model("resnet8", input_shape=(3, 32, 32), num_classes=10).cuda().eval()
    x = torch.randn(64, 3, 32, 32, device="cuda")
    allow = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare against true fp32 convolutions
    try:
        expected = dream_gradient(m, x, W)
        assert rel(FastDreamStep(m, W)(x), expected) < 1e-4
    finally:
        # restored before compiling: a flag changed between warm-up and graph capture makes
        # cuDNN search for an algorithm inside the capture, which fails
        torch.backends.cudnn.allow_tf32 = allow
    fast = FastDreamStep.optimised(m, W)
    first, second = fast(x), fast(x)  # the second call replays the CUDA graph
    assert torch.equal(first, second)
    assert torch.nn.functional.cosine_similarity(first.flatten(), expected.flatten(), dim=0) > 0.95
    for variant in ({"stem_channels": 8}, {"bn_norms": "grouped"}, {"fuse_bn": True}):
        other_way = FastDreamStep.optimised(m, W, **variant)(x)
        assert torch.nn.functional.cosine_similarity(other_way.flatten(), expected.flatten(),
                                                     dim=0) > 0.95
    # two compiled clients in one round: their CUDA graphs share a memory pool, so they must
    # not overwrite each other's buffers (they did when replayed on several streams)
    other = build_model("resnet8", input_shape=(3, 32, 32), num_classes=10).cuda().eval()
    steps = [fast, FastDreamStep.optimised(other, W)]
    alone = [fast(x), steps[1](x)]
    for _ in range(3):
        together = dream_gradients(steps, x, overlap=True)
        for g, a in zip(together, alone, strict=True):
            assert rel(g, a) < 1e-5  # an overwritten buffer gives O(1) errors or NaN
    models = [build_model("resnet8", input_shape=(3, 32, 32), num_classes=10).cuda().eval()
              for _ in range(2)]
    grads = dream_gradients([FastDreamStep(mm, W) for mm in models], x, overlap=True)
    for g, mm in zip(grads, models, strict=True):
        assert rel(g, dream_gradient(mm, x, W)) < 1e-3  # TF32 may differ by stream/algorithm


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_optimised_batched_cuda_step_matches_per_client_references():
    models = [build_model("resnet8", input_shape=(3, 32, 32), num_classes=10).cuda().eval()
              for _ in range(3)]
    x = torch.randn(32, 3, 32, 32, device="cuda")
    batched = BatchedDreamStep(models, W, precision="bf16", channels_last=True,
                               compile_model=True)
    first, second = batched(x), batched(x)  # the second call replays the CUDA graph
    assert torch.equal(first, second)
    for k, m in enumerate(models):
        expected = dream_gradient(m, x, W)
        # bf16 moves grad_x by up to ~20% relative on random models (see docs/gpu.md)
        assert torch.nn.functional.cosine_similarity(first[k].flatten(), expected.flatten(),
                                                     dim=0) > 0.95


def test_more_compiled_steps_than_dynamos_recompile_limit():
    # Dynamo caches per code object and, with fullgraph=True, fails hard past 8 graphs: steps
    # sharing _loss_fn's code did once enough architectures or shapes were compiled in one
    # process. Each step now has its own code object. Without automatic dynamic shapes every
    # input size is a graph of its own, which stands in for architectures here (faster).
    limit = torch._dynamo.config.recompile_limit
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.BatchNorm2d(2),
                            torch.nn.Flatten(1), torch.nn.Identity())
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for size in range(4, 4 + limit + 1):
            x = torch.randn(2, 3, size, size)
            m[-1] = torch.nn.Linear(2 * (size - 2) ** 2, 4)
            m.eval()
            step = FastDreamStep(m, W, compile_model=True, compile_backend="aot_eager")
            assert rel(step(x), dream_gradient(m, x, W)) < 1e-5
