"""GraphedDreamGradients: all clients' dream gradients from one CUDA graph replay."""

from __future__ import annotations

import pytest
import torch

from codream_secure.dreams import DreamLossWeights
from codream_secure.errors import ConfigError
from codream_secure.gpu import fast_dream
from codream_secure.gpu.fast_dream import FastDreamStep
from codream_secure.gpu.graphed import GraphedDreamGradients
from codream_secure.models import build_model

W = DreamLossWeights()
NAMES = ("resnet8", "smallcnn", "wrn16_1")


def models(device: str) -> list[torch.nn.Module]:
    out = []
    for seed, name in enumerate(NAMES):
        torch.manual_seed(seed)
        out.append(build_model(name, input_shape=(3, 16, 16), num_classes=10).to(device).eval())
    return out


def test_steps_without_their_own_graphs_compile_in_default_mode(monkeypatch):
    # what GraphedDreamGradients asks of each step: inductor kernels, no reduce-overhead
    calls = []
    monkeypatch.setattr(fast_dream.torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    config = fast_dream._Config(torch.device("cuda"), "bf16", True, True, False, True,
                                "inductor", None, cuda_graphs=False)
    config.wrap(lambda x: x)
    assert not config.cuda_graphs
    assert calls == [{"mode": None, "fullgraph": True, "backend": "inductor"}]


def test_cpu_models_and_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="CUDA"):
        GraphedDreamGradients(models("cpu"), (4, 3, 16, 16), W)
    with pytest.raises(ConfigError, match="at least one model"):
        GraphedDreamGradients([], (4, 3, 16, 16), W)
    for groups in ([[0, 1]], [[0, 1], [1, 2]], [[0], [1], [2], []], [[0, 1, 2, 3]]):
        with pytest.raises(ConfigError, match=r"groups must cover models 0\.\.2 once each"):
            GraphedDreamGradients(models("cpu"), (4, 3, 16, 16), W, groups=groups)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_replay_gives_each_clients_gradient_and_follows_the_weights():
    clients = models("cuda")
    graphed = GraphedDreamGradients(clients, (32, 3, 16, 16), W)
    x = torch.randn(32, 3, 16, 16, device="cuda")

    # the same compiled kernels and cuDNN algorithms, each step on its own: ~1e-6 expected;
    # 1e-3 allows a different cuDNN algorithm choice (an overwritten buffer gives O(1))
    singles = [FastDreamStep(m, W, precision="bf16", channels_last=True, compile_model=True,
                             bn_moments="sums", cuda_graphs=False) for m in clients]

    def reference() -> list[torch.Tensor]:
        return [step(x) for step in singles]

    for got, want in zip(graphed(x), reference(), strict=True):
        assert rel(got, want) < 1e-3
    y = torch.randn_like(x)
    first = [g.clone() for g in graphed(y)]
    for got, again in zip(first, graphed(y), strict=True):
        assert torch.equal(got, again)  # a replay is deterministic
    with torch.no_grad():  # an optimiser step: in place, so the graph reads the new weights
        for p in clients[0].parameters():
            p.mul_(0.9)
        moved = next(clients[1].parameters())  # new memory: the next call captures again
        moved.data = moved.data.clone()
    for got, want in zip(graphed(x), reference(), strict=True):
        assert rel(got, want) < 1e-3
    with pytest.raises(ConfigError, match="shape"):
        graphed(x[:8])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_vmapped_group_inside_the_graph_gives_each_member_its_gradient():
    # simulate's [device] dream_graph = "one": clients 0 and 3 share an architecture (one
    # vmapped step)
    torch.manual_seed(3)
    extra = build_model("resnet8", input_shape=(3, 16, 16), num_classes=10).cuda().eval()
    clients = [*models("cuda"), extra]
    order = [[0, 3], [1], [2]]
    graphed = GraphedDreamGradients(clients, (32, 3, 16, 16), W, groups=order,
                                     precision="bf16")
    x = torch.randn(32, 3, 16, 16, device="cuda")
    singles = [FastDreamStep(m, W, precision="bf16", channels_last=True, compile_model=True,
                             bn_moments="sums", cuda_graphs=False) for m in clients]

    def check() -> None:
        got = graphed(x)
        for k, step in enumerate(singles):
            want = step(x)
            # vmap runs other kernels in another layout: bf16-level agreement (cosine ~0.99
            # between such paths on the H100), far from another client's gradient
            assert rel(got[k], want) < 0.2, k
            assert all(rel(got[k], singles[o](x)) > 0.5 for o in range(4) if o != k)

    check()
    with torch.no_grad():  # in place: the stacked copy is rebuilt and the graph captured again
        for p in clients[3].parameters():
            p.mul_(0.5)
    check()
