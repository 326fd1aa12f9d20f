"""Paillier dropouts at every stage, setup included: the exact sum of who uploaded, or too few.

The Paillier path has fewer stages than pairwise masks. At setup a client sends one message,
its key (`advertise`); `roster` means it sent it and then fell silent. At each step it sends
one upload (`upload`); `pairwise`, `consistency` and `shares` all fall after it, so the client
is in that step's sum. A client the fault plan silences never comes back; one merely left out
of a call's `inputs` may send at the next. Each generated federation prints as one line when
hypothesis shrinks a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocols.errors import TooFewSurvivorsError
from protocols.paillier.session import PaillierSession, paillier_sum
from protocols.session import Dropout, FaultPlan, Stage

from .conftest import known_answer_keypair
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

KEYPAIR = known_answer_keypair()


@dataclass(frozen=True)
class Federation:
    n: int
    m: int
    quorum: int
    clip: float
    dtype: str
    dropouts: tuple[Dropout, ...]
    late: frozenset[tuple[int, int]]  # (step, client)
    tamper: frozenset[tuple[int, int, Stage]]  # (step, client, advertise or upload)
    calls: tuple[Call, ...]
    seed: int

    def __repr__(self) -> str:
        tamper = sorted((s, c, g.value) for s, c, g in self.tamper)
        return (f"Federation(n={self.n}, m={self.m}, quorum={self.quorum}, clip={self.clip:g}, "
                f"{self.dtype}, dropouts=[{describe(self.dropouts)}], late={sorted(self.late)}, "
                f"tamper={tamper}, calls={list(self.calls)}, seed={self.seed})")

    def plan(self) -> FaultPlan:
        return FaultPlan(list(self.dropouts), set(self.late), set(self.tamper))

    def after_setup(self) -> set[int]:
        """Who sent its key, had it arrive, and is still there when step 1 begins."""
        silent_at = silent_points(self.dropouts)
        return {c for c in range(self.n) if silent_at.get(c, (1, 0)) > (0, ORDER[Stage.ROSTER])
                and (0, c, Stage.ADVERTISE) not in self.tamper}

    def uploads_arrive(self, step: int, clients: set[int]) -> set[int]:
        """Those of `clients` whose upload at `step` is sent and reaches the server in time."""
        silent_at = silent_points(self.dropouts)
        return {c for c in clients if silent_at.get(c, (step + 1, 0)) > (step, ORDER[Stage.UPLOAD])
                and (step, c) not in self.late and (step, c, Stage.UPLOAD) not in self.tamper}

    def inputs(self, call: int) -> np.ndarray:
        return seeded_inputs(self.seed, call, (self.n, self.m), self.clip, self.dtype)


@st.composite
def federations(draw, *, max_calls: int = 3, last_step: int = 4,
                wire_faults: bool = True) -> Federation:
    n = draw(st.integers(2, 20))
    # half the federations at about half their clients, so that most calls can sum
    quorum = draw(st.one_of(st.integers(1, max(1, n // 2)), st.integers(1, n)))
    rate = draw(st.sampled_from([0.0, 0.1, 0.2, 0.4]))
    dropouts, late, tamper = draw_dropouts(draw, n, rate, last_step), set(), set()
    for client in range(n):
        if wire_faults and draw(st.floats(0, 1)) < rate / 2:
            step = draw(st.integers(0, last_step))
            if step and draw(st.booleans()):
                late.add((step, client))
            else:
                tamper.add((step, client, Stage.UPLOAD if step else Stage.ADVERTISE))
    return Federation(
        n=n, m=draw(st.integers(1, 6)), quorum=quorum,
        clip=draw(st.sampled_from([0.01, 0.5, 1.0, 3.7, 100.0])),
        dtype=draw(st.sampled_from(DTYPES)), dropouts=tuple(dropouts), late=frozenset(late),
        tamper=frozenset(tamper), calls=draw_calls(draw, n, max_calls),
        seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(federations())
def test_each_call_sums_exactly_who_uploaded_or_raises_too_few(fed):
    for stage in sorted({d.stage.value for d in fed.dropouts}):
        event(f"planned: a dropout at {stage}")
    for fault, planned in (("a late upload", fed.late), ("tampering", fed.tamper)):
        if planned:
            event(f"planned: {fault}")
    active = fed.after_setup()
    try:
        session = PaillierSession(fed.n, fed.m, clip=fed.clip, keypair=KEYPAIR, workers=1,
                                  unsafe_small_keys=True, quorum=fed.quorum, faults=fed.plan())
    except TooFewSurvivorsError as error:
        assert error.needed == fed.quorum and len(active) < fed.quorum
        event("outcome: too few after the key setup")
        return
    assert len(active) >= fed.quorum
    silent_at = silent_points(fed.dropouts)
    for index, call in enumerate(fed.calls):
        step = index + 1  # every call is one step, summed or not
        assert session.active == active
        values = fed.inputs(index)
        included = fed.uploads_arrive(step, active - call.absent)
        try:
            outcome = session.step({c: values[c] for c in range(fed.n) if c not in call.absent},
                                   drop_after_upload=call.leaving)
        except TooFewSurvivorsError as error:
            assert error.needed == fed.quorum and len(included) < fed.quorum
            event("outcome: a call raised too few")
        else:
            event("outcome: a call summed")
            assert outcome.step == step and outcome.included == included
            assert outcome.dropped == active - included and len(included) >= fed.quorum
            bound = session.error_bound(len(included))
            assert np.abs(outcome.total - clipped_sum(values, included, fed.clip)).max() <= bound
        # silenced during this step: gone for good; left out or leaving: back next step
        active = {c for c in active if silent_at.get(c, (step + 1, 0)) >= (step + 1, 0)}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(federations(max_calls=0, last_step=1, wire_faults=False))
def test_paillier_sum_is_the_exact_sum_of_who_uploaded_or_too_few(fed):
    values = fed.inputs(0)
    expected = fed.uploads_arrive(1, fed.after_setup())
    try:
        result = paillier_sum(values, clip=fed.clip, keypair=KEYPAIR, workers=1,
                              unsafe_small_keys=True, quorum=fed.quorum, dropouts=fed.dropouts)
    except TooFewSurvivorsError as error:
        assert error.needed == fed.quorum and len(expected) < fed.quorum
        event("outcome: too few")
        return
    event("outcome: summed")
    assert set(result.included) == expected and len(expected) >= fed.quorum
    assert result.dropped == tuple(c for c in range(fed.n) if c not in expected)
    exact = clipped_sum(values, expected, fed.clip)
    assert np.abs(result.total - exact).max() <= result.error_bound
