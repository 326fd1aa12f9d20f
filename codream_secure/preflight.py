"""Checks a run makes once its data is loaded and its models are built, before it writes
anything: what the config alone cannot tell (a model that cannot train on the run's smallest
batch) and what the aggregation sessions would otherwise refuse only in round 1."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from codream_secure.config import SimulationConfig
from codream_secure.errors import ConfigError
from protocols.errors import ProtocolError

__all__ = ["check_models_train", "check_ring", "check_trains_on"]


def check_ring(config: SimulationConfig) -> None:
    """The ring must hold the sum of every client's clipped vector. With client-level DP the
    clips are [privacy]'s and the noise needs room too: dp_plan.plan_client_dp checks those."""
    if config.privacy.dp == "client":
        return
    plan = config.aggregation_plan()
    dream = ("codream", "generator_clip") if config.codream.dream_mode == "generator" else (
        "aggregation", "grad_clip")
    for table, key in (dream, ("aggregation", "label_clip")):
        try:
            plan.scale_bits(clip=getattr(getattr(config, table), key))
        except ProtocolError as error:
            raise ConfigError(f"[{table}] {key}: {error}") from None


def check_models_train(config: SimulationConfig, models: Sequence[nn.Module],
                       server_model: nn.Module, *, input_shape: tuple[int, int, int],
                       num_classes: int) -> None:
    """Every architecture takes the run's smallest training batch: one input where [codream]
    batch_size or dream_batch (the first distillation's whole buffer) is 1, else two."""
    ones = [key for key in ("batch_size", "dream_batch") if getattr(config.codream, key) == 1]
    batch = 1 if ones else 2
    hint = f" (set [codream] {' and '.join(ones)} to at least 2)" if ones else ""
    named = dict(zip(config.client_models, models, strict=True))
    for what, model in [*((f"model {name!r}", m) for name, m in named.items()),
                        (f"server model {config.models.server_model!r}", server_model)]:
        try:
            check_trains_on(model, batch=batch, input_shape=input_shape,
                            num_classes=num_classes, what=f"[models] {what}")
        except ConfigError as error:
            raise ConfigError(f"{error}{hint}") from None


def check_trains_on(model: nn.Module, *, batch: int, input_shape: tuple[int, int, int],
                    num_classes: int, what: str) -> None:
    """ConfigError unless a copy of `model`, in training mode, maps `batch` inputs of
    `input_shape` to `num_classes` logits each (BatchNorm needs more than one value per channel:
    a batch of one fails where a layer's map has shrunk to 1x1). `model` itself is untouched."""
    probe = copy.deepcopy(model).train()
    device = next(probe.parameters()).device
    shape = "x".join(map(str, input_shape))
    try:
        with torch.no_grad():
            logits = probe(torch.zeros(batch, *input_shape, device=device))
    except (RuntimeError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise ConfigError(f"{what} cannot train on batches of {batch} input(s) shaped {shape} "
                          f"({reason[:160]})") from None
    if tuple(logits.shape) != (batch, num_classes):
        raise ConfigError(f"{what} maps inputs shaped {shape} to {tuple(logits.shape[1:])}, "
                          f"not to {num_classes} class logits")
