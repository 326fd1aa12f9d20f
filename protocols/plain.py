"""The unprotected baseline aggregator: vectors sent in the clear and added by the server."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import ClassVar

import numpy as np

from .errors import ParameterError, TooFewSurvivorsError
from .inputs import check_count, check_step_inputs
from .plan import PLAIN_NOISE_SCALE_BITS, AggregationPlan
from .session import RingNoise, StepOutcome, Traffic
from .spec import AggregatorSpec, SessionOptions

__all__ = ["PlainSession", "PlainSpec"]


class PlainSession:
    """The unprotected baseline: float32 vectors sent in the clear and added by the server.

    With `noise` (local DP in the clear) each client puts its vector on a 2^-24 grid and adds its
    own noise before sending it as float64; the server then sees each noisy vector, which is all
    that mode promises.
    """

    def __init__(self, n_clients: int, vector_length: int, *,
                 noise: RingNoise | None = None) -> None:
        n_clients = check_count("aggregation's number of clients", n_clients, low=2)
        vector_length = check_count("vector_length", vector_length)
        self.n_clients, self.vector_length, self.noise = n_clients, vector_length, noise
        self.protocol, self.threshold, self.degree = PlainSpec.name, 1, n_clients - 1
        self.traffic = Traffic.zeros(n_clients)
        self.active = frozenset(range(n_clients))
        self._step = 0

    def error_bound(self, n_summed: int) -> float:
        """0: the server adds exactly the float32 vectors it received (no codec in between)."""
        return 0.0

    def close(self) -> None:
        """Nothing to release."""

    def step(self, inputs: Mapping[int, np.ndarray], *,
             drop_after_upload: Iterable[int] = ()) -> StepOutcome:
        """Sum what arrived; a client that uploaded before dropping still counts."""
        drop_after_upload = check_step_inputs(inputs, drop_after_upload, active=self.active,
                                              length=self.vector_length)
        self._step += 1
        members = sorted(inputs)
        if not members:
            raise TooFewSurvivorsError(needed=1, remaining=0, context=f"step {self._step}")
        with np.errstate(over="ignore"):  # refused just below
            sent = np.stack([np.asarray(inputs[c], dtype=np.float32).reshape(-1)
                             for c in members])
        if not np.isfinite(sent).all():  # finite, but past float32's range: inf on the wire
            raise ParameterError("an input holds values beyond float32's range (|x| > 3.4e38)")
        width = 4
        if self.noise is not None:
            sent, width = self._noised(sent), 8
        for c in members:
            self.traffic.bytes_up[c] += width * self.vector_length
        start = time.perf_counter()
        total = sent.sum(axis=0, dtype=np.float64)
        self.traffic.server_seconds += time.perf_counter() - start
        dropped = frozenset(self.active - set(members))
        self.active = frozenset(members) - set(drop_after_upload)
        return StepOutcome(self._step, total, np.empty(0, np.uint32), frozenset(members), dropped)

    def _noised(self, sent: np.ndarray) -> np.ndarray:
        """Each client rounds to the 2^-f grid, then adds its own integer noise (float64 out).

        Lattice noise on an off-lattice value would leak the value's fractional part, so the
        value is put on the noise's grid first.
        """
        assert self.noise is not None
        f = PLAIN_NOISE_SCALE_BITS
        units = np.rint(np.ldexp(sent.astype(np.float64), f))
        for row in units:
            row += self.noise.sample(row.size, f)
        return np.ldexp(units, -f)


class PlainSpec(AggregatorSpec):
    """"plain": the server sees every vector; under DP each carries the full noise (local DP)."""

    name: ClassVar[str] = "plain"
    masks_inputs: ClassVar[bool] = False
    fixed_point: ClassVar[bool] = False

    def plan(self, n_clients: int, *, threshold: int | None = None, degree: int | None = None,
             expected_dropout: float = 0.1, ring_bits: int = 32,
             private: bool = False) -> AggregationPlan:
        """Nothing to choose: every vector is seen alone, so a release may hold just one."""
        return AggregationPlan(self.name, n_clients, threshold=1, degree=n_clients - 1,
                               min_contributors=1, ring_bits=ring_bits,
                               fixed_point=self.fixed_point)

    def open(self, plan: AggregationPlan, vector_length: int, *, clip: float,
             noise: RingNoise | None, options: SessionOptions) -> PlainSession:
        return PlainSession(plan.n_clients, vector_length, noise=noise)
