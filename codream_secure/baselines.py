"""Reference methods a CoDream run is compared against: isolated, FedAvg and centralized training.

All three run on exactly the client splits CoDream gets and record `MethodResult` rows at the
same points: round 0 after warm-up, then after each round of `local_epochs` local epochs.

Seeding (identical in the three methods, so "client k" starts from the same weights and sees
the same shuffles everywhere): client k's model is initialised under `torch.manual_seed(seed *
1000 + k)` inside `torch.random.fork_rng`, so the caller's global RNG state is restored
untouched; its batch shuffles come from its own `torch.Generator` seeded `seed * 1000 + k`.
FedAvg's common initial model is client 0's. Optimiser: SGD, momentum 0.9, weight decay 1e-4
(as CoDream's local training), fresh at every `train_local` call, i.e. every round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from codream_secure.distill import evaluate, recalibrate_batchnorm, train_local
from codream_secure.errors import ConfigError
from codream_secure.models import build_model
from codream_secure.results import ClientData, MethodResult

__all__ = [
    "Aggregate",
    "Progress",
    "flatten_state",
    "load_flat_state",
    "run_centralized",
    "run_fedavg",
    "run_isolated",
    "seeded_model",
    "weighted_mean",
]

Aggregate = Callable[[list[np.ndarray], list[float]], np.ndarray]

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


class Progress(Protocol):
    """Optional progress sink (e.g. a rich.progress wrapper)."""

    def task(self, name: str, total: int) -> Any: ...

    def advance(self, task_id: Any, n: int = 1) -> None: ...

    def done(self, task_id: Any) -> None: ...


# --- seeding and state vectors -----------------------------------------------------------


def client_seed(seed: int, k: int) -> int:
    """Seed of client k's model initialisation and of its shuffling generator."""
    return seed * 1000 + k


def seeded_model(
    name: str, *, input_shape: tuple[int, int, int], num_classes: int, seed: int
) -> nn.Module:
    """`build_model` with weights drawn from `seed`; the global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name, input_shape=tuple(input_shape), num_classes=num_classes)


def _float_entries(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in model.state_dict().items() if t.is_floating_point()]


def flatten_state(model: nn.Module) -> np.ndarray:
    """Every floating-point state_dict entry (parameters, BN running stats), float32, in order.

    Integer buffers (BatchNorm's num_batches_tracked) are left out: they are counters, not
    something to average. The round trip through `load_flat_state` is exact for float32 models.
    """
    entries = _float_entries(model)
    if not entries:
        return np.zeros(0, dtype=np.float32)
    flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for _, t in entries])
    return flat.numpy().copy()


def load_flat_state(model: nn.Module, flat: np.ndarray) -> None:
    """Write a `flatten_state` vector back into the model's floating-point entries, in place."""
    entries = _float_entries(model)
    total = sum(t.numel() for _, t in entries)
    vec = np.asarray(flat)
    if vec.ndim != 1 or vec.shape[0] != total:
        raise ConfigError(f"state vector needs shape ({total},), got {tuple(vec.shape)}")
    source = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for _, t in entries:
            n = t.numel()
            t.copy_(source[offset : offset + n].view_as(t))  # state_dict tensors share storage
            offset += n


def _int_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: t.detach().clone() for n, t in model.state_dict().items() if not t.is_floating_point()
    }


def weighted_mean(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """sum_k w_k v_k / sum_k w_k, accumulated in float64, returned as float32.

    With integer weights, identical inputs come back bit for bit (w*v and its partial sums are
    exact in float64).
    """
    if not vectors or len(vectors) != len(weights):
        raise ConfigError(f"need one weight per vector, got {len(vectors)} and {len(weights)}")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"weights must be finite, >= 0 and not all zero, got {weights!r}")
    acc = np.zeros(np.shape(vectors[0]), dtype=np.float64)
    for v, w in zip(vectors, weights, strict=True):
        acc += float(w) * np.asarray(v, dtype=np.float64)
    return (acc / float(sum(weights))).astype(np.float32)


