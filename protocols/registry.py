"""Every aggregator behind one session interface: "plain" | "secagg" | "secagg+" | "paillier".

`open_session` is what an application calls; differential privacy wraps any of them
(`protocols.private`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np

from .api import PROTOCOLS, SecAggSession
from .errors import NonFiniteInputError, ParameterError, TooFewSurvivorsError
from .network import Traffic
from .secagg.client import RingNoise
from .secagg.server import StepOutcome

__all__ = ["AggregationSession", "PlainSession", "open_session"]

PLAIN_NOISE_SCALE_BITS = 24  # local noise in the clear is drawn on a 2^-24 grid


class AggregationSession(Protocol):
    """What every aggregator offers: one `step` per summed vector, and what it cost."""

    n_clients: int
    vector_length: int

    def step(self, inputs: Mapping[int, np.ndarray], *,
             drop_after_upload: Iterable[int] = ()) -> StepOutcome: ...

    @property
    def traffic(self) -> Traffic: ...

    def error_bound(self, n_summed: int) -> float: ...


class PlainSession:
    """The unprotected baseline: float32 vectors sent in the clear and added by the server.

    With `noise` (local DP in the clear) each client adds its noise before sending; the server
    then sees each noisy vector, which is all that mode promises.
    """

    def __init__(self, n_clients: int, vector_length: int, *,
                 noise: RingNoise | None = None) -> None:
        if n_clients < 2:
            raise ParameterError(f"aggregation needs at least 2 clients, got {n_clients}")
        if vector_length < 1:
            raise ParameterError(f"vector length must be positive, got {vector_length}")
        self.n_clients, self.vector_length, self.noise = n_clients, vector_length, noise
        self.protocol, self.threshold, self.degree = "plain", 1, n_clients - 1
        self.traffic = Traffic.zeros(n_clients)
        self.active = frozenset(range(n_clients))
        self._step = 0

    def error_bound(self, n_summed: int) -> float:
        """float32 transport: each value is rounded once, relative 2^-24 of its magnitude."""
        return 0.0

    def step(self, inputs: Mapping[int, np.ndarray], *,
             drop_after_upload: Iterable[int] = ()) -> StepOutcome:
        """Sum what arrived; a client that uploaded before dropping still counts."""
        self._step += 1
        unknown = set(inputs) - self.active
        if unknown:
            raise ParameterError(f"clients {sorted(unknown)} are not active in this session")
        members = sorted(inputs)
        if not members:
            raise TooFewSurvivorsError(needed=1, remaining=0, context=f"step {self._step}")
        sent = np.stack([_checked_row(c, inputs[c], self.vector_length) for c in members])
        if self.noise is not None:
            unit = np.float32(2.0**-PLAIN_NOISE_SCALE_BITS)
            for row in sent:  # each client's own noise; no ring here, so a fine fixed grid
                row += self.noise.sample(row.size, PLAIN_NOISE_SCALE_BITS).astype(np.float32) * unit
        for c in members:
            self.traffic.bytes_up[c] += 4 * self.vector_length
        start = time.perf_counter()
        total = sent.sum(axis=0, dtype=np.float64)
        self.traffic.server_seconds += time.perf_counter() - start
        dropped = frozenset(self.active - set(members))
        self.active = frozenset(members) - set(drop_after_upload)
        return StepOutcome(self._step, total, np.empty(0, np.uint32), frozenset(members), dropped)


def _checked_row(client: int, vector: np.ndarray, length: int) -> np.ndarray:
    row = np.asarray(vector, dtype=np.float32).reshape(-1)
    if row.size != length:
        raise ParameterError(f"client {client} sent {row.size} values, the session expects "
                             f"{length}")
    if not np.all(np.isfinite(row)):
        raise NonFiniteInputError(f"client {client}'s vector holds NaN or inf")
    return row


def open_session(protocol: str, n_clients: int, vector_length: int, *, clip: float,
                 ring_bits: int = 32, expected_dropout: float = 0.1,
                 rounding_seed: bytes | None = None, noise: RingNoise | None = None,
                 key_bits: int = 3072, keypair: object | None = None) -> AggregationSession:
    """A fresh session of `protocol` for `n_clients` vectors of `vector_length` values."""
    if protocol not in PROTOCOLS:
        raise ParameterError(f"unknown aggregator {protocol!r}; choose one of "
                             f"{', '.join(PROTOCOLS)}")
    if protocol == "plain":
        return PlainSession(n_clients, vector_length, noise=noise)
    if protocol == "paillier":
        from .paillier import PaillierSession  # phe is optional: import only when asked for

        return PaillierSession(n_clients, vector_length, clip=clip, key_bits=key_bits,
                               keypair=keypair, rounding_seed=rounding_seed, noise=noise)
    return SecAggSession(n_clients, vector_length, clip=clip, protocol=protocol,
                         ring_bits=ring_bits, expected_dropout=max(expected_dropout, 0.05),
                         rounding_seed=rounding_seed, noise=noise)
