"""Sample-level DP for a client's local training: DP-SGD through Opacus' PrivacyEngine.

One SampleLevelTrainer per client keeps one accountant for the client's whole run, so epsilon
accumulates over rounds. Distillation trains on dreams, not private data, and needs no DP; dream
gradients and soft labels of a DP-trained model are post-processing (docs/privacy.md).
Poisson batches and the Gaussian noise come from the AES-CTR keystream keyed from os.urandom
(protocols.dp.samplers), never from the run's seed: the seed is published in every report.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset
from torch.utils.data._utils.collate import default_collate

from codream_secure.dreams import model_mode
from codream_secure.errors import ConfigError
from codream_secure.privacy import PrivacyLedger, calibrate_noise
from protocols.dp.samplers import gaussian, uniform

__all__ = ["KeystreamPoissonSampler", "SampleLevelTrainer", "add_keystream_noise",
           "make_private_ready"]


class KeystreamPoissonSampler(Sampler[list[int]]):
    """`steps` Poisson batches: each index joins a batch with probability q, drawn from fresh
    keystream uniforms (os.urandom keys), so no seed can replay which samples were used."""

    def __init__(self, n_samples: int, sample_rate: float, steps: int) -> None:
        self.n_samples, self.sample_rate, self.steps = n_samples, sample_rate, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield np.flatnonzero(uniform(self.n_samples) < self.sample_rate).tolist()


def add_keystream_noise(optimizer: DPOptimizer) -> DPOptimizer:
    """Make `optimizer` add its N(0, (z C)^2) noise from the keystream instead of torch's PRNG.

    The noise is drawn in float64 on the CPU and moved to each parameter's device and dtype.
    """

    def add_noise() -> None:
        params = optimizer.params
        sizes = [p.summed_grad.numel() for p in params]
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        noise = gaussian(std, sum(sizes))  # one fresh key per step
        for p, chunk in zip(params, np.split(noise, np.cumsum(sizes)[:-1]), strict=True):
            _check_processed_flag(p.summed_grad)
            shaped = torch.from_numpy(chunk).to(p.summed_grad).view_as(p.summed_grad)
            p.grad = (p.summed_grad + shaped).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise  # type: ignore[method-assign]
    return optimizer


def _collate(empty: tuple[torch.Tensor, torch.Tensor]):
    """default_collate, except that an empty Poisson batch becomes zero-length tensors."""
    return lambda items: default_collate(items) if items else empty


def make_private_ready(model: nn.Module) -> nn.Module:
    """A DP-SGD-compatible copy of model (BatchNorm -> GroupNorm via ModuleValidator.fix).

    GroupNorm keeps no running statistics, so dream losses on the result must be computed with
    use_bn_statistics=False (the BatchNorm feature term is then absent).
    """
    fixed = ModuleValidator.fix(model)
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise ConfigError(f"model cannot be trained with DP-SGD: {errors}")
    return fixed


def _int_at_least(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class SampleLevelTrainer:
    """DP-SGD (Poisson sampling, per-sample clipping, Gaussian noise) for one client's data.

    Give either `noise_multiplier`, or `target_epsilon` with `planned_epochs` (all rounds
    together): z is then calibrated once so that the planned epochs spend exactly the budget, and
    training beyond them is refused. The sample rate is q = 1 / ceil(n_samples / batch_size).
    """

    def __init__(self, *, n_samples: int, batch_size: int, max_grad_norm: float, delta: float,
                 noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 planned_epochs: int | None = None, accountant: str = "rdp", lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-4) -> None:
        self.n_samples = _int_at_least("n_samples", n_samples, 1)
        self.batch_size = _int_at_least("batch_size", batch_size, 1)
        self.steps_per_epoch = math.ceil(n_samples / batch_size)
        sample_rate = 1.0 / self.steps_per_epoch  # what Opacus derives from the loader's length
        self.planned_epochs = None
        if noise_multiplier is None:
            if target_epsilon is None or planned_epochs is None:
                raise ConfigError("give noise_multiplier, or target_epsilon with planned_epochs")
            self.planned_epochs = _int_at_least("planned_epochs", planned_epochs, 1)
            noise_multiplier = calibrate_noise(
                target_epsilon, delta, planned_epochs * self.steps_per_epoch,
                n_samples=n_samples, accountant=accountant, sample_rate=sample_rate,
                mechanism="dp-sgd")
        elif target_epsilon is not None:
            raise ConfigError("give noise_multiplier or target_epsilon, not both")
        self.ledger = PrivacyLedger(unit="sample", mechanism="dp-sgd", mode="local",
                                    noise_multiplier=noise_multiplier, l2_clip=max_grad_norm,
                                    sample_rate=sample_rate, delta=delta, n_samples=n_samples,
                                    accountant=accountant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "secure RNG off": see docs/privacy.md
            self.engine = PrivacyEngine(accountant=accountant)
        self.engine.accountant = self.ledger.accountant  # Opacus steps the ledger's accountant
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.epochs_done = 0

    @property
    def noise_multiplier(self) -> float:
        """The DP-SGD noise multiplier z (noise std z * max_grad_norm on each summed batch)."""
        return self.ledger.noise_multiplier

    def epsilon(self) -> float:
        """Epsilon spent on this client's data so far, at the trainer's delta."""
        return self.ledger.epsilon()

    def train(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
              epochs: int) -> dict[str, Any]:
        """DP-SGD epochs on (x, y) with a fresh optimiser, in place of distill.train_local."""
        _int_at_least("epochs", epochs, 0)
        if x.shape[0] != self.n_samples or y.shape != (x.shape[0],):
            raise ConfigError(f"this trainer accounts for one dataset of {self.n_samples} samples; "
                              f"got inputs {tuple(x.shape)} and labels {tuple(y.shape)}")
        if ModuleValidator.validate(model, strict=False):
            raise ConfigError("model is not DP-SGD compatible (BatchNorm?): pass it through "
                              "make_private_ready first")
        if self.planned_epochs is not None and self.epochs_done + epochs > self.planned_epochs:
            raise ConfigError(f"the privacy budget was calibrated for {self.planned_epochs} "
                              f"epochs; {self.epochs_done} are done, {epochs} more would exceed it")
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        sampler = KeystreamPoissonSampler(self.n_samples, self.ledger.sample_rate,
                                          self.steps_per_epoch)
        loader = DataLoader(TensorDataset(x, y), batch_sampler=sampler,
                            collate_fn=_collate((x[:0], y[:0])))
        epoch_losses: list[float] = []
        steps = 0
        # One trainer is one client's dataset (n_samples is checked above): tell Opacus so.
        self.engine.dataset = loader.dataset
        with model_mode(model, training=True), warnings.catch_warnings():
            # torch notes that backward hooks fire though inputs need no grad: expected here.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            hooks, dp_optimizer, loader = self.engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=self.noise_multiplier, max_grad_norm=self.ledger.l2_clip,
                poisson_sampling=False, wrap_model=False)
            add_keystream_noise(dp_optimizer)
            try:
                for _ in range(epochs):
                    loss_sum, seen = 0.0, 0
                    for xb, yb in loader:
                        dp_optimizer.zero_grad(set_to_none=True)
                        loss = F.cross_entropy(model(xb), yb) if len(xb) else None
                        if loss is not None:
                            loss.backward()
                            loss_sum += float(loss.detach()) * len(xb)
                            seen += len(xb)
                        dp_optimizer.step()  # an empty Poisson batch still adds noise
                        steps += 1
                    epoch_losses.append(loss_sum / max(seen, 1))
            finally:
                hooks.cleanup()
        self.epochs_done += epochs
        return {"loss": epoch_losses[-1] if epoch_losses else float("nan"),
                "epoch_losses": epoch_losses, "steps": steps, "epsilon": self.epsilon(),
                "delta": self.ledger.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.ledger.sample_rate}
