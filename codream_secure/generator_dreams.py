"""CoDream-fast: dreams are G(z) of a shared generator, adapted by every client and averaged.

Per dream batch the server starts a generator from its meta-generator and draws latent codes z;
each client takes a few Adam steps on (G, z) against its own dream loss and returns one flat
float32 vector (generator weight change, BatchNorm buffer change, latent change). The vectors
are summed through an aggregation channel, the server applies their mean, and after the round's
batches a Reptile step moves the meta-generator towards the adapted generators. Nothing here
knows about cryptography: the channel is any object with `sum`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from codream_secure.baselines import flatten_state, load_flat_state
from codream_secure.config import CoDreamConfig
from codream_secure.dreams import NonFiniteGradientError
from codream_secure.errors import CoDreamError, ConfigError

__all__ = ["BETAS", "LATENT_LR_RATIO", "DreamObjective", "GeneratorDreamer", "GeneratorRound",
           "GeneratorSettings", "NoDreamsError", "SlimGenerator", "adapt", "apply_update",
           "batch_of_step", "client_update", "generator_vector"]

# the official code's client optimiser: Adam with betas (0.5, 0.999), latent lr 1.5e-3 beside
# the generator's 5e-3
BETAS = (0.5, 0.999)
LATENT_LR_RATIO = 0.3

# client, dream batch (1-based), dreams G(z) -> the client's scalar loss, differentiable in x
DreamObjective = Callable[[int, int, torch.Tensor], torch.Tensor]


class NoDreamsError(CoDreamError):
    """Every dream batch of a round was skipped: the round has no dreams to exchange."""


class SumChannel(Protocol):
    """What the dreamer needs of an aggregation channel (federation.AggregationChannel)."""

    device_masking: bool

    def sum(self, inputs: dict, *, drop_after_upload: Sequence[int] = ()
            ) -> tuple[np.ndarray, frozenset[int]]: ...


class UpdateSum(Protocol):
    """(batch, latents, direction, members, after_upload) -> the sum of the members' generator
    updates for that batch and the clients in it (NonFiniteGradientError if one is not finite)."""

    def __call__(self, batch: int, latents: torch.Tensor, direction: torch.Tensor | None,
                 members: list[int], after_upload: list[int]
                 ) -> tuple[np.ndarray, frozenset[int]]: ...


class SlimGenerator(nn.Module):
    """Latent z -> C x H x W dreams in the dataset's normalised range (Fast-Datafree's layout,
    narrowed): linear -> BN -> (up x2, conv, BN, LeakyReLU) x 2 -> conv -> sigmoid -> normalise.

    The sigmoid yields pixels in [0, 1]; `mean` and `std` (per channel) map them the way the
    data loader maps real images. Sides that are not multiples of 4 are cropped from above.
    """

    def __init__(self, output_shape: Sequence[int], *, latent_dim: int, mean: Sequence[float],
                 std: Sequence[float], width: int = 16) -> None:
        super().__init__()
        channels, height, width_px = (int(v) for v in output_shape)
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(f"the generator needs one mean and std per channel ({channels}), "
                              f"got {len(mean)} and {len(std)}")
        self.output_shape = (channels, height, width_px)
        self.latent_dim = latent_dim
        self._seed_side = (math.ceil(height / 4), math.ceil(width_px / 4))
        wide = 2 * width
        self.project = nn.Linear(latent_dim, wide * self._seed_side[0] * self._seed_side[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(wide),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(wide, wide, 3, padding=1, bias=False), nn.BatchNorm2d(wide),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(wide, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Sigmoid(),
        )
        # constants of the data set, not state: kept out of the state dict and the update vector
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _, height, width = self.output_shape
        x = self.project(z).view(z.shape[0], -1, *self._seed_side)
        x = self.body(x)[:, :, :height, :width]
        return (x - self.mean) / self.std


def generator_vector(generator: nn.Module, latents: torch.Tensor) -> np.ndarray:
    """(G, z) as one float32 vector: every floating-point state entry of G (weights and BN
    running statistics, in state-dict order; not the counters), then z."""
    return np.concatenate([flatten_state(generator),
                           latents.detach().reshape(-1).to("cpu", torch.float32).numpy()])


def apply_update(generator: nn.Module, latents: torch.Tensor, update: np.ndarray
                 ) -> tuple[nn.Module, torch.Tensor]:
    """A copy of (G, z) moved by `update` (a generator_vector difference).

    The addition runs in float64 and rounds once to float32, so applying a client's own update
    to the state it started from gives back that client's (G, z) up to that one rounding.
    """
    start = generator_vector(generator, latents).astype(np.float64)
    update = np.asarray(update, dtype=np.float64).reshape(-1)
    if update.shape != start.shape:
        raise ConfigError(f"a generator update needs {start.size} values, got {update.size}")
    moved = (start + update).astype(np.float32)
    split = moved.size - latents.numel()
    new_generator = copy.deepcopy(generator)
    load_flat_state(new_generator, moved[:split])
    new_latents = torch.from_numpy(moved[split:].copy()).view_as(latents).to(latents.device)
    return new_generator, new_latents


def adapt(generator: nn.Module, latents: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor],
          *, steps: int, lr: float) -> tuple[nn.Module, torch.Tensor]:
    """One client's local work: `steps` Adam steps on copies of (G, z) against `loss(G(z))`.

    Fresh optimiser state per call (as the official code resets it per batch); G runs in train
    mode, so its BatchNorm normalises with batch statistics and updates its running ones.
    """
    local = copy.deepcopy(generator).train()
    z = latents.detach().clone().requires_grad_(True)
    weights = list(local.parameters())
    optimiser = torch.optim.Adam([{"params": weights, "lr": lr},
                                  {"params": [z], "lr": lr * LATENT_LR_RATIO}], betas=BETAS)
    for _ in range(steps):
        # gradients for (G, z) only: the client model's own .grad stays untouched
        grads = torch.autograd.grad(loss(local(z)), [*weights, z])
        for tensor, grad in zip([*weights, z], grads, strict=True):
            tensor.grad = grad
        optimiser.step()
    return local, z.detach()


def client_update(meta: nn.Module, latents: torch.Tensor,
                  loss: Callable[[torch.Tensor], torch.Tensor], *, settings: GeneratorSettings,
                  direction: torch.Tensor | None = None, weight: float = 0.0) -> np.ndarray:
    """One client's upload for a dream batch: its adapted (G, z) minus the (G, z) it started
    from, with the server entropy's first-order term -weight * <direction, G(z)> added to
    `loss` when a direction is given (as in pixel mode)."""
    def objective(x: torch.Tensor) -> torch.Tensor:
        value = loss(x)
        if direction is not None:
            value = value - weight * (direction * x).sum()
        return value

    begin = generator_vector(meta, latents)
    generator, z = adapt(meta, latents, objective, steps=settings.local_steps, lr=settings.lr)
    return generator_vector(generator, z) - begin


def render(generator: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """G(z) as the clients saw it (train-mode BatchNorm), leaving G's running statistics as
    they are."""
    with torch.no_grad():
        return copy.deepcopy(generator).train()(latents).detach()


def batch_of_step(step: int, dream_steps: int, batches: int) -> int:
    """The dream batch (1-based) that a dropout planned at pixel-mode step `step` of
    `dream_steps` falls in: the step's share of the round, scaled to the batches."""
    if not 1 <= step <= dream_steps:
        raise ConfigError(f"dropout step {step} lies outside 1..{dream_steps}")
    return max(1, math.ceil(step * batches / dream_steps))


