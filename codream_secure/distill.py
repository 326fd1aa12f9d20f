"""Local supervised training, knowledge distillation on dreams, evaluation and soft labels.

Every function restores each submodule's train/eval mode on return. Shuffling uses only the
torch.Generator passed in, so runs are bitwise reproducible on the CPU.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from codream_secure.dreams import Precision, check_precision, model_mode
from codream_secure.errors import ConfigError
from codream_secure.kd import (
    TeacherKind,
    check_kind,
    kd_from_log_probs,
    kd_loss,
    tempered_teacher_log_probs,
)
from codream_secure.train_step import BatchStep, FastPath
from codream_secure.training_args import (
    autocast,
    check_batch_size,
    check_epochs,
    check_positive,
    frozen_batchnorm,
)

__all__ = ["distill", "evaluate", "frozen_batchnorm", "kd_loss", "recalibrate_batchnorm",
           "soft_labels", "train_local"]

def _batches(n: int, batch_size: int, generator: torch.Generator,
             device: torch.device) -> tuple[torch.Tensor, ...]:
    """Shuffled index batches on `device`; a trailing batch of one joins the previous one
    (BatchNorm). One copy per epoch: a copy per step from host memory would make the host wait
    for the device's previous step."""
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [sizes[-2] + 1]
    perm = torch.randperm(n, generator=generator, device=generator.device)
    return perm.to(device).split(sizes)


def _fit(step: BatchStep, optimizer: torch.optim.Optimizer, x: torch.Tensor,
         targets: tuple[torch.Tensor, ...], constants: tuple, *, epochs: int,
         generator: torch.Generator, freeze_batchnorm: bool = False
         ) -> tuple[list[float], float, int]:
    """Shuffled mini-batch epochs of step(x_b, *targets_b, *constants): per-epoch mean losses,
    the last epoch's count share (accuracy or agreement) and the step count.

    Losses and counts accumulate on the device, so a step never waits for the host.
    """
    x = step.inputs(x)
    epoch_losses: list[float] = []
    share = float("nan")
    steps = 0
    with model_mode(step.model, training=True):
        if freeze_batchnorm:
            frozen_batchnorm(step.model)
        for _ in range(epochs):
            loss_sum = torch.zeros((), device=x.device)
            count = torch.zeros((), device=x.device, dtype=torch.long)
            for idx in _batches(x.shape[0], step.batch_size, generator, x.device):
                loss, hits = step(x[idx], *(t[idx] for t in targets), *constants)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                loss_sum += loss.detach() * idx.numel()
                count += hits
            epoch_losses.append(float(loss_sum) / x.shape[0])
            share = int(count) / x.shape[0]
    return epoch_losses, share, steps


