"""The fast path of local training and distillation trains the model the eager path trains."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from codream_secure import train_step
from codream_secure.distill import distill, train_local
from codream_secure.errors import ConfigError
from codream_secure.models import build_model
from codream_secure.train_step import FastPath, make_optimizer

COMPILE_TESTS = bool(os.environ.get("CODREAM_TEST_COMPILE")) or torch.cuda.is_available()
SHAPE = (1, 8, 8)
# aot_eager runs Dynamo and AOTAutograd (graph breaks, functionalised BatchNorm updates) without
# inductor's slow CPU code generation; fullgraph=True turns any graph break into an error.
TRACED = FastPath(compile_backend="aot_eager", fused_optimizer=False)


def model(name: str = "smallcnn", seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, input_shape=SHAPE, num_classes=10).to(device)


def data(n: int = 20, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=gen)
    return x.to(device), torch.randint(0, 10, (n,), generator=gen).to(device)


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def max_rel(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest relative difference over parameters and BatchNorm buffers."""
    worst = 0.0
    for (name, u), v in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if u.is_floating_point():
            worst = max(worst, float((u - v).norm() / v.norm().clamp_min(1e-12)))
        else:
            assert torch.equal(u, v), name
    return worst


def train(m: torch.nn.Module, fast: FastPath | None, device: str = "cpu", **kw) -> dict:
    x, y = data(device=device)
    return train_local(m, x, y, epochs=2, lr=0.05, batch_size=8, generator=gen(), fast=fast,
                       **kw)


def kd(m: torch.nn.Module, fast: FastPath | None, device: str = "cpu", **kw) -> dict:
    x, _ = data(seed=1, device=device)
    teacher = F.softmax(torch.randn(20, 10, generator=torch.Generator().manual_seed(2)), dim=1)
    teacher = teacher.to(device)
    return distill(m, x, teacher, epochs=2, lr=0.01, batch_size=8, teacher_kind="probs",
                   generator=gen(), optimizer="adam", fast=fast, **kw)


def test_fast_path_settings_are_checked():
    with pytest.raises(ConfigError, match="compile_backend"):
        FastPath(compile_backend="tvm")
    with pytest.raises(ConfigError, match="cuda_graphs"):
        FastPath(compile_backend="aot_eager", cuda_graphs=True)
    with pytest.raises(ConfigError, match="optimizer"):
        make_optimizer(model(), "lbfgs", 0.1, 0.9, 0.0)


def test_optimised_fast_path_is_bf16_on_cuda_only():
    # the CPU keeps the bitwise-reproducible eager loop; fp32 anywhere is the exact path
    assert FastPath.optimised(torch.device("cpu"), "bf16") is None
    assert FastPath.optimised(torch.device("cuda"), "fp32") is None
    cuda = FastPath.optimised(torch.device("cuda"), "bf16")
    assert cuda == FastPath(compile_backend="inductor", cuda_graphs=False, channels_last=True,
                            fused_optimizer=True)
    graphed = FastPath.optimised(torch.device("cuda"), "bf16", cuda_graphs=True)
    assert graphed == FastPath(compile_backend="inductor", cuda_graphs=True, channels_last=True,
                               fused_optimizer=True)
    for device, precision in [("cpu", "bf16"), ("cuda", "fp32")]:  # refused, not ignored
        with pytest.raises(ConfigError, match="training graphs need CUDA and bf16"):
            FastPath.optimised(torch.device(device), precision, cuda_graphs=True)


@pytest.mark.parametrize("run", [train, kd], ids=["train_local", "distill"])
def test_traced_step_trains_what_the_eager_step_trains(run):
    # 20 samples in batches of 8: two compiled steps and an eager trailing batch of 4 per epoch
    eager, traced = model(), model()
    expected, got = run(eager, None), run(traced, TRACED)
    assert got["steps"] == expected["steps"] == 6
    # same operations in the same order: ~1e-7 observed, 1e-5 allowed
    assert max_rel(traced, eager) < 1e-5
    assert got["epoch_losses"] == pytest.approx(expected["epoch_losses"], rel=1e-5)
    assert got.get("accuracy", got.get("agreement")) == expected.get(
        "accuracy", expected.get("agreement"))