@dataclass(frozen=True)
class GeneratorSettings:
    """The [codream] generator-mode keys the dreamer needs."""

    batches: int
    local_steps: int
    lr: float
    meta_lr: float
    latent_dim: int
    dream_batch: int

    @classmethod
    def from_config(cls, codream: CoDreamConfig) -> GeneratorSettings:
        """The [codream] table's generator keys and its dream_batch."""
        return cls(batches=codream.generator_batches, local_steps=codream.generator_local_steps,
                   lr=codream.generator_lr, meta_lr=codream.generator_meta_lr,
                   latent_dim=codream.generator_latent_dim, dream_batch=codream.dream_batch)


@dataclass
class GeneratorRound:
    """One round's dreams (every kept batch's G(z), detached, on the CPU), the clients still
    in the sum at the end, why each skipped batch was skipped, what each client downloaded."""

    dreams: torch.Tensor
    members: frozenset[int]
    reasons: list[str] = field(default_factory=list)
    bytes_down: dict[int, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        """Dream batches skipped for a sum (or an update) that was not finite."""
        return len(self.reasons)


class GeneratorDreamer:
    """The server's meta-generator across rounds and the protocol of one round's dream batches."""

    def __init__(self, output_shape: Sequence[int], *, mean: Sequence[float],
                 std: Sequence[float], settings: GeneratorSettings, init_seed: int,
                 device: torch.device | str = "cpu") -> None:
        """`init_seed` draws the meta-generator's first weights (the global RNG is left as
        it was)."""
        self.settings, self.device = settings, torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.meta = SlimGenerator(output_shape, latent_dim=settings.latent_dim, mean=mean,
                                      std=std).to(self.device)
        self.skipped: dict[int, list[str]] = {}  # round -> why each skipped dream batch was

    @property
    def vector_length(self) -> int:
        """Values in each client's update: generator state plus one batch of latents."""
        state = sum(t.numel() for t in self.meta.state_dict().values() if t.is_floating_point())
        return state + self.settings.dream_batch * self.settings.latent_dim

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The meta-generator's weights and buffers (what a resumed run continues from)."""
        return self.meta.state_dict()

    def dream(self, round_index: int, clients: Sequence[int], loss_fn: DreamObjective,
              channel: SumChannel, *, latent_seeds: Callable[[int], torch.Generator],
              leaving: Mapping[int, tuple[int, bool]] | None = None,
              adaptive: Callable[[torch.Tensor], torch.Tensor] | None = None,
              adaptive_weight: float = 0.0, seconds: dict[str, float] | None = None,
              progress: object = None) -> GeneratorRound:
        """Run the round's dream batches through `channel` (opened by the caller for
        `vector_length` values) and take the Reptile step; every client's update is computed
        here, with `loss_fn`.

        `leaving` maps a client to (batch, after_upload): it drops out at that batch, before or
        after its upload, and takes no part in later batches. `adaptive(x)` is the server
        model's entropy gradient at a batch's first dreams; clients then add
        -adaptive_weight * <that gradient, G(z)> to their loss (see docs/dream-modes.md).
        A batch whose sum is not finite, or with a client whose update is not, is skipped.
        """
        seconds = seconds if seconds is not None else {"dreams": 0.0, "aggregation": 0.0}

        def local_sum(batch: int, latents: torch.Tensor, direction: torch.Tensor | None,
                      members: list[int], after_upload: list[int]
                      ) -> tuple[np.ndarray, frozenset[int]]:
            start = time.perf_counter()
            inputs = {c: self._client_update(c, batch, latents, loss_fn, direction,
                                             adaptive_weight, on_device=channel.device_masking)
                      for c in members}
            seconds["dreams"] += time.perf_counter() - start
            start = time.perf_counter()
            try:
                return channel.sum(inputs, drop_after_upload=after_upload)
            finally:
                seconds["aggregation"] += time.perf_counter() - start

        return self.dream_batches(round_index, clients, local_sum, latent_seeds=latent_seeds,
                                  leaving=leaving, adaptive=adaptive, progress=progress)

    def dream_batches(self, round_index: int, clients: Sequence[int], sum_updates: UpdateSum,
                      *, latent_seeds: Callable[[int], torch.Generator],
                      leaving: Mapping[int, tuple[int, bool]] | None = None,
                      adaptive: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      progress: object = None) -> GeneratorRound:
        """The round's batches, with `sum_updates` returning the sum of the members' updates
        for each (computed in this process, or by remote clients on Flower); then Reptile."""
        settings, leaving = self.settings, dict(leaving or {})
        outcome = GeneratorRound(torch.zeros(0), frozenset(clients))
        kept, adapted = [], []
        task = progress.task(f"round {round_index} dreams", settings.batches) if progress else None
        for batch in range(1, settings.batches + 1):
            latents = torch.randn((settings.dream_batch, settings.latent_dim),
                                  generator=latent_seeds(batch)).to(self.device)
            before = {c for c, (b, after) in leaving.items() if b == batch and not after}
            after_upload = [c for c, (b, after) in leaving.items() if b == batch and after]
            members = sorted(outcome.members - before)
            direction = None if adaptive is None else adaptive(render(self.meta, latents))
            download = 4 * (self.vector_length + (0 if direction is None else direction.numel()))
            for c in members:
                outcome.bytes_down[c] = outcome.bytes_down.get(c, 0) + download
            mean, reason = self._released_mean(sum_updates, batch, latents, direction, members,
                                               after_upload, outcome)
            if mean is None:
                outcome.reasons.append(f"batch {batch}: {reason}")
            else:
                generator, z = apply_update(self.meta, latents, mean)
                kept.append(render(generator, z).cpu())
                adapted.append(flatten_state(generator))
            if progress:
                progress.advance(task)
        if progress:
            progress.done(task)
        self.skipped[round_index] = list(outcome.reasons)
        if not kept:
            raise NoDreamsError(f"all {settings.batches} dream batches were skipped ("
                                f"{'; '.join(outcome.reasons)})")
        self._reptile(adapted)
        outcome.dreams = torch.cat(kept)
        return outcome

    @staticmethod
    def _released_mean(sum_updates: UpdateSum, batch: int, latents: torch.Tensor,
                       direction: torch.Tensor | None, members: list[int],
                       after_upload: list[int], outcome: GeneratorRound
                       ) -> tuple[np.ndarray | None, str]:
        """The mean update released for one batch, or None and why the batch is skipped; the
        clients that leave are dropped from `outcome.members`."""
        try:
            total, included = sum_updates(batch, latents, direction, members, after_upload)
        except NonFiniteGradientError as error:  # refused before any message: nothing released
            return None, str(error)
        outcome.members = frozenset(included) - set(after_upload)
        mean = total / len(included)
        if not np.isfinite(mean).all():
            return None, "the released sum is not finite"
        return mean, ""

    def _client_update(self, client: int, batch: int, latents: torch.Tensor,
                       loss_fn: DreamObjective, direction: torch.Tensor | None, weight: float,
                       *, on_device: bool) -> np.ndarray | torch.Tensor:
        """What client `client` uploads for `batch` when its update is computed here."""
        update = client_update(self.meta, latents, lambda x: loss_fn(client, batch, x),
                               settings=self.settings, direction=direction, weight=weight)
        return torch.from_numpy(update).to(self.device) if on_device else update

    def _reptile(self, adapted: list[np.ndarray]) -> None:
        """meta += meta_lr * (mean adapted generator - meta), in float64."""
        meta = flatten_state(self.meta).astype(np.float64)
        target = np.mean(np.stack(adapted).astype(np.float64), axis=0)
        load_flat_state(self.meta, (meta + self.settings.meta_lr * (target - meta))
                        .astype(np.float32))
