"""Dream objective (client side) and dream optimisation (server side) of CoDream.

Clients return only grad_x of their dream loss; the server averages those gradients and takes one
Adam step on the dreams x. Nothing here knows about aggregation or cryptography.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from codream_secure.errors import CoDreamError, ConfigError

__all__ = [
    "BatchNormStatistics",
    "DreamBuffer",
    "DreamLossWeights",
    "DreamSynthesizer",
    "DreamTargets",
    "NonFiniteGradientError",
    "Precision",
    "check_precision",
    "dream_gradient",
    "dream_loss",
    "dream_objective",
    "model_mode",
    "prediction_entropy",
    "server_entropy_gradient",
    "total_variation",
]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)

Precision = Literal["fp32", "bf16"]


def check_precision(precision: str) -> None:
    """Refuse a precision other than fp32 (the reference) and bf16 (the fast path)."""
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be 'fp32' or 'bf16', got {precision!r}")


class NonFiniteGradientError(CoDreamError, FloatingPointError):
    """A dream gradient holds NaN or inf (diverged client, bad decode); x is left unchanged."""


@dataclass(frozen=True)
class DreamLossWeights:
    """Weights a_pred, a_tv, a_l2, a_f of the dream loss (defaults of the official code)."""

    pred: float = 1.0
    tv: float = 2.5e-5
    l2: float = 3e-8
    bn: float = 10.0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(
                    f"dream loss weight {field.name} must be a finite number >= 0, got {value!r}"
                )


@contextmanager
def model_mode(model: nn.Module, *, training: bool) -> Iterator[nn.Module]:
    """Put every submodule in train/eval mode, then restore each one's own previous mode."""
    previous = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, was_training in previous:
            module.training = was_training


class BatchNormStatistics:
    """Forward hooks on a model's BatchNorm layers measuring the DeepInversion feature loss.

    For every BatchNorm1d/2d it records the batch mean and biased variance per channel of the
    layer's *input*; `loss()` sums ||mu - running_mean||_2 + ||var - running_var||_2 over all
    layers and all forwards since entering (or since `reset()`). Running statistics are
    constants. Use as a context manager; hooks are removed on exit.
    """

    def __init__(self, model: nn.Module) -> None:
        self._layers = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
        if not self._layers:
            raise ConfigError(
                "model has no BatchNorm layers: the BN feature loss needs running statistics "
                "(pass use_bn_statistics=False for GroupNorm models)"
            )
        for layer in self._layers:
            if layer.running_mean is None or layer.running_var is None:
                raise ConfigError(f"{layer!r} keeps no running statistics (track_running_stats)")
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._terms: list[torch.Tensor] = []

    def __enter__(self) -> BatchNormStatistics:
        if self._handles:
            raise RuntimeError("BatchNormStatistics hooks are already registered")
        self._handles = [layer.register_forward_hook(self._hook) for layer in self._layers]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
        feature = inputs[0]
        dims = [d for d in range(feature.dim()) if d != 1]
        var, mean = torch.var_mean(feature, dim=dims, correction=0)
        running_mean = module.running_mean.detach()
        running_var = module.running_var.detach()
        self._terms.append(
            torch.linalg.vector_norm(mean - running_mean)
            + torch.linalg.vector_norm(var - running_var)
        )

    def reset(self) -> None:
        """Forget the statistics recorded so far."""
        self._terms = []

    def loss(self) -> torch.Tensor:
        """Sum over recorded layers of ||mu_l - running_mean_l|| + ||var_l - running_var_l||."""
        if not self._terms:
            raise RuntimeError("no forward pass was recorded; run the model inside the context")
        return torch.stack(self._terms).sum()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """(sum (dh x)^2 + sum (dw x)^2) / (B*C*H*W) for a B x C x H x W batch."""
    if x.dim() != 4:
        raise ConfigError(
            f"total variation needs a B x C x H x W batch, got shape {tuple(x.shape)}"
        )
    dh = x[:, :, 1:, :] - x[:, :, :-1, :]
    dw = x[:, :, :, 1:] - x[:, :, :, :-1]
    return (dh.pow(2).sum() + dw.pow(2).sum()) / x.numel()


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the entropy of softmax(logits) (nats)."""
    log_probs = F.log_softmax(logits, dim=1)
    return -(log_probs.exp() * log_probs).sum(dim=1).mean()


@dataclass(frozen=True)
class DreamTargets:
    """Label-conditioned dreams: a target class per dream and this client's weight per class.

    The prediction term becomes mean_i weight[label_i] * CE(logits_i, label_i): a client pulls
    a dream towards its target only as much as it knows that class.
    """

    labels: torch.Tensor
    class_weights: torch.Tensor

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        labels = self.labels.to(logits.device)
        per_dream = F.cross_entropy(logits, labels, reduction="none")
        return (self.class_weights.to(logits)[labels] * per_dream).mean()


def _dream_terms(
    model: nn.Module, x: torch.Tensor, weights: DreamLossWeights, use_bn_statistics: bool,
    targets: DreamTargets | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with model_mode(model, training=False):
        if use_bn_statistics:
            with BatchNormStatistics(model) as bn_stats:
                logits = model(x)
                bn = bn_stats.loss()
        else:
            logits = model(x)
            bn = x.new_zeros(())
    terms = {
        "pred": prediction_entropy(logits) if targets is None else targets.loss(logits),
        "tv": total_variation(x),
        "l2": torch.linalg.vector_norm(x),  # norm of the whole batch, not squared (official)
        "bn": bn,
    }
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, terms


def dream_loss(
    model: nn.Module,
    x: torch.Tensor,
    weights: DreamLossWeights,
    *,
    use_bn_statistics: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """pred*H + tv*TV + l2*||x|| + bn*BN, with the model in eval mode; parts are unweighted."""
    total, terms = _dream_terms(model, x, weights, use_bn_statistics)
    parts = {name: float(value.detach()) for name, value in terms.items()}
    parts["total"] = float(total.detach())
    return total, parts


def dream_objective(
    model: nn.Module,
    x: torch.Tensor,
    weights: DreamLossWeights,
    *,
    use_bn_statistics: bool = True,
    targets: DreamTargets | None = None,
) -> torch.Tensor:
    """The dream loss as one differentiable scalar (x may come out of a generator)."""
    return _dream_terms(model, x, weights, use_bn_statistics, targets)[0]


def dream_gradient(
    model: nn.Module,
    x: torch.Tensor,
    weights: DreamLossWeights,
    *,
    use_bn_statistics: bool = True,
    targets: DreamTargets | None = None,
) -> torch.Tensor:
    """grad_x of the dream loss as float32; x and the model's parameter .grad stay untouched.

    With `targets` the prediction term is the label-conditioned cross-entropy, else entropy.
    """
    inputs = x.detach().clone().requires_grad_(True)
    total = dream_objective(model, inputs, weights, use_bn_statistics=use_bn_statistics,
                            targets=targets)
    (grad,) = torch.autograd.grad(total, inputs)
    return grad.to(torch.float32)


def server_entropy_gradient(server_model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """grad_x of the server model's prediction entropy (eval mode), as float32."""
    inputs = x.detach().clone().requires_grad_(True)
    with model_mode(server_model, training=False):
        entropy = prediction_entropy(server_model(inputs))
    (grad,) = torch.autograd.grad(entropy, inputs)
    return grad.to(torch.float32)


