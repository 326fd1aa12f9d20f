"""The vocabulary every aggregator shares and none owns: sessions, step outcomes, traffic, faults.

An aggregator (plain, SecAgg, SecAgg+, Paillier, or one registered later) opens a session that
follows `AggregationSession`; DP wraps any of them (protocols.dp.private).
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, TypeVar

import numpy as np

from .errors import ParameterError

__all__ = [
    "SETUP_STAGES", "AggregationSession", "Dropout", "FaultPlan", "RingNoise", "SecureSumResult",
    "Stage", "StepOutcome", "Traffic", "stage_index",
]


class Stage(str, Enum):
    """The points of a session at which a client can fail to answer, in the order they come."""

    ADVERTISE = "advertise"  # setup (step 0): the client never sends its keys
    ROSTER = "roster"  # setup (step 0): it sent its key, then misses its neighbours' keys
    UPLOAD = "upload"  # before sending its masked input
    PAIRWISE = "pairwise"  # after uploading, before revealing pair seeds
    CONSISTENCY = "consistency"  # before sending its consistency tokens (active model)
    SHARES = "shares"  # after uploading, before revealing self-mask shares


SETUP_STAGES = (Stage.ADVERTISE, Stage.ROSTER)  # the stages of step 0, and only of step 0
_ORDER = {stage: index for index, stage in enumerate(Stage)}


def stage_index(stage: Stage) -> int:
    """The position of `stage` in a session's time order (ADVERTISE is 0, SHARES last)."""
    return _ORDER[stage]


def _as_stage(value: object, field_name: str) -> Stage:
    try:
        return Stage(value)
    except ValueError:
        raise ParameterError(f"{field_name} must be one of "
                             f"{', '.join(s.value for s in Stage)}, got {value!r}") from None


