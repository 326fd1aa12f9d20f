"""Dream objective, BN feature hooks, dream gradients, the server synthesizer and the buffer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from codream_secure.distill import train_local
from codream_secure.dreams import (
    BatchNormStatistics,
    DreamBuffer,
    DreamLossWeights,
    DreamSynthesizer,
    NonFiniteGradientError,
    dream_gradient,
    dream_loss,
    prediction_entropy,
    server_entropy_gradient,
    total_variation,
)
from codream_secure.errors import ConfigError


class TinyBN(nn.Module):
    """Conv -> BN2d -> act -> Linear -> BN1d -> act -> Linear on 1 x 4 x 4 inputs."""

    def __init__(self, act: type[nn.Module] = nn.ReLU, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(3)
        self.fc1 = nn.Linear(3 * 4 * 4, 5)
        self.bn1d = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, classes)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn2d(self.conv(x))).flatten(1)
        return self.fc2(self.act(self.bn1d(self.fc1(h))))


def _tiny(seed: int = 0, act: type[nn.Module] = nn.ReLU, dtype=torch.float32) -> TinyBN:
    with torch.random.fork_rng(devices=[]):  # init only; the code under test never reads it
        torch.manual_seed(seed)
        model = TinyBN(act).to(dtype)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for bn in (model.bn2d, model.bn1d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen, dtype=dtype))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen, dtype=dtype) + 0.5)
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen, dtype=dtype) + 0.5)
    return model.eval()


def _x(seed: int = 1, shape=(6, 1, 4, 4), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _hand_stats(feature: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    count = math.prod(feature.shape[d] for d in dims)
    mean = feature.sum(dim=dims) / count
    shape = [1] * feature.dim()
    shape[1] = -1
    var = ((feature - mean.view(shape)) ** 2).sum(dim=dims) / count
    return mean, var


# --- weights, TV, entropy ---------------------------------------------------------------


def test_weights_defaults_and_validation():
    w = DreamLossWeights()
    assert (w.pred, w.tv, w.l2, w.bn) == (1.0, 2.5e-5, 3e-8, 10.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError):
            DreamLossWeights(tv=bad)


def test_total_variation_matches_hand_formula():
    x = torch.tensor([[[[1.0, 2.0, 4.0], [0.0, 3.0, -1.0]]]])  # 1 x 1 x 2 x 3
    dh = (0 - 1) ** 2 + (3 - 2) ** 2 + (-1 - 4) ** 2  # 27
    dw = (2 - 1) ** 2 + (4 - 2) ** 2 + (3 - 0) ** 2 + (-1 - 3) ** 2  # 30
    assert total_variation(x).item() == pytest.approx((dh + dw) / 6)
    with pytest.raises(ConfigError):
        total_variation(torch.zeros(2, 3))


def test_prediction_entropy():
    uniform = torch.zeros(4, 3)
    assert prediction_entropy(uniform).item() == pytest.approx(math.log(3))
    logits = torch.tensor([[math.log(3.0), 0.0]])  # probabilities 3/4, 1/4
    hand = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert prediction_entropy(logits).item() == pytest.approx(hand)


# --- BN statistics ----------------------------------------------------------------------


def test_bn_loss_matches_hand_computation():
    model, x = _tiny(), _x()
    with torch.no_grad():
        f2 = model.conv(x)
        m2, v2 = _hand_stats(f2, (0, 2, 3))
        f1 = model.fc1(model.act(model.bn2d(f2)).flatten(1))
        m1, v1 = _hand_stats(f1, (0,))
    hand = sum(
        torch.linalg.vector_norm(m - bn.running_mean) + torch.linalg.vector_norm(v - bn.running_var)
        for (m, v, bn) in ((m2, v2, model.bn2d), (m1, v1, model.bn1d))
    )
    with BatchNormStatistics(model) as stats, torch.no_grad():
        model(x)
        got = stats.loss()
    assert got.item() == pytest.approx(hand.item(), abs=1e-5)
    assert got.item() > 0.1  # a genuine mismatch, not a trivially small number


def test_bn_loss_zero_when_running_stats_equal_batch_stats():
    model, x = _tiny(dtype=torch.float64), _x(dtype=torch.float64)
    with torch.no_grad():
        f2 = model.conv(x)
        model.bn2d.running_mean.copy_(f2.mean(dim=(0, 2, 3)))
        model.bn2d.running_var.copy_(f2.var(dim=(0, 2, 3), unbiased=False))
        f1 = model.fc1(model.act(model.bn2d(f2)).flatten(1))  # uses the new running stats
        model.bn1d.running_mean.copy_(f1.mean(dim=0))
        model.bn1d.running_var.copy_(f1.var(dim=0, unbiased=False))
    with BatchNormStatistics(model) as stats, torch.no_grad():
        model(x)
        assert stats.loss().item() < 1e-10


def test_bn_hooks_removed_on_exit_and_reset():
    model = _tiny()
    with BatchNormStatistics(model) as stats:
        assert len(model.bn2d._forward_hooks) == 1
        model(_x())
        model(_x(2))
        two = stats.loss()
        stats.reset()
        model(_x())
        one = stats.loss()
    assert two.item() > one.item()
    assert not model.bn2d._forward_hooks and not model.bn1d._forward_hooks


def test_bn_statistics_rejects_model_without_batchnorm():
    with pytest.raises(ConfigError, match="use_bn_statistics=False"):
        BatchNormStatistics(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)))


# --- dream loss and gradient ------------------------------------------------------------


def test_dream_loss_is_the_weighted_sum_of_parts():
    model, x = _tiny(), _x()
    w = DreamLossWeights(pred=0.5, tv=2.0, l2=0.3, bn=1.5)
    total, parts = dream_loss(model, x, w)
    expected = 0.5 * parts["pred"] + 2.0 * parts["tv"] + 0.3 * parts["l2"] + 1.5 * parts["bn"]
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert parts["total"] == pytest.approx(expected, rel=1e-6)
    assert parts["l2"] == pytest.approx(torch.linalg.vector_norm(x).item(), rel=1e-6)
    _, no_bn = dream_loss(model, x, w, use_bn_statistics=False)
    assert no_bn["bn"] == 0.0 and no_bn["pred"] == pytest.approx(parts["pred"])


def test_dream_gradient_matches_finite_differences():
    # float64 model and input; tanh keeps the loss smooth so central differences apply.
    # Central-difference error is O(h^2 |f'''|) ~ 1e-12 plus round-off ~ 1e-16 |f| / h ~ 1e-9;
    # the float32 result adds a relative 6e-8. rtol 1e-5 / atol 1e-7 covers all with margin
    # yet catches a missing or wrongly weighted term (each is > 1e-3 of the gradient here).
    model, x = _tiny(act=nn.Tanh, dtype=torch.float64), _x(dtype=torch.float64)
    w = DreamLossWeights(pred=1.0, tv=0.5, l2=0.2, bn=2.0)
    grad = dream_gradient(model, x, w)
    assert grad.dtype == torch.float32 and grad.shape == x.shape
    h = 1e-6
    for coord in [(0, 0, 0, 0), (1, 0, 2, 3), (3, 0, 1, 1), (5, 0, 3, 0)]:
        plus, minus = x.clone(), x.clone()
        plus[coord] += h
        minus[coord] -= h
        fd = (dream_loss(model, plus, w)[0].item() - dream_loss(model, minus, w)[0].item()) / (
            2 * h
        )
        assert grad[coord].item() == pytest.approx(fd, rel=1e-5, abs=1e-7)


def test_dream_gradient_without_bn_term_differs_and_matches_its_loss():
    model, x = _tiny(act=nn.Tanh, dtype=torch.float64), _x(dtype=torch.float64)
    w = DreamLossWeights()
    with_bn = dream_gradient(model, x, w)
    without = dream_gradient(model, x, w, use_bn_statistics=False)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(dream_loss(model, xr, w, use_bn_statistics=False)[0], xr)
    torch.testing.assert_close(without, ref.float())
    assert not torch.allclose(with_bn, without)


def test_dream_gradient_has_no_side_effects():
    model, x = _tiny(), _x()
    model.train()
    model.bn1d.eval()  # mixed modes must come back exactly as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fc2.weight.grad = torch.full_like(model.fc2.weight, 7.0)
    x_before = x.clone()
    dream_gradient(model, x, DreamLossWeights())
    assert model.training and model.bn2d.training and not model.bn1d.training
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc2.weight")
    assert torch.equal(model.fc2.weight.grad, torch.full_like(model.fc2.weight, 7.0))
    assert torch.equal(x, x_before) and not x.requires_grad
    for k, v in model.state_dict().items():  # eval mode: running stats untouched
        assert torch.equal(v, before[k]), k
    assert not model.bn2d._forward_hooks


def test_server_entropy_gradient_points_uphill():
    model, x = _tiny(act=nn.Tanh), _x()
    g = server_entropy_gradient(model, x)
    with torch.no_grad():
        h0 = prediction_entropy(model(x)).item()
        h1 = prediction_entropy(model(x + 1e-2 * g)).item()
    assert h1 > h0
    assert not model.training


# --- synthesizer ------------------------------------------------------------------------


def test_synthesizer_draws_from_the_given_generator():
    a = DreamSynthesizer((4, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    b = DreamSynthesizer((4, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    c = DreamSynthesizer((4, 1, 4, 4), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.dreams, b.dreams) and not torch.equal(a.dreams, c.dreams)
    ref = torch.randn((4, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.dreams, ref)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])])
def test_synthesizer_draws_on_the_generator_and_optimises_on_its_device(device):
    # the draw depends on the seed alone: a CPU generator gives the same dreams on any device
    shape = (3, 2, 4, 4)
    here = DreamSynthesizer(shape, generator=torch.Generator().manual_seed(7), device=device)
    host = DreamSynthesizer(shape, generator=torch.Generator().manual_seed(7))
    assert here.dreams.device.type == device
    assert torch.equal(here.dreams.cpu(), host.dreams)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    for _ in range(5):
        here.step(g)  # a host gradient is moved to the dreams' device
        host.step(g)
    # float32 Adam on another device may round a few ulps differently (|x| < 6: ulp <= 4.8e-7)
    torch.testing.assert_close(here.dreams.cpu(), host.dreams, atol=1e-5, rtol=0)


def test_synthesizer_steps_like_torch_adam():
    shape = (3, 2, 4, 4)
    synth = DreamSynthesizer(shape, generator=torch.Generator().manual_seed(5), lr=0.05)
    x_ref = torch.randn(shape, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    adam = torch.optim.Adam([x_ref], lr=0.05)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    for _ in range(7):
        synth.step(g)
        x_ref.grad = g.clone()
        adam.step()
    assert torch.equal(synth.dreams, x_ref.detach())
    # Adam with a constant gradient moves each coordinate lr per step against sign(g)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(start - synth.dreams, 7 * 0.05 * g.sign(), atol=1e-5, rtol=0)
    assert synth.steps == 7


def test_synthesizer_adaptive_term_is_subtracted():
    shape = (2, 1, 4, 4)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    a_grad = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    a = DreamSynthesizer(shape, generator=torch.Generator().manual_seed(1))
    b = DreamSynthesizer(shape, generator=torch.Generator().manual_seed(1))
    start = a.dreams
    a.step(g, adaptive_gradient=a_grad, adaptive_weight=10.0)
    b.step(g - 10.0 * a_grad)
    assert torch.equal(a.dreams, b.dreams)
    only = DreamSynthesizer(shape, generator=torch.Generator().manual_seed(1))
    only.step(torch.zeros(shape), adaptive_gradient=a_grad, adaptive_weight=10.0)
    # no client gradient: x moves *along* the adaptive (entropy) gradient, i.e. climbs entropy
    assert torch.equal((only.dreams - start).sign(), a_grad.sign())


def test_synthesizer_adaptive_step_raises_server_entropy():
    server, shape = _tiny(act=nn.Tanh), (6, 1, 4, 4)
    synth = DreamSynthesizer(shape, generator=torch.Generator().manual_seed(2), lr=1e-3)
    with torch.no_grad():
        h0 = prediction_entropy(server(synth.dreams)).item()
    synth.step(torch.zeros(shape), adaptive_gradient=server_entropy_gradient(server, synth.dreams))
    with torch.no_grad():
        assert prediction_entropy(server(synth.dreams)).item() > h0


def test_synthesizer_rejects_bad_gradients():
    shape = (2, 1, 4, 4)
    synth = DreamSynthesizer(shape, generator=torch.Generator().manual_seed(0))
    start = synth.dreams
    bad = torch.zeros(shape)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError):
        synth.step(bad)
    with pytest.raises(FloatingPointError):
        synth.step(torch.zeros(shape), adaptive_gradient=bad.nan_to_num(posinf=1.0) * math.inf)
    with pytest.raises(ConfigError):
        synth.step(torch.zeros(2, 1, 4, 5))
    assert torch.equal(synth.dreams, start) and synth.steps == 0
    with pytest.raises(ConfigError):
        DreamSynthesizer((2, 0, 4), generator=torch.Generator())
    with pytest.raises(ConfigError):
        DreamSynthesizer((2, 1), generator=torch.Generator(), lr=0.0)


# --- buffer -----------------------------------------------------------------------------


def test_buffer_is_fifo_with_sample_capacity():
    buf = DreamBuffer(capacity=5)
    assert len(buf) == 0 and DreamBuffer().capacity == 2560
    x = torch.arange(20, dtype=torch.float32).view(10, 2)
    y = torch.arange(10, dtype=torch.float32).view(10, 1)
    buf.add(x[:3], y[:3])
    assert len(buf) == 3
    buf.add(x[3:6], y[3:6])
    bx, by = buf.tensors()
    assert len(buf) == 5
    assert torch.equal(bx, x[1:6]) and torch.equal(by, y[1:6])
    buf.add(x[6:10], y[6:10])
    bx, by = buf.tensors()
    assert torch.equal(bx, x[5:10]) and torch.equal(by, y[5:10])
    big = DreamBuffer(capacity=3)
    big.add(x, y)
    assert torch.equal(big.tensors()[1], y[7:])


def test_buffer_rejects_mismatches_and_copies():
    buf = DreamBuffer(capacity=4)
    with pytest.raises(ConfigError):
        buf.tensors()
    with pytest.raises(ConfigError):
        buf.add(torch.zeros(3, 2), torch.zeros(2, 1))
    x = torch.zeros(2, 2)
    buf.add(x, torch.zeros(2, 1))
    x += 1  # the buffer holds its own copy
    assert torch.equal(buf.tensors()[0], torch.zeros(2, 2))
    with pytest.raises(ConfigError):
        buf.add(torch.zeros(2, 3), torch.zeros(2, 1))
    with pytest.raises(ConfigError):
        DreamBuffer(capacity=0)


# --- end to end -------------------------------------------------------------------------


def _toy_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 lights the top half of a 1 x 4 x 4 image, class 1 the bottom half."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 1, 4, 4, generator=gen)
    x[y == 0, :, :2, :] += 1.0
    x[y == 1, :, 2:, :] += 1.0
    return x, y


def test_two_clients_lower_the_summed_dream_loss():
    x, y = _toy_images(256, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10)
        clients = [TinyBN(classes=2), TinyBN(act=nn.SiLU, classes=2)]
    for k, model in enumerate(clients):
        train_local(model, x, y, epochs=5, lr=0.05, generator=torch.Generator().manual_seed(k))
    w = DreamLossWeights()

    def summed_loss(dreams: torch.Tensor) -> float:
        return sum(dream_loss(m, dreams, w)[1]["total"] for m in clients)

    synth = DreamSynthesizer((32, 1, 4, 4), generator=torch.Generator().manual_seed(7))
    start = summed_loss(synth.dreams)
    for _ in range(50):
        grads = [dream_gradient(m, synth.dreams, w) for m in clients]
        synth.step(torch.stack(grads).mean(dim=0))
    end = summed_loss(synth.dreams)
    assert end < 0.7 * start, (start, end)