# --- validation and progress -------------------------------------------------------------


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_labelled(what: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(
            f"{what} needs a non-empty set of inputs and 1-D labels, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )


def _check_common(
    clients: Sequence[ClientData],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    warmup_epochs: int,
    rounds: int,
    local_epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> None:
    if len(clients) == 0:
        raise ConfigError("need at least one client")
    _check_int("warmup_epochs", warmup_epochs, 0)
    _check_int("rounds", rounds, 0)
    _check_int("local_epochs", local_epochs, 0)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    _check_labelled("the test set", x_test, y_test)
    for k, c in enumerate(clients):
        _check_labelled(f"client {k}'s training split", c.x_train, c.y_train)
        _check_labelled(f"client {k}'s validation split", c.x_val, c.y_val)


def _check_models(models: Sequence[str], clients: Sequence[ClientData]) -> list[str]:
    if isinstance(models, str) or len(models) != len(clients):
        raise ConfigError(f"need one model name per client ({len(clients)}), got {models!r}")
    return list(models)


@contextmanager
def _task(progress: Progress | None, name: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; no-op without a progress sink; `done` is called even on error."""
    if progress is None:
        yield lambda n: None
        return
    task_id = progress.task(name, total)
    try:
        yield lambda n: progress.advance(task_id, n) if n else None
    finally:
        progress.done(task_id)


def _train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    if epochs > 0:
        train_local(
            model,
            x,
            y,
            epochs=epochs,
            lr=lr,
            momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY,
            batch_size=batch_size,
            generator=generator,
        )


def _scores(net: nn.Module, x_own: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
            x_test: torch.Tensor, y_test: torch.Tensor, recalibrate: bool) -> tuple[float, float]:
    """(validation, test) accuracy, after re-estimating BatchNorm statistics on x_own (the
    training data of whoever evaluates) when `recalibrate`, exactly as CoDream's clients do."""
    if recalibrate:
        recalibrate_batchnorm(net, x_own)
    return evaluate(net, x_val, y_val), evaluate(net, x_test, y_test)


# --- the three methods -------------------------------------------------------------------


def _run_per_model(
    name: str,
    data: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    models: list[str],
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    warmup_epochs: int,
    rounds: int,
    local_epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: Progress | None,
    recalibrate: bool,
) -> MethodResult:
    """Model k trains on data[k] = (x_train, y_train, x_val, y_val) alone; shared by two methods."""
    nets = [
        seeded_model(
            m, input_shape=input_shape, num_classes=num_classes, seed=client_seed(seed, k)
        ).to(x_test.device)
        for k, m in enumerate(models)
    ]
    gens = [torch.Generator().manual_seed(client_seed(seed, k)) for k in range(len(nets))]
    result = MethodResult(name)
    total = len(nets) * (warmup_epochs + rounds * local_epochs)
    with _task(progress, name, total) as advance:
        for r in range(rounds + 1):
            epochs = warmup_epochs if r == 0 else local_epochs
            val, test = [], []
            for net, gen, (xt, yt, xv, yv) in zip(nets, gens, data, strict=True):
                _train(net, xt, yt, epochs, lr, batch_size, gen)
                advance(epochs)
                v, t = _scores(net, xt, xv, yv, x_test, y_test, recalibrate)
                val.append(v)
                test.append(t)
            result.record(val, test)
    return result


def run_isolated(
    clients: Sequence[ClientData],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    models: Sequence[str],
    input_shape: tuple[int, int, int],
    num_classes: int,
    warmup_epochs: int,
    rounds: int,
    local_epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: Progress | None = None,
    bn_statistics: str = "recalibrated",
) -> MethodResult:
    """Each client trains its own models[k] on its own data only (no communication)."""
    _check_common(
        clients, x_test, y_test, warmup_epochs=warmup_epochs, rounds=rounds,
        local_epochs=local_epochs, lr=lr, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    names = _check_models(models, clients)
    data = [(c.x_train, c.y_train, c.x_val, c.y_val) for c in clients]
    return _run_per_model(
        "isolated", data, x_test, y_test, names, input_shape=input_shape,
        num_classes=num_classes, warmup_epochs=warmup_epochs, rounds=rounds,
        local_epochs=local_epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress,
        recalibrate=_recalibrates(bn_statistics),
    )  # fmt: skip


def run_centralized(
    clients: Sequence[ClientData],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    models: Sequence[str],
    input_shape: tuple[int, int, int],
    num_classes: int,
    warmup_epochs: int,
    rounds: int,
    local_epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: Progress | None = None,
    bn_statistics: str = "recalibrated",
) -> MethodResult:
    """Upper reference: every client's architecture trained on all clients' pooled data.

    Entry k is models[k] trained (seeded as client k) on the concatenated training splits and
    validated on the concatenated validation splits, for the same epochs as `run_isolated`.
    """
    _check_common(
        clients, x_test, y_test, warmup_epochs=warmup_epochs, rounds=rounds,
        local_epochs=local_epochs, lr=lr, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    names = _check_models(models, clients)
    pooled = (
        torch.cat([c.x_train for c in clients]),
        torch.cat([c.y_train for c in clients]),
        torch.cat([c.x_val for c in clients]),
        torch.cat([c.y_val for c in clients]),
    )
    return _run_per_model(
        "centralized", [pooled] * len(names), x_test, y_test, names,
        input_shape=input_shape, num_classes=num_classes, warmup_epochs=warmup_epochs,
        rounds=rounds, local_epochs=local_epochs, lr=lr, batch_size=batch_size, seed=seed,
        progress=progress, recalibrate=_recalibrates(bn_statistics),
    )  # fmt: skip


def run_fedavg(
    clients: Sequence[ClientData],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    model: str | Sequence[str],
    input_shape: tuple[int, int, int],
    num_classes: int,
    warmup_epochs: int,
    rounds: int,
    local_epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: Progress | None = None,
    aggregate: Aggregate | None = None,
    bn_statistics: str = "recalibrated",
) -> MethodResult:
    """FedAvg over one shared architecture (a list of names must all be equal).

    Every client starts from the common initial model (client 0's seed). Round 0 is a FedAvg
    round of `warmup_epochs` local epochs, rounds 1.. of `local_epochs`; after each, the server
    sets the global model to `aggregate(vectors, weights)` of the clients' `flatten_state`
    vectors with weights = training-set sizes (default `weighted_mean`), so the hook runs once
    per round including round 0, except that round 0 is skipped when warmup_epochs == 0 (all
    clients still hold the initial model). Integer buffers (num_batches_tracked) take the
    maximum over clients. Each client then records the global model's accuracy on its own
    validation split and on the test set, with BatchNorm statistics re-estimated on its own
    training data when bn_statistics is "recalibrated" (else the averaged ones, the same for
    all clients).
    """
    _check_common(
        clients, x_test, y_test, warmup_epochs=warmup_epochs, rounds=rounds,
        local_epochs=local_epochs, lr=lr, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    if isinstance(model, str):
        arch = model
    else:
        names = _check_models(model, clients)
        if len(set(names)) != 1:
            raise ConfigError(
                f"FedAvg averages weights, so every client needs the same architecture; got {names}"
            )
        arch = names[0]
    agg: Aggregate = weighted_mean if aggregate is None else aggregate
    net = seeded_model(
        arch, input_shape=input_shape, num_classes=num_classes, seed=client_seed(seed, 0)
    ).to(x_test.device)
    global_flat = flatten_state(net)
    global_ints = _int_entries(net)
    gens = [torch.Generator().manual_seed(client_seed(seed, k)) for k in range(len(clients))]
    weights = [float(c.x_train.shape[0]) for c in clients]
    result = MethodResult("fedavg")
    total = len(clients) * (warmup_epochs + rounds * local_epochs)
    with _task(progress, "fedavg", total) as advance:
        for r in range(rounds + 1):
            epochs = warmup_epochs if r == 0 else local_epochs
            if r > 0 or epochs > 0:
                vectors, ints = [], []
                for c, gen in zip(clients, gens, strict=True):
                    load_flat_state(net, global_flat)
                    net.load_state_dict(global_ints, strict=False)
                    _train(net, c.x_train, c.y_train, epochs, lr, batch_size, gen)
                    advance(epochs)
                    vectors.append(flatten_state(net))
                    ints.append(_int_entries(net))
                new = np.asarray(agg(vectors, list(weights)))
                if new.shape != global_flat.shape or not np.isfinite(new).all():
                    raise ConfigError(
                        f"aggregate returned shape {new.shape} (need {global_flat.shape}) or "
                        "non-finite values"
                    )
                global_flat = new.astype(np.float32, copy=False)
                global_ints = {
                    n: torch.stack([d[n] for d in ints]).amax(dim=0) for n in global_ints
                }
            val, test = [], []
            for c in clients:  # each client evaluates the global model on its side
                load_flat_state(net, global_flat)
                net.load_state_dict(global_ints, strict=False)
                v, t = _scores(net, c.x_train, c.x_val, c.y_val, x_test, y_test,
                               _recalibrates(bn_statistics))
                val.append(v)
                test.append(t)
            result.record(val, test)
    return result


def _recalibrates(bn_statistics: str) -> bool:
    if bn_statistics not in ("recalibrated", "running"):
        raise ConfigError(f"bn_statistics must be 'recalibrated' or 'running', got "
                          f"{bn_statistics!r}")
    return bn_statistics == "recalibrated"