def _as_index(value: object, field_name: str, *, low: int = 0) -> int:
    """An int (numpy's too, not a bool) of at least `low`, or a ParameterError naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ParameterError(f"{field_name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_step_stage(step: int, stage: Stage, what: str) -> None:
    if (step == 0) != (stage in SETUP_STAGES):
        raise ParameterError(
            f"{what}: step 0 is the key setup, whose stages are advertise and roster; "
            f"steps >= 1 have the others (got step {step}, stage {stage.value!r})")


@dataclass(frozen=True)
class Dropout:
    """`client` goes silent at `stage` of `step` (step 0 is the key setup) and stays silent.

    A malformed one (a client or step that is not an int >= 0, an unknown stage, a setup stage
    at a later step or the reverse) is refused when it is built.
    """

    client: int
    step: int
    stage: Stage

    def __post_init__(self) -> None:
        object.__setattr__(self, "client", _as_index(self.client, "Dropout.client"))
        object.__setattr__(self, "step", _as_index(self.step, "Dropout.step"))
        object.__setattr__(self, "stage", _as_stage(self.stage, "Dropout.stage"))
        _check_step_stage(self.step, self.stage, "Dropout")

    @property
    def point(self) -> tuple[int, int]:
        """(step, stage index): the moment the client falls silent, ordered in time."""
        return self.step, _ORDER[self.stage]


@dataclass
class FaultPlan:
    """Everything that goes wrong in a simulated session.

    A client named by several dropouts falls silent at the earliest of them; a silent client
    never comes back. `check` refuses an entry that could not happen in a session of n clients.
    """

    dropouts: list[Dropout] = field(default_factory=list)
    # (step, client): the upload reaches the server after its deadline
    late: set[tuple[int, int]] = field(default_factory=set)
    # (step, client, stage): that reply is altered on the wire
    tamper: set[tuple[int, int, Stage]] = field(default_factory=set)

    @classmethod
    def random(cls, n_clients: int, *, rate: float, stage: Stage | str,
               steps: Iterable[int] | None = None, seed: int = 0) -> FaultPlan:
        """Each client drops with probability `rate` at `stage` of a uniformly chosen step.

        `steps` defaults to the key setup (0) for a setup stage and to step 1 otherwise.
        """
        if not 0.0 <= rate < 1.0:
            raise ParameterError(f"dropout rate must be in [0, 1), got {rate}")
        stage = _as_stage(stage, "dropout stage")
        chosen_steps = list(steps if steps is not None else
                            (0,) if stage in SETUP_STAGES else (1,))
        rng = random.Random(seed)  # simulation randomness, public by nature
        chosen = [c for c in range(n_clients) if rng.random() < rate]
        return cls([Dropout(c, rng.choice(chosen_steps), stage) for c in chosen])

    @classmethod
    def for_clients(cls, n_clients: int, dropouts: Iterable[Dropout] = (), *, rate: float = 0.0,
                    stage: Stage | str = Stage.SHARES, seed: int = 0) -> FaultPlan:
        """`random` dropouts at `rate`, then the named `dropouts`, checked against n clients.

        What a one-call sum plays; raises ParameterError naming the first entry's bad field.
        """
        plan = cls.random(n_clients, rate=rate, stage=stage, seed=seed)
        plan.dropouts.extend(dropouts)
        return plan.check(n_clients)

    def check(self, n_clients: int) -> FaultPlan:
        """This plan with every entry checked against n clients and tamper stages as `Stage`.

        Raises ParameterError naming the field of the first entry that could not happen.
        """
        for dropout in self.dropouts:
            if not isinstance(dropout, Dropout):
                raise ParameterError(f"FaultPlan.dropouts holds {dropout!r}, not a Dropout")
            _check_client(dropout.client, n_clients, "Dropout.client")
        late: set[tuple[int, int]] = set()
        for pair in self.late:
            step, client = _entry(pair, 2, "FaultPlan.late", "(step, client)")
            late.add((_as_index(step, "FaultPlan.late step", low=1),
                      _check_client(client, n_clients, "FaultPlan.late client")))
        tamper: set[tuple[int, int, Stage]] = set()
        for triple in self.tamper:
            raw_step, client, raw_stage = _entry(triple, 3, "FaultPlan.tamper",
                                                 "(step, client, stage)")
            step = _as_index(raw_step, "FaultPlan.tamper step")
            stage = _as_stage(raw_stage, "FaultPlan.tamper stage")
            _check_step_stage(step, stage, "FaultPlan.tamper")
            if stage is Stage.ROSTER:
                raise ParameterError("FaultPlan.tamper: a roster has no reply to tamper with")
            tamper.add((step, _check_client(client, n_clients, "FaultPlan.tamper client"),
                        stage))
        return FaultPlan(list(self.dropouts), late, tamper)

    def silent_from(self) -> dict[int, tuple[int, int]]:
        """client -> (step, stage index) of its earliest dropout."""
        points: dict[int, tuple[int, int]] = {}
        for d in self.dropouts:
            points[d.client] = min(points.get(d.client, d.point), d.point)
        return points

    def first_step_arrivals(self) -> tuple[frozenset[int], frozenset[int]]:
        """(clients that never upload in step 1, clients that upload and then fall silent).

        A session without an in-process network to play the plan sums one step with these.
        """
        upload = (1, _ORDER[Stage.UPLOAD])
        points = self.silent_from()
        before = frozenset(c for c, point in points.items() if point <= upload)
        after = frozenset(c for c, (step, _) in points.items() if step == 1) - before
        return before, after


def _check_client(client: object, n_clients: int, field_name: str) -> int:
    index = _as_index(client, field_name)
    if index >= n_clients:
        raise ParameterError(f"{field_name} must be a client id below {n_clients}, got {index}")
    return index


def _entry(entry: object, size: int, field_name: str, shape: str) -> tuple[object, ...]:
    if not isinstance(entry, tuple) or len(entry) != size:
        raise ParameterError(f"{field_name} entries must be {shape} tuples, got {entry!r}")
    return entry


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