class DreamSynthesizer:
    """Server-side dreams x ~ N(0, 1) and the Adam optimiser that descends the mean gradient."""

    def __init__(
        self,
        shape: Sequence[int],
        *,
        generator: torch.Generator,
        lr: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        """x is drawn on the generator's device (so it depends on the seed alone), then kept
        and optimised on `device` (default: the generator's)."""
        shape = tuple(shape)
        if not shape or any(not isinstance(n, int) or n <= 0 for n in shape):
            raise ConfigError(f"dream shape must be positive integers, got {shape!r}")
        if not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"dream learning rate must be > 0, got {lr!r}")
        x = torch.randn(shape, generator=generator, dtype=dtype, device=generator.device)
        self._x = x.to(generator.device if device is None else device).requires_grad_(True)
        self._optimizer = torch.optim.Adam([self._x], lr=lr, betas=betas, eps=eps)
        self.steps = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dream batch."""
        return tuple(self._x.shape)

    @property
    def dreams(self) -> torch.Tensor:
        """A detached copy of the current dreams."""
        return self._x.detach().clone()

    def _check(self, name: str, gradient: torch.Tensor) -> None:
        if tuple(gradient.shape) != self.shape:
            raise ConfigError(
                f"{name} has shape {tuple(gradient.shape)}, dreams have shape {self.shape}"
            )
        if not torch.isfinite(gradient).all():
            raise NonFiniteGradientError(f"{name} holds NaN or inf; dreams were not updated")

    def step(
        self,
        mean_gradient: torch.Tensor,
        *,
        adaptive_gradient: torch.Tensor | None = None,
        adaptive_weight: float = 10.0,
    ) -> None:
        """One Adam step on g = mean_gradient - adaptive_weight * adaptive_gradient.

        The adaptive term is grad_x of the server model's entropy: subtracting it makes x climb
        that entropy, i.e. seek inputs the server is still unsure about.
        """
        self._check("mean gradient", mean_gradient)
        grad = mean_gradient.detach().to(device=self._x.device, dtype=self._x.dtype, copy=True)
        if adaptive_gradient is not None:
            if not math.isfinite(adaptive_weight):
                raise ConfigError(f"adaptive weight must be finite, got {adaptive_weight!r}")
            self._check("adaptive gradient", adaptive_gradient)
            grad -= adaptive_weight * adaptive_gradient.detach().to(grad)
            if not torch.isfinite(grad).all():
                raise NonFiniteGradientError("combined dream gradient overflowed")
        self._x.grad = grad
        self._optimizer.step()
        self._x.grad = None
        self.steps += 1


class DreamBuffer:
    """FIFO of dreams and their soft targets holding at most `capacity` samples."""

    def __init__(self, capacity: int = 10 * 256) -> None:
        if not isinstance(capacity, int) or capacity <= 0:
            raise ConfigError(f"dream buffer capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self._x is None else self._x.shape[0]

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Append a batch; the oldest samples fall out beyond capacity."""
        if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0]:
            raise ConfigError(
                f"dreams and targets need matching batch sizes, got {tuple(x.shape)} and "
                f"{tuple(y.shape)}"
            )
        x, y = x.detach(), y.detach()
        if self._x is None or self._y is None:
            self._x, self._y = x[-self.capacity :].clone(), y[-self.capacity :].clone()
            return
        if x.shape[1:] != self._x.shape[1:] or y.shape[1:] != self._y.shape[1:]:
            raise ConfigError(
                f"batch of shape {tuple(x.shape)}/{tuple(y.shape)} does not match the buffer's "
                f"{tuple(self._x.shape[1:])}/{tuple(self._y.shape[1:])} per sample"
            )
        self._x = torch.cat([self._x, x.to(self._x)])[-self.capacity :]
        self._y = torch.cat([self._y, y.to(self._y)])[-self.capacity :]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All buffered (dreams, targets), oldest first."""
        if self._x is None or self._y is None:
            raise ConfigError("the dream buffer is empty")
        return self._x.clone(), self._y.clone()
