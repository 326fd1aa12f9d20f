"""Checks of training arguments, and the autocast and BatchNorm modes that local training,
distillation and joint training share."""

from __future__ import annotations

import math

import torch
from torch import nn

from codream_secure.dreams import Precision
from codream_secure.errors import ConfigError

__all__ = ["autocast", "check_batch_size", "check_epochs", "check_positive",
           "frozen_batchnorm"]


def check_positive(name: str, value: float) -> None:
    """A finite number above zero, or ConfigError naming it."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def check_epochs(epochs: int) -> None:
    """A whole number of epochs, zero or more."""
    if not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"epochs must be an integer >= 0, got {epochs!r}")


def check_batch_size(batch_size: int) -> None:
    """A positive whole batch size."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")


def autocast(device: torch.device, precision: Precision):
    """bf16 autocast for the fast path; fp32 (the CPU default) autocasts nothing."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def frozen_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode (the caller restores modes afterwards)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
