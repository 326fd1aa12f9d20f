"""Heterogeneous classifier zoo with BatchNorm (the dream loss reads its running statistics)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from codream_secure.errors import ConfigError

MODEL_NAMES: tuple[str, ...] = (
    "smallcnn",
    "resnet8",
    "resnet20",
    "resnet18",
    "vgg11",
    "wrn16_1",
    "mobilenet",
)

# Every model halves its feature map only while the result stays at least 2x2 (VGG: 1x1), so
# 8x8 digits keep a spatial extent while 32x32 inputs follow the usual CIFAR schedule.


def _down(size: int, stride: int = 2) -> tuple[int, int]:
    """(stride to use, new size) for a stride-2 3x3/pad-1 stage on a `size`-wide map."""
    if stride == 2 and size >= 4:
        return 2, (size + 1) // 2
    return 1, size


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class Classifier(nn.Module):
    """features -> global average pool -> linear; remembers the shapes it was built for."""

    def __init__(
        self, features: nn.Module, width: int, input_shape: tuple[int, int, int], num_classes: int
    ) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _small_cnn(c: int, size: int) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    widths = (32, 64, 64)
    for i, w in enumerate(widths):
        layers += [_conv3x3(c, w), nn.BatchNorm2d(w), nn.ReLU()]
        if i < len(widths) - 1 and size >= 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        c = w
    return nn.Sequential(*layers), c


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with a 1x1 projection shortcut when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet(
    c: int, size: int, stem: int, widths: tuple[int, ...], blocks: tuple[int, ...]
) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = [_conv3x3(c, stem), nn.BatchNorm2d(stem), nn.ReLU()]
    c = stem
    for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
        stride, size = _down(size, 2 if i > 0 else 1)
        for j in range(n):
            layers.append(BasicBlock(c, w, stride if j == 0 else 1))
            c = w
    return nn.Sequential(*layers), c


class WideBlock(nn.Module):
    """Pre-activation WideResNet block: BN-ReLU-conv twice, projection from the activated input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = _conv1x1(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


def _wrn(c: int, size: int, depth: int, k: int) -> tuple[nn.Module, int]:
    n = (depth - 4) // 6
    layers: list[nn.Module] = [_conv3x3(c, 16)]
    c = 16
    for i, w in enumerate((16 * k, 32 * k, 64 * k)):
        stride, size = _down(size, 2 if i > 0 else 1)
        for j in range(n):
            layers.append(WideBlock(c, w, stride if j == 0 else 1))
            c = w
    layers += [nn.BatchNorm2d(c), nn.ReLU()]
    return nn.Sequential(*layers), c


def _vgg11(c: int, size: int) -> tuple[nn.Module, int]:
    cfg = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            if size >= 2:  # skip pools that would shrink a 1x1 map to nothing
                layers.append(nn.MaxPool2d(2))
                size //= 2
        else:
            assert isinstance(v, int)
            layers += [_conv3x3(c, v), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
    return nn.Sequential(*layers), c


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 projection, skip if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [_conv1x1(cin, hidden), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            _conv3x3(hidden, hidden, stride, groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            _conv1x1(hidden, cout),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


def _mobilenet(c: int, size: int) -> tuple[nn.Module, int]:
    # A narrow MobileNetV2 (half width, expansion 4, fewer repeats) with a CIFAR stride-1 stem.
    settings = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 2), (4, 96, 1, 1))
    layers: list[nn.Module] = [_conv3x3(c, 16), nn.BatchNorm2d(16), nn.ReLU6()]
    c = 16
    for t, w, n, s in settings:
        stride, size = _down(size, s)
        for j in range(n):
            layers.append(InvertedResidual(c, w, stride if j == 0 else 1, t))
            c = w
    layers += [_conv1x1(c, 256), nn.BatchNorm2d(256), nn.ReLU6()]
    return nn.Sequential(*layers), 256


_BUILDERS: dict[str, Callable[[int, int], tuple[nn.Module, int]]] = {
    "smallcnn": _small_cnn,
    "resnet8": lambda c, s: _resnet(c, s, 16, (16, 32, 64), (1, 1, 1)),
    "resnet20": lambda c, s: _resnet(c, s, 16, (16, 32, 64), (3, 3, 3)),
    "resnet18": lambda c, s: _resnet(c, s, 64, (64, 128, 256, 512), (2, 2, 2, 2)),
    "vgg11": _vgg11,
    "wrn16_1": lambda c, s: _wrn(c, s, 16, 1),
    "mobilenet": _mobilenet,
}


def build_model(name: str, *, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build zoo model `name` for C×H×W inputs and `num_classes` outputs (logits)."""
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise ConfigError(
            f"input_shape must be three positive integers (C, H, W), got {input_shape!r}"
        )
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    c, h, w = shape
    features, width = _BUILDERS[name](c, min(h, w))
    return Classifier(features, width, (c, h, w), num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