def _ce_terms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: Precision
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of one batch and its number of correct predictions."""
    with autocast(x.device, precision):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    return loss, (logits.detach().argmax(dim=1) == y).sum()


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    generator: torch.Generator,
    precision: Precision = "fp32",
    fast: FastPath | None = None,
) -> dict[str, Any]:
    """Cross-entropy SGD on (x, y) with a fresh optimiser; the model's modes are restored after.

    precision="bf16" runs forward passes under bf16 autocast. fast (train_step.FastPath)
    compiles each full batch's forward and loss, with a fused optimiser and channels_last if
    it says so; None runs eagerly (the CPU default).

    Returns the last epoch's mean loss and running accuracy, the per-epoch losses and the step
    count.
    """
    check_epochs(epochs)
    check_batch_size(batch_size)
    check_positive("learning rate", lr)
    check_precision(precision)
    if x.shape[0] != y.shape[0] or y.dim() != 1 or x.shape[0] == 0:
        raise ConfigError(
            f"need a non-empty batch of inputs and 1-D labels, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    step = BatchStep(_ce_terms, model, batch_size, fast)
    optimizer = step.optimizer("sgd", lr, momentum, weight_decay)
    losses, accuracy, steps = _fit(step, optimizer, x, (y,), (precision,), epochs=epochs,
                                   generator=generator)
    return {
        "loss": losses[-1] if losses else float("nan"),
        "accuracy": accuracy,
        "epoch_losses": losses,
        "steps": steps,
    }


def _kd_terms(model: nn.Module, x: torch.Tensor, log_p: torch.Tensor, classes: torch.Tensor,
              temperature: float, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """kd_loss of one batch against tempered teacher log-probabilities, and the argmax matches."""
    with autocast(x.device, precision):
        logits = model(x)
    loss = kd_from_log_probs(logits.float(), log_p, temperature)
    return loss, (logits.detach().argmax(dim=1) == classes).sum()


def distill(
    model: nn.Module,
    x: torch.Tensor,
    teacher: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    temperature: float = 20.0,
    teacher_kind: TeacherKind,
    generator: torch.Generator,
    optimizer: Literal["sgd", "adam"] = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    precision: Precision = "fp32",
    fast: FastPath | None = None,
    batchnorm: Literal["batch", "frozen"] = "batch",
) -> dict[str, Any]:
    """Train the model to match teacher outputs on dreams x with kd_loss.

    precision and fast as in train_local. batchnorm "batch" trains in train mode (dream batches
    normalise themselves and move the running statistics); "frozen" keeps every BatchNorm layer
    in eval mode, so dreams are normalised with the statistics of the client's data and leave
    them untouched. The teacher is checked and tempered once, before the first step.

    Returns the last epoch's mean loss, the share of samples whose argmax matched the teacher's
    during that epoch, the per-epoch losses and the step count.
    """
    check_epochs(epochs)
    check_batch_size(batch_size)
    check_positive("learning rate", lr)
    check_positive("temperature", temperature)
    check_kind(teacher_kind)
    check_precision(precision)
    if x.shape[0] != teacher.shape[0] or x.shape[0] == 0 or teacher.dim() != 2:
        raise ConfigError(
            f"need a non-empty batch of dreams and one teacher row each, got {tuple(x.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    with torch.no_grad(), model_mode(model, training=False):
        classes = model(x[:1]).shape[1]  # checked here: a compiled step cannot raise cleanly
    if classes != teacher.shape[1]:
        raise ConfigError(f"the model gives {classes} classes, the teacher {teacher.shape[1]}")
    step = BatchStep(_kd_terms, model, batch_size, fast)
    opt = step.optimizer(optimizer, lr, momentum, weight_decay)
    log_p = tempered_teacher_log_probs(teacher.detach(), temperature, teacher_kind)
    targets = (log_p, teacher.argmax(dim=1))
    if batchnorm not in ("batch", "frozen"):
        raise ConfigError(f"batchnorm must be 'batch' or 'frozen', got {batchnorm!r}")
    frozen = batchnorm == "frozen"
    losses, agreement, steps = _fit(step, opt, x, targets, (temperature, precision),
                                    epochs=epochs, generator=generator, freeze_batchnorm=frozen)
    return {
        "loss": losses[-1] if losses else float("nan"),
        "agreement": agreement,
        "epoch_losses": losses,
        "steps": steps,
    }


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256) -> None:
    """Re-estimate every BatchNorm layer's running statistics on x (the client's own data).

    The statistics become the exact average over x's batches (momentum None), whatever they
    were before; weights are unchanged. A model without BatchNorm is left as it is.
    """
    check_batch_size(batch_size)
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats]
    if not layers or x.shape[0] == 0:
        return
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches below
    try:
        with model_mode(model, training=False):
            for layer in layers:
                layer.train()
            for start in range(0, x.shape[0], batch_size):
                chunk = x[start : start + batch_size]
                if chunk.shape[0] > 1 or start == 0:  # a batch of one has no variance
                    model(chunk)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1], eval mode, no gradients."""
    check_batch_size(batch_size)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"need a non-empty labelled set, got {tuple(x.shape)}, {tuple(y.shape)}")
    correct = 0
    with model_mode(model, training=False):
        for start in range(0, x.shape[0], batch_size):
            logits = model(x[start : start + batch_size])
            correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum())
    return correct / x.shape[0]


@torch.no_grad()
def soft_labels(
    model: nn.Module, x: torch.Tensor, *, kind: TeacherKind, batch_size: int = 512
) -> torch.Tensor:
    """One client's logits or softmax probabilities on the dreams x (eval mode, float32)."""
    check_kind(kind)
    check_batch_size(batch_size)
    with model_mode(model, training=False):
        logits = torch.cat([model(chunk) for chunk in x.split(batch_size)])
    out = logits if kind == "logits" else F.softmax(logits, dim=1)
    return out.to(torch.float32)
