"""Local supervised training, knowledge distillation on dreams, evaluation and soft labels.

Every function restores each submodule's train/eval mode on return. Shuffling uses only the
torch.Generator passed in, so runs are bitwise reproducible on the CPU.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from codream_secure.dreams import model_mode
from codream_secure.errors import ConfigError

__all__ = ["distill", "evaluate", "kd_loss", "soft_labels", "train_local"]

TeacherKind = Literal["probs", "logits"]


def _check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _check_epochs(epochs: int) -> None:
    if not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"epochs must be an integer >= 0, got {epochs!r}")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")


def _check_kind(kind: str) -> None:
    if kind not in ("probs", "logits"):
        raise ConfigError(f"kind must be 'probs' or 'logits', got {kind!r}")


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; a trailing batch of one joins the previous one (BatchNorm)."""
    batches = list(
        torch.randperm(n, generator=generator, device=generator.device).split(batch_size)
    )
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


Precision = Literal["fp32", "bf16"]


def _autocast(device: torch.device, precision: Precision):
    """bf16 autocast for the fast path; fp32 (the CPU default) autocasts nothing."""
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def _make_optimizer(
    model: nn.Module, kind: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {kind!r}")


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
) -> dict[str, Any]:
    """Cross-entropy SGD on (x, y) with a fresh optimiser; the model's modes are restored after.

    precision="bf16" runs forward passes under bf16 autocast (the GPU fast path); losses and
    counts accumulate on the device, so a step never waits for the host.

    Returns the last epoch's mean loss and running accuracy, the per-epoch losses and the step
    count.
    """
    _check_epochs(epochs)
    _check_batch_size(batch_size)
    _check_positive("learning rate", lr)
    if x.shape[0] != y.shape[0] or y.dim() != 1 or x.shape[0] == 0:
        raise ConfigError(
            f"need a non-empty batch of inputs and 1-D labels, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    optimizer = _make_optimizer(model, "sgd", lr, momentum, weight_decay)
    epoch_losses: list[float] = []
    accuracy = float("nan")
    steps = 0
    with model_mode(model, training=True):
        for _ in range(epochs):
            loss_sum = torch.zeros((), device=x.device)
            correct = torch.zeros((), device=x.device, dtype=torch.long)
            for idx in _batches(x.shape[0], batch_size, generator):
                idx = idx.to(x.device)
                with _autocast(x.device, precision):
                    logits = model(x[idx])
                loss = F.cross_entropy(logits.float(), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                loss_sum += loss.detach() * idx.numel()
                correct += (logits.detach().argmax(dim=1) == y[idx]).sum()
            epoch_losses.append(float(loss_sum) / x.shape[0])
            accuracy = int(correct) / x.shape[0]
    return {
        "loss": epoch_losses[-1] if epoch_losses else float("nan"),
        "accuracy": accuracy,
        "epoch_losses": epoch_losses,
        "steps": steps,
    }


def _tempered_teacher_log_probs(
    teacher: torch.Tensor, temperature: float, teacher_kind: TeacherKind
) -> torch.Tensor:
    if teacher_kind == "logits":
        return F.log_softmax(teacher / temperature, dim=1)
    if torch.isnan(teacher).any():
        raise ConfigError("teacher probabilities contain NaN")
    # Decoded (fixed-point, noised) sums may dip below 0: clamp. A zero keeps exactly zero
    # tempered mass; clamping it to a tiny float instead would give it tiny^(1/T) ~ 1% at T=20.
    probs = teacher.clamp_min(0)
    if (probs.sum(dim=1) <= 0).any():
        raise ConfigError("every teacher probability row needs some positive mass")
    return F.log_softmax(torch.log(probs) / temperature, dim=1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float = 20.0,
    teacher_kind: TeacherKind,
) -> torch.Tensor:
    """T^2 * KL(p_T || softmax(student / T)), batch mean.

    p_T = softmax(teacher / T) for logits; for probabilities p, p_T is proportional to p^(1/T),
    i.e. softmax(log p / T), which equals the logits case when p = softmax(logits).
    """
    _check_positive("temperature", temperature)
    _check_kind(teacher_kind)
    if student_logits.shape != teacher.shape or student_logits.dim() != 2:
        raise ConfigError(
            f"student and teacher need equal N x classes shapes, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = _tempered_teacher_log_probs(teacher.detach(), temperature, teacher_kind)
    p = log_p.exp()
    # Terms with p = 0 contribute 0 (0 * log 0 = 0); where() keeps -inf out of the sum.
    pointwise = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(log_q))
    return temperature**2 * pointwise.sum() / student_logits.shape[0]


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
) -> dict[str, Any]:
    """Train the model (train mode) to match teacher outputs on dreams x with kd_loss.

    precision="bf16": forward passes under bf16 autocast, as in train_local.

    Returns the last epoch's mean loss, the share of samples whose argmax matched the teacher's
    during that epoch, the per-epoch losses and the step count.
    """
    _check_epochs(epochs)
    _check_batch_size(batch_size)
    _check_positive("learning rate", lr)
    _check_positive("temperature", temperature)
    _check_kind(teacher_kind)
    if x.shape[0] != teacher.shape[0] or x.shape[0] == 0:
        raise ConfigError(
            f"need a non-empty batch of dreams and one teacher row each, got {tuple(x.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    opt = _make_optimizer(model, optimizer, lr, momentum, weight_decay)
    teacher_classes = teacher.argmax(dim=1)
    epoch_losses: list[float] = []
    agreement = float("nan")
    steps = 0
    with model_mode(model, training=True):
        for _ in range(epochs):
            loss_sum = torch.zeros((), device=x.device)
            agree = torch.zeros((), device=x.device, dtype=torch.long)
            for idx in _batches(x.shape[0], batch_size, generator):
                idx = idx.to(x.device)
                with _autocast(x.device, precision):
                    logits = model(x[idx])
                loss = kd_loss(
                    logits.float(), teacher[idx], temperature=temperature,
                    teacher_kind=teacher_kind,
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                loss_sum += loss.detach() * idx.numel()
                agree += (logits.detach().argmax(dim=1) == teacher_classes[idx]).sum()
            epoch_losses.append(float(loss_sum) / x.shape[0])
            agreement = int(agree) / x.shape[0]
    return {
        "loss": epoch_losses[-1] if epoch_losses else float("nan"),
        "agreement": agreement,
        "epoch_losses": epoch_losses,
        "steps": steps,
    }


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1], eval mode, no gradients."""
    _check_batch_size(batch_size)
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
    _check_kind(kind)
    _check_batch_size(batch_size)
    with model_mode(model, training=False):
        logits = torch.cat([model(chunk) for chunk in x.split(batch_size)])
    out = logits if kind == "logits" else F.softmax(logits, dim=1)
    return out.to(torch.float32)
