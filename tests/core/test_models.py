"""Model zoo: builds for every input shape, gradients reach the input, BatchNorm is present."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from codream_secure.errors import ConfigError
from codream_secure.models import MODEL_NAMES, build_model, count_parameters

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]



@functools.cache
def cached(name: str, shape: tuple[int, int, int]) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, input_shape=shape, num_classes=10)


def test_zoo_names():
    assert set(MODEL_NAMES) == {
        "smallcnn", "resnet8", "resnet20", "resnet18", "vgg11", "wrn16_1", "mobilenet"
    }  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_and_input_gradient(name, shape):
    model = cached(name, shape).train()
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(3, *shape, requires_grad=True)
    out = model(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.logsumexp(1).sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_train_and_eval_modes(name):
    model = build_model(name, input_shape=(1, 8, 8), num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(4, 1, 8, 8) * 3 + 1

    model.eval()
    stats = [bn.running_mean.clone() for bn in bns]
    with torch.no_grad():
        batch = model(x)
        single = model(x[:1])
    # Eval uses running statistics: no update, and each sample's output ignores its batch.
    assert all(torch.equal(s, bn.running_mean) for s, bn in zip(stats, bns, strict=True))
    torch.testing.assert_close(single, batch[:1], rtol=1e-4, atol=1e-5)

    model.train()
    with torch.no_grad():
        model(x)
    assert not torch.equal(stats[0], bns[0].running_mean)  # train mode updates statistics
    assert all(int(bn.num_batches_tracked) == 1 for bn in bns)


@pytest.mark.parametrize("num_classes", [2, 3, 100])
def test_class_count_and_non_square_input(num_classes):
    for name in ("smallcnn", "resnet8", "mobilenet"):
        model = build_model(name, input_shape=(3, 8, 16), num_classes=num_classes)
        assert model(torch.randn(2, 3, 8, 16)).shape == (2, num_classes)


def test_models_remember_shapes():
    model = build_model("resnet8", input_shape=(1, 28, 28), num_classes=7)
    assert model.input_shape == (1, 28, 28) and model.num_classes == 7


def test_parameter_counts_stay_cpu_friendly():
    counts = {name: count_parameters(cached(name, (1, 8, 8))) for name in MODEL_NAMES}
    assert 20_000 <= counts["smallcnn"] <= 60_000
    assert counts["resnet8"] < counts["resnet20"] < 400_000
    assert counts["wrn16_1"] < 250_000 and counts["mobilenet"] < 250_000
    assert 10_000_000 < counts["resnet18"] < 12_000_000  # the standard CIFAR ResNet-18
    assert 9_000_000 < counts["vgg11"] < 10_000_000
    tiny = nn.Linear(3, 2)
    assert count_parameters(tiny) == 8


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown model 'resnet50'") as info:
        build_model("resnet50", input_shape=(1, 8, 8), num_classes=10)
    assert all(name in str(info.value) for name in MODEL_NAMES)


@pytest.mark.parametrize(
    ("shape", "classes", "match"),
    [
        ((8, 8), 10, "input_shape"),
        ((1, 0, 8), 10, "input_shape"),
        ((1, 8.0, 8), 10, "input_shape"),
        ((1, 8, 8), 1, "num_classes"),
        ((1, 8, 8), 2.0, "num_classes"),
    ],
)
def test_bad_shapes_and_class_counts(shape, classes, match):
    with pytest.raises(ConfigError, match=match):
        build_model("smallcnn", input_shape=shape, num_classes=classes)
