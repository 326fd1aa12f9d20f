"""The distillation loss: T^2 * KL between a tempered teacher and the student."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from codream_secure.errors import ConfigError
from codream_secure.training_args import check_positive

__all__ = ["TeacherKind", "check_kind", "kd_from_log_probs", "kd_loss",
           "tempered_teacher_log_probs"]

TeacherKind = Literal["probs", "logits"]


def check_kind(kind: str) -> None:
    """A teacher kind, 'probs' or 'logits', or ConfigError naming the value given."""
    if kind not in ("probs", "logits"):
        raise ConfigError(f"kind must be 'probs' or 'logits', got {kind!r}")


def tempered_teacher_log_probs(
    teacher: torch.Tensor, temperature: float, teacher_kind: TeacherKind
) -> torch.Tensor:
    """log p_T, the teacher tempered at `temperature` (see kd_loss)."""
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


def kd_from_log_probs(student_logits: torch.Tensor, log_p: torch.Tensor, temperature: float
                      ) -> torch.Tensor:
    """kd_loss against teacher log-probabilities already tempered."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    p = log_p.exp()
    # Terms with p = 0 contribute 0 (0 * log 0 = 0); where() keeps -inf out of the sum.
    pointwise = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(log_q))
    return temperature**2 * pointwise.sum() / student_logits.shape[0]


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
    check_positive("temperature", temperature)
    check_kind(teacher_kind)
    if student_logits.shape != teacher.shape or student_logits.dim() != 2:
        raise ConfigError(
            f"student and teacher need equal N x classes shapes, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    log_p = tempered_teacher_log_probs(teacher.detach(), temperature, teacher_kind)
    return kd_from_log_probs(student_logits, log_p, temperature)
