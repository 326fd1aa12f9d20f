"""Joint acquisition ([codream] round_order = "joint"): local training in which every step
also distils on a dream batch.

Each step's loss is the cross-entropy of a private batch plus `kd_weight` x the distillation
loss of a buffer batch, so the classes a client has data for anchor the model while the dreams
teach the others. Sequential distillation and local training instead undo each other under
label skew (docs/learning-quality.md).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from codream_secure.dreams import Precision, check_precision, model_mode
from codream_secure.errors import ConfigError
from codream_secure.kd import TeacherKind, kd_from_log_probs, tempered_teacher_log_probs
from codream_secure.train_step import BatchStep, FastPath
from codream_secure.training_args import (
    autocast,
    check_batch_size,
    check_epochs,
    check_positive,
    frozen_batchnorm,
)

__all__ = ["joint_steps", "train_joint"]


def joint_steps(n_private: int, n_dreams: int, *, local_epochs: int, distill_epochs: int,
                batch_size: int) -> int:
    """Steps until the private data has had local_epochs passes and the dreams distill_epochs."""
    private = local_epochs * math.ceil(n_private / min(batch_size, n_private))
    dreams = distill_epochs * math.ceil(n_dreams / min(batch_size, n_dreams))
    return max(private, dreams)


def _stream(n: int, size: int, steps: int, generator: torch.Generator,
            device: torch.device) -> torch.Tensor:
    """steps x size indices: successive shuffles of range(n) cut into equal batches (a batch
    may span two shuffles), so every batch has the same shape."""
    shuffles = math.ceil(steps * size / n)
    order = torch.cat([torch.randperm(n, generator=generator, device=generator.device)
                       for _ in range(shuffles)])
    return order[: steps * size].to(device).view(steps, size)


def _joint_terms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dreams: torch.Tensor,
                 log_p: torch.Tensor, kd_weight: float, temperature: float,
                 precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on a private batch plus weighted KD on a dream batch, and the private
    batch's correct predictions. Two forward passes: BatchNorm normalises each batch alone."""
    with autocast(x.device, precision):
        logits = model(x)
        dream_logits = model(dreams)
    ce = F.cross_entropy(logits.float(), y)
    kd = kd_from_log_probs(dream_logits.float(), log_p, temperature)
    return ce + kd_weight * kd, (logits.detach().argmax(dim=1) == y).sum()


def train_joint(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    dreams: torch.Tensor,
    teacher: torch.Tensor,
    *,
    local_epochs: int,
    distill_epochs: int,
    lr: float,
    kd_weight: float,
    batch_size: int,
    generator: torch.Generator,
    teacher_kind: TeacherKind,
    temperature: float = 20.0,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    precision: Precision = "fp32",
    fast: FastPath | None = None,
    batchnorm: Literal["batch", "frozen"] = "batch",
) -> dict[str, Any]:
    """SGD on private (x, y) and dreams with their teacher rows, for joint_steps(...) steps.

    batchnorm, precision and fast as in distill. Returns the mean loss, the private batches'
    running accuracy and the step count.
    """
    check_epochs(local_epochs)
    check_epochs(distill_epochs)
    check_batch_size(batch_size)
    check_positive("learning rate", lr)
    check_positive("temperature", temperature)
    check_precision(precision)
    if not math.isfinite(kd_weight) or kd_weight < 0:
        raise ConfigError(f"kd_weight must be a finite number >= 0, got {kd_weight!r}")
    if x.shape[0] == 0 or x.shape[0] != y.shape[0] or y.dim() != 1:
        raise ConfigError(f"need a non-empty private set with 1-D labels, got "
                          f"{tuple(x.shape)} and {tuple(y.shape)}")
    if dreams.shape[0] == 0 or dreams.shape[0] != teacher.shape[0] or teacher.dim() != 2:
        raise ConfigError(f"need a non-empty batch of dreams and one teacher row each, got "
                          f"{tuple(dreams.shape)} and {tuple(teacher.shape)}")
    if dreams.shape[1:] != x.shape[1:]:
        raise ConfigError(f"dreams {tuple(dreams.shape[1:])} and private inputs "
                          f"{tuple(x.shape[1:])} differ in shape")
    steps = joint_steps(x.shape[0], dreams.shape[0], local_epochs=local_epochs,
                        distill_epochs=distill_epochs, batch_size=batch_size)
    step = BatchStep(_joint_terms, model, min(batch_size, x.shape[0]), fast)
    optimizer = step.optimizer("sgd", lr, momentum, weight_decay)
    log_p = tempered_teacher_log_probs(teacher.detach(), temperature, teacher_kind)
    x, dreams = step.inputs(x), step.inputs(dreams)
    private = _stream(x.shape[0], min(batch_size, x.shape[0]), steps, generator, x.device)
    dream_batches = _stream(dreams.shape[0], min(batch_size, dreams.shape[0]), steps,
                            generator, dreams.device)
    loss_sum = torch.zeros((), device=x.device)
    hits = torch.zeros((), device=x.device, dtype=torch.long)
    with model_mode(model, training=True):
        if batchnorm == "frozen":
            frozen_batchnorm(model)
        elif batchnorm != "batch":
            raise ConfigError(f"batchnorm must be 'batch' or 'frozen', got {batchnorm!r}")
        for p_idx, d_idx in zip(private, dream_batches, strict=True):
            loss, correct = step(x[p_idx], y[p_idx], dreams[d_idx], log_p[d_idx], kd_weight,
                                 temperature, precision)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            hits += correct
    seen = steps * private.shape[1]
    return {"loss": float(loss_sum) / steps if steps else float("nan"),
            "accuracy": int(hits) / seen if seen else float("nan"), "steps": steps}