def test_one_graph_per_architecture_and_none_for_the_trailing_batch():
    torch._dynamo.reset()
    train_step._compiled.cache_clear()
    counters.clear()
    for m in (model("smallcnn", 0), model("smallcnn", 1), model("resnet8", 0)):
        train(m, TRACED)
    # two architectures; the second smallcnn reuses the first's graph, and the batches of 4
    # (another shape) ran eagerly instead of compiling again
    assert counters["stats"]["unique_graphs"] == 2


def test_training_more_shapes_than_dynamos_recompile_limit():
    # each architecture gets a compiled function with a code object of its own, so Dynamo's
    # per-code-object limit (8, a hard error under fullgraph=True) is never shared out
    limit = torch._dynamo.config.recompile_limit
    for size in range(4, 4 + limit + 1):
        torch.manual_seed(0)
        m = build_model("smallcnn", input_shape=(1, size, size), num_classes=10)
        x = torch.randn(8, 1, size, size)
        out = train_local(m, x, torch.arange(8) % 10, epochs=1, batch_size=8, generator=gen(),
                          fast=TRACED)
        assert out["steps"] == 1


def test_fused_optimiser_and_channels_last_train_the_same_model():
    eager, fast = model("resnet8"), model("resnet8")
    train(eager, None)
    train(fast, FastPath(compile_backend="aot_eager", channels_last=True, fused_optimizer=True))
    conv = next(p for p in fast.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    # fused SGD and NHWC convolutions change only rounding: ~1e-6 observed
    assert max_rel(fast, eager) < 1e-4


def test_bad_teacher_is_refused_before_any_step():
    m = model()
    before = copy.deepcopy(m.state_dict())
    x, _ = data()
    nan = torch.full((20, 10), float("nan"))
    with pytest.raises(ConfigError, match="NaN"):
        distill(m, x, nan, epochs=1, lr=0.1, batch_size=8, teacher_kind="probs",
                generator=gen(), fast=TRACED)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ConfigError, match="classes"):
        distill(m, x, torch.zeros(20, 3), epochs=1, lr=0.1, batch_size=8, teacher_kind="logits",
                generator=gen(), fast=TRACED)


@pytest.mark.slow
@pytest.mark.skipif(not COMPILE_TESTS, reason="inductor on the CPU takes about 20 s per graph; "
                    "set CODREAM_TEST_COMPILE=1 (always on with CUDA)")
def test_inductor_step_trains_what_the_eager_step_trains():
    eager, fast = model(), model()
    train(eager, None)
    train(fast, FastPath())
    assert max_rel(fast, eager) < 1e-4  # inductor fuses and reorders float sums


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("run", "cuda_graphs"),
                         [(train, False), (train, True), (kd, False), (kd, True)],
                         ids=["train_local", "train_local-cuda-graphs", "distill",
                              "distill-cuda-graphs"])
def test_cuda_fast_path_matches_bf16_eager(run, cuda_graphs):
    eager, compiled = model("resnet8", device="cuda"), model("resnet8", device="cuda")
    expected = run(eager, None, device="cuda", precision="bf16")
    got = run(compiled, FastPath(channels_last=True, cuda_graphs=cuda_graphs), device="cuda",
              precision="bf16")
    # bf16 keeps 8 mantissa bits; kernels that round differently move 6 steps' losses by well
    # under 5 % (a replay reading an overwritten buffer gives O(1) errors or NaN)
    assert got["epoch_losses"] == pytest.approx(expected["epoch_losses"], rel=5e-2)
    assert all(torch.isfinite(p).all() for p in compiled.parameters())
