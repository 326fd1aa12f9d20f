"""One client's side of a CoDream round: local training, its dream loss, soft labels,
distillation with the optional validation gate, and evaluation.

The in-process federation holds one member per client; on Flower each ClientApp holds one. Every
random draw is keyed by (seed, purpose, round, client), so a member computes the same thing
wherever it runs.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import CoDreamConfig
from .distill import distill, evaluate, recalibrate_batchnorm, soft_labels, train_local
from .dreams import DreamLossWeights, DreamTargets, dream_objective
from .errors import CoDreamError
from .joint_training import train_joint
from .results import ClientData
from .seeds import generator
from .train_step import FastPath

if TYPE_CHECKING:  # opacus loads only for runs with DP
    from .sample_dp import SampleLevelTrainer

__all__ = ["KDOutcome", "Member", "ModelDivergedError", "check_finite", "kd_options",
           "state_digest", "trains_after_acquisition"]


class ModelDivergedError(CoDreamError, FloatingPointError):
    """A model's weights hold NaN or inf after training or distillation."""


def check_finite(model: nn.Module, name: str, round_index: int) -> None:
    """Refuse a model that distillation left with NaN or inf."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise ModelDivergedError(
            f"{name} holds NaN or inf after round {round_index}'s distillation (lower "
            "[codream] distill_lr or kd_temperature)")


def state_digest(model: nn.Module) -> bytes:
    """SHA-256 of every state_dict entry (name, dtype, shape and bytes): equal digests mean
    equal weights and buffers."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.digest()


def kd_options(codream: CoDreamConfig, precision: str, fast: FastPath | None) -> dict[str, Any]:
    """The keyword arguments of every distillation of a run, from its [codream] keys."""
    return dict(epochs=codream.distill_epochs, lr=codream.distill_lr,
                batch_size=codream.batch_size, temperature=codream.kd_temperature,
                teacher_kind=codream.soft_labels, precision=precision, fast=fast,
                batchnorm=codream.distill_bn)


def trains_after_acquisition(codream: CoDreamConfig, acquired: bool) -> bool:
    """Whether a client trains locally at the end of its round: always in "local-last", and in
    "joint" when it did not acquire (a joint round's local training is its acquisition)."""
    return codream.round_order == "local-last" or (codream.round_order == "joint"
                                                    and not acquired)


def distill_model(model: nn.Module, bx: torch.Tensor, by: torch.Tensor, *, seed: int,
                  round_index: int, key: object, options: dict[str, Any]) -> None:
    """Distil one model on the buffer, with the round's generator for `key` (a client or
    "server")."""
    distill(model, bx, by, generator=generator(seed, "distill", round_index, key), **options)


@dataclass(frozen=True)
class KDOutcome:
    """One member's validation and test accuracy before and after distillation, and whether
    it kept the distilled weights (the validation gate)."""

    val_before: float
    test_before: float
    val_after: float
    test_after: float
    kept: bool


@dataclass
class Member:
    """Client `index`: its model, its private data, and the shared test set it reports on."""

    index: int
    model: nn.Module
    data: ClientData
    x_test: torch.Tensor
    y_test: torch.Tensor
    codream: CoDreamConfig
    seed: int
    precision: str = "fp32"
    train_path: FastPath | None = None
    trainer: SampleLevelTrainer | None = None  # sample-level DP-SGD
    weights: DreamLossWeights = field(default_factory=DreamLossWeights)
    use_bn_statistics: bool = True
    # the state digest after the last evaluation, and its scores (see evaluate)
    _scored: tuple[bytes, tuple[float, float]] | None = field(default=None, init=False,
                                                              repr=False, compare=False)

    def train(self, round_index: int, epochs: int) -> None:
        """`epochs` of local training on the private data (DP-SGD with a trainer)."""
        if self.trainer is not None:
            if epochs:
                self.trainer.train(self.model, self.data.x_train, self.data.y_train,
                                   epochs=epochs)
            return
        train_local(self.model, self.data.x_train, self.data.y_train, epochs=epochs,
                    lr=self.codream.local_lr, precision=self.precision, fast=self.train_path,
                    batch_size=self.codream.batch_size,
                    generator=generator(self.seed, "local", round_index, self.index))

    def evaluate(self) -> tuple[float, float]:
        """Validation and test accuracy, after re-estimating BatchNorm statistics on the
        private training data when [codream] bn_statistics says so.

        A model whose state is what the last evaluation left gets that evaluation's scores
        without a pass over the data: re-estimation ignores the old statistics and evaluation
        is deterministic, so a second pass would give the same numbers.
        """
        if self._scored is not None and self._scored[0] == state_digest(self.model):
            return self._scored[1]
        if self.codream.bn_statistics == "recalibrated":
            recalibrate_batchnorm(self.model, self.data.x_train)
        scores = (evaluate(self.model, self.data.x_val, self.data.y_val),
                  evaluate(self.model, self.x_test, self.y_test))
        self._scored = (state_digest(self.model), scores)
        return scores

    def dream_loss(self, x: torch.Tensor, targets: DreamTargets | None = None) -> torch.Tensor:
        """This member's dream loss on x, differentiable in x."""
        return dream_objective(self.model, x, self.weights,
                               use_bn_statistics=self.use_bn_statistics, targets=targets)

    def labels(self, dreams: torch.Tensor) -> torch.Tensor:
        """Soft labels (probabilities or logits) on the dreams, on the CPU."""
        return soft_labels(self.model, dreams, kind=self.codream.soft_labels).cpu()

    def acquire(self, round_index: int, bx: torch.Tensor, by: torch.Tensor,
                options: dict[str, Any]) -> KDOutcome:
        """Distil on the buffer (bx, by), or in a "joint" round train on the private data
        and the buffer together; with [codream] kd_gate "validation" keep the
        distilled weights only if validation accuracy did not drop."""
        val_before, test_before = self.evaluate()
        saved = copy.deepcopy(self.model.state_dict()) \
            if self.codream.kd_gate == "validation" else None
        if self.codream.round_order == "joint":
            self._train_joint(round_index, bx, by, options)
        else:
            distill_model(self.model, bx, by, seed=self.seed, round_index=round_index,
                          key=self.index, options=options)
        check_finite(self.model, f"client {self.index}'s model", round_index)
        val_after, test_after = self.evaluate()
        kept = saved is None or val_after >= val_before
        if not kept:
            self.model.load_state_dict(saved)
        return KDOutcome(val_before, test_before, val_after, test_after, kept)

    def _train_joint(self, round_index: int, bx: torch.Tensor, by: torch.Tensor,
                     options: dict[str, Any]) -> None:
        """Local training with distillation on the buffer in every step (round_order "joint")."""
        train_joint(self.model, self.data.x_train, self.data.y_train, bx, by,
                    local_epochs=self.codream.local_epochs,
                    distill_epochs=options["epochs"], lr=self.codream.local_lr,
                    kd_weight=self.codream.kd_weight, batch_size=options["batch_size"],
                    temperature=options["temperature"], teacher_kind=options["teacher_kind"],
                    precision=options["precision"], fast=options["fast"],
                    batchnorm=options["batchnorm"],
                    generator=generator(self.seed, "joint", round_index, self.index))
