"""Dropouts at every stage, setup included: the exact sum of who stayed, or TooFewSurvivorsError.

Each generated federation prints as one readable line when hypothesis shrinks a failure: the
clients, graph, threshold, clip, dtype, the fault plan, and per call who is left out of `inputs`
or leaves after uploading.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocols import SecAggSession, secure_sum
from protocols.errors import TooFewSurvivorsError
from protocols.session import Dropout, FaultPlan, Stage

from .dropouts import (
    DTYPES,
    ORDER,
    Call,
    clipped_sum,
    describe,
    draw_calls,
    draw_dropouts,
    seeded_inputs,
    silent_points,
)


@dataclass(frozen=True)
class Federation:
    n: int
    m: int
    degree: int | None  # None: the complete graph
    threshold: int
    clip: float
    dtype: str
    threat_model: str
    dropouts: tuple[Dropout, ...]
    calls: tuple[Call, ...]
    seed: int

    def __repr__(self) -> str:
        graph = "complete" if self.degree is None else f"harary(k={self.degree})"
        return (f"Federation(n={self.n}, m={self.m}, {graph}, t={self.threshold}, "
                f"clip={self.clip:g}, {self.dtype}, {self.threat_model}, "
                f"dropouts=[{describe(self.dropouts)}], "
                f"calls={list(self.calls)}, seed={self.seed})")

    @property
    def complete(self) -> bool:
        return self.degree is None

    def silent_at(self) -> dict[int, tuple[int, int]]:
        """client -> (step id, stage index) of its earliest planned dropout."""
        return silent_points(self.dropouts)

    def inputs(self, call: int) -> np.ndarray:
        return seeded_inputs(self.seed, call, (self.n, self.m), self.clip, self.dtype)


@st.composite
def federations(draw, *, max_calls: int = 3, last_step: int = 4) -> Federation:
    n = draw(st.integers(3, 30))
    sparse = n >= 5 and draw(st.booleans())
    degree = draw(st.integers(1, (n - 2) // 2)) * 2 if sparse else None
    holders = n - 1 if degree is None else degree
    # half the federations at about half their holders, so that most calls can sum
    threshold = draw(st.one_of(st.integers(1, max(1, holders // 2)), st.integers(1, holders)))
    rate = draw(st.sampled_from([0.0, 0.1, 0.2, 0.4]))
    dropouts = draw_dropouts(draw, n, rate, last_step)
    calls = draw_calls(draw, n, max_calls)
    return Federation(
        n=n, m=draw(st.integers(1, 6)), degree=degree, threshold=threshold,
        clip=draw(st.sampled_from([0.01, 0.5, 1.0, 3.7, 100.0])),
        dtype=draw(st.sampled_from(DTYPES)),
        threat_model=draw(st.sampled_from(["active", "active", "semi-honest"])),
        dropouts=tuple(dropouts), calls=calls, seed=draw(st.integers(0, 2**32 - 1)))


def _open(fed: Federation) -> SecAggSession:
    return SecAggSession(fed.n, fed.m, clip=fed.clip,
                         protocol="secagg" if fed.complete else "secagg+",
                         degree=fed.degree, threshold=fed.threshold,
                         threat_model=fed.threat_model, faults=FaultPlan(list(fed.dropouts)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(federations())
def test_each_call_sums_exactly_who_stayed_or_raises_too_few(fed):
    silent_at = fed.silent_at()
    for stage in sorted({d.stage.value for d in fed.dropouts}):
        event(f"planned: a dropout at {stage}")
    try:
        session = _open(fed)
    except TooFewSurvivorsError:
        event("outcome: too few after the key setup")
        return  # too few finished the key setup: the only other way out
    gone: set[int] = set()  # left out of `inputs` or left after uploading at an earlier call
    for index, call in enumerate(fed.calls):
        values = fed.inputs(index)
        active = session.active
        first = session.server.last_step + 1
        try:
            outcome = session.step({c: values[c] for c in range(fed.n) if c not in call.absent},
                                   drop_after_upload=call.leaving)
        except TooFewSurvivorsError as error:
            assert error.needed == fed.threshold
            event("outcome: a call raised too few")
            gone |= call.absent | call.leaving
            continue
        step = outcome.step
        event("outcome: a call summed" + (" after a retry" if step > first else ""))

        def silent_by(c: int, stage: Stage, step: int = step) -> bool:
            return c in silent_at and silent_at[c] <= (step, ORDER[stage])

        # nobody is in the sum unless its upload reached the server at the step that counted
        uploaded = {c for c in active if c not in gone and c not in call.absent
                    and not silent_by(c, Stage.UPLOAD)}
        assert outcome.included <= uploaded
        assert outcome.included | outcome.dropped == active
        assert not outcome.included & outcome.dropped
        assert len(outcome.included) >= fed.threshold
        bound = session.error_bound(len(outcome.included))
        exact = clipped_sum(values, outcome.included, fed.clip)
        assert np.abs(outcome.total - exact).max() <= bound
        if fed.complete:  # nobody alive through the whole call is ever left out
            stayed = {c for c in range(fed.n) if c not in gone | call.absent | call.leaving
                      and not silent_by(c, Stage.ADVERTISE, step + 1)}
            assert stayed <= outcome.included
        gone |= call.absent | call.leaving


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(federations(max_calls=0, last_step=1))
def test_secure_sum_is_the_exact_sum_of_who_stayed_or_too_few(fed):
    values = fed.inputs(0)
    try:
        result = secure_sum(values, protocol="secagg" if fed.complete else "secagg+",
                            clip=fed.clip, degree=fed.degree, threshold=fed.threshold,
                            threat_model=fed.threat_model, dropouts=fed.dropouts)
    except TooFewSurvivorsError as error:
        assert error.needed == fed.threshold
        event("outcome: too few")
        return
    event("outcome: summed")
    silent_at = fed.silent_at()
    included = set(result.included)
    assert not included & {c for c, point in silent_at.items()
                           if point <= (1, ORDER[Stage.UPLOAD])}
    assert sorted(included | set(result.dropped)) == list(range(fed.n))
    assert len(included) >= fed.threshold
    exact = clipped_sum(values, included, fed.clip)
    assert np.abs(result.total - exact).max() <= result.error_bound
    if fed.complete:  # dropouts are planned at steps 0 and 1 only, so a retry meets none
        assert set(range(fed.n)) - set(silent_at) <= included
