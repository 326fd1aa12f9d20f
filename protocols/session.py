"""The vocabulary every aggregator shares and none owns: sessions, step outcomes, traffic, faults.

An aggregator (plain, SecAgg, SecAgg+, Paillier, or one registered later) opens a session that
follows `AggregationSession`; DP wraps any of them (protocols.dp.private).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, TypeVar

import numpy as np

from .errors import ParameterError

__all__ = [
    "AggregationSession", "Dropout", "FaultPlan", "RingNoise", "SecureSumResult", "Stage",
    "StepOutcome", "Traffic",
]


class Stage(str, Enum):
    """The points of a session at which a client can fail to answer."""

    ADVERTISE = "advertise"  # setup: the client never sends its keys
    UPLOAD = "upload"  # before sending its masked input
    PAIRWISE = "pairwise"  # after uploading, before revealing pair seeds
    CONSISTENCY = "consistency"  # before sending its consistency tokens (active model)
    SHARES = "shares"  # after uploading, before revealing self-mask shares


@dataclass(frozen=True)
class Dropout:
    """`client` goes silent at `stage` of `step` (step 0 is the key setup) and stays silent."""

    client: int
    step: int
    stage: Stage


@dataclass
class FaultPlan:
    """Everything that goes wrong in a simulated session."""

    dropouts: list[Dropout] = field(default_factory=list)
    # (step, client): the upload reaches the server after its deadline
    late: set[tuple[int, int]] = field(default_factory=set)
    # (step, client, stage): that reply is altered on the wire
    tamper: set[tuple[int, int, Stage]] = field(default_factory=set)

    @classmethod
    def random(cls, n_clients: int, *, rate: float, stage: Stage | str,
               steps: Iterable[int] = (1,), seed: int = 0) -> FaultPlan:
        """Each client drops with probability `rate` at `stage` of a uniformly chosen step."""
        if not 0.0 <= rate < 1.0:
            raise ParameterError(f"dropout rate must be in [0, 1), got {rate}")
        try:
            stage = Stage(stage)
        except ValueError:
            raise ParameterError(f"dropout stage must be one of "
                                 f"{', '.join(s.value for s in Stage)}, got {stage!r}") from None
        rng = random.Random(seed)  # simulation randomness, public by nature
        steps = list(steps)
        chosen = [c for c in range(n_clients) if rng.random() < rate]
        return cls([Dropout(c, rng.choice(steps), stage) for c in chosen])

    def silent_from(self) -> dict[int, tuple[int, int]]:
        order = list(Stage)
        return {d.client: (d.step, order.index(Stage(d.stage))) for d in self.dropouts}

    def first_step_arrivals(self) -> tuple[frozenset[int], frozenset[int]]:
        """(clients that never upload in step 1, clients that upload and then fall silent).

        A session without an in-process network to play the plan sums one step with these.
        """
        before = frozenset(d.client for d in self.dropouts if d.step == 0 or (
            d.step == 1 and Stage(d.stage) in (Stage.ADVERTISE, Stage.UPLOAD)))
        after = frozenset(d.client for d in self.dropouts if d.step == 1) - before
        return before, after


_TrafficT = TypeVar("_TrafficT", bound="Traffic")


@dataclass
class Traffic:
    """Per-client bytes and compute seconds, and the server's compute seconds."""

    bytes_up: np.ndarray
    bytes_down: np.ndarray
    client_seconds: np.ndarray
    server_seconds: float = 0.0

    @classmethod
    def zeros(cls: type[_TrafficT], n: int) -> _TrafficT:
        return cls(np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n), 0.0)


@dataclass(frozen=True, eq=False)
class StepOutcome:
    """The result of one aggregation step: the decoded sum and who is in it."""

    step: int
    total: np.ndarray
    ring_total: np.ndarray
    included: frozenset[int]
    dropped: frozenset[int]


class RingNoise(Protocol):
    """Integer noise a client adds to its encoding before it leaves (distributed DP).

    `headroom` bounds |noise| in value units; `sample` returns int64 fixed-point units with
    |sample| <= ceil(headroom * 2^scale_bits), so the session's overflow budget can hold it.
    """

    headroom: float

    def sample(self, length: int, scale_bits: int) -> np.ndarray: ...


class AggregationSession(Protocol):
    """What every aggregator offers: one `step` per summed vector, and what it cost."""

    n_clients: int
    vector_length: int

    @property
    def threshold(self) -> int: ...

    @property
    def degree(self) -> int: ...

    @property
    def active(self) -> frozenset[int]: ...

    def step(self, inputs: Mapping[int, np.ndarray], *,
             drop_after_upload: Iterable[int] = ()) -> StepOutcome: ...

    @property
    def traffic(self) -> Traffic: ...

    def error_bound(self, n_summed: int) -> float: ...

    def close(self) -> None: ...


@dataclass(frozen=True, eq=False)
class SecureSumResult:
    """A sum and what it cost: who is in it, bytes per client, seconds per party."""

    total: np.ndarray
    included: tuple[int, ...]
    dropped: tuple[int, ...]
    bytes_up: np.ndarray
    bytes_down: np.ndarray
    client_seconds: np.ndarray
    server_seconds: float
    error_bound: float
    protocol: str
    threshold: int
    degree: int
    weight_sum: float | None = None

    @property
    def weighted_mean(self) -> np.ndarray:
        """sum_k w_k x_k / sum_k w_k over the included clients (weighted sums only)."""
        if self.weight_sum is None:
            raise ParameterError("weighted_mean needs a secure_sum called with weights=")
        if self.weight_sum <= 0:
            raise ParameterError("the included clients' weights sum to zero")
        return self.total / self.weight_sum
