"""[codream]: the algorithm's rounds, dream synthesis, distillation and local training.

One table, not three: `rounds` and `batch_size` are shared by the phases; the docs group the
keys by phase.
"""

from __future__ import annotations

from dataclasses import dataclass

from codream_secure.config.checks import Checks
from codream_secure.config.section import Section

SOFT_LABELS: tuple[str, ...] = ("probs", "logits")
DREAM_OBJECTIVES: tuple[str, ...] = ("entropy", "label")
TEACHERS: tuple[str, ...] = ("uniform", "class-aware")
DISTILL_BATCHNORM: tuple[str, ...] = ("batch", "frozen")
KD_GATES: tuple[str, ...] = ("off", "validation")
ROUND_ORDERS: tuple[str, ...] = ("distill-last", "local-last", "joint")
BN_STATISTICS: tuple[str, ...] = ("recalibrated", "running")
DREAM_MODES: tuple[str, ...] = ("pixel", "generator")


@dataclass(frozen=True)
class CoDreamConfig(Section):
    """Rounds; dreams (synthesis); distillation on the dream buffer; local training."""

    SECTION = "codream"

    rounds: int = 10
    round_order: str = "distill-last"
    # dreams
    dream_batch: int = 64
    dream_steps: int = 100
    dream_lr: float = 0.05
    adaptive_after: int = 3
    adaptive_weight: float = 10.0
    dream_objective: str = "entropy"
    dream_pred_weight: float = 1.0
    dream_bn_weight: float = 10.0
    # generator mode (CoDream-fast; docs/dream-modes.md)
    dream_mode: str = "pixel"
    generator_batches: int = 2
    generator_local_steps: int = 14
    generator_lr: float = 0.01
    generator_meta_lr: float = 0.3
    generator_latent_dim: int = 100
    generator_clip: float = 1.0
    # distillation
    distill_epochs: int = 5
    distill_lr: float = 0.05
    kd_temperature: float = 20.0
    buffer_size: int = 640
    soft_labels: str = "probs"
    teacher: str = "uniform"
    distill_bn: str = "batch"
    kd_gate: str = "off"
    kd_weight: float = 1.0  # round_order "joint": distillation's weight against cross-entropy
    # local training (also the baselines' training)
    warmup_epochs: int = 10
    local_epochs: int = 2
    local_lr: float = 0.05
    batch_size: int = 64
    # evaluation, every method alike
    bn_statistics: str = "recalibrated"

    def validate(self, check: Checks) -> None:
        for key in ("rounds", "dream_batch", "dream_steps", "distill_epochs", "batch_size",
                    "buffer_size", "generator_batches", "generator_local_steps",
                    "generator_latent_dim"):
            check.count(key, getattr(self, key), minimum=1)
        for key in ("warmup_epochs", "local_epochs", "adaptive_after"):
            check.count(key, getattr(self, key), minimum=0)
        for key in ("dream_lr", "distill_lr", "local_lr", "kd_temperature", "generator_lr",
                    "generator_clip"):
            check.real(key, getattr(self, key), low=0.0)
        for key in ("adaptive_weight", "dream_pred_weight", "dream_bn_weight", "kd_weight"):
            check.real(key, getattr(self, key), low=0.0, closed_low=True)
        check.real("generator_meta_lr", self.generator_meta_lr, low=0.0)
        if self.generator_meta_lr > 1.0:
            raise check.fail("generator_meta_lr", f"must be in (0, 1] (1 moves the "
                                                  f"meta-generator all the way to the round's "
                                                  f"generators), got {self.generator_meta_lr:g}")
        check.choice("dream_mode", self.dream_mode, DREAM_MODES)
        if self.buffer_size < self.dream_batch:
            raise check.fail("buffer_size", f"{self.buffer_size} cannot hold one dream batch "
                                            f"(dream_batch={self.dream_batch}); use at least "
                                            f"{self.dream_batch}")
        check.choice("soft_labels", self.soft_labels, SOFT_LABELS)
        check.choice("dream_objective", self.dream_objective, DREAM_OBJECTIVES)
        check.choice("teacher", self.teacher, TEACHERS)
        check.choice("distill_bn", self.distill_bn, DISTILL_BATCHNORM)
        check.choice("kd_gate", self.kd_gate, KD_GATES)
        check.choice("round_order", self.round_order, ROUND_ORDERS)
        if self.kd_weight != 1.0 and self.round_order != "joint":
            raise check.fail("kd_weight", f"weights distillation inside a joint round and has no "
                                          f"effect with round_order = {self.round_order!r}; set "
                                          "round_order = \"joint\" or leave kd_weight out")
        check.choice("bn_statistics", self.bn_statistics, BN_STATISTICS)
