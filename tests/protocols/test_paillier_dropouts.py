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
from protocols.session import SETUP_STAGES, Dropout, FaultPlan, Stage

from .conftest import known_answer_keypair

KEYPAIR = known_answer_keypair()
STEP_STAGES = [s for s in Stage if s not in SETUP_STAGES]
_ORDER = {stage: index for index, stage in enumerate(Stage)}
SETUP, UPLOAD = (0, _ORDER[Stage.ADVERTISE]), _ORDER[Stage.UPLOAD]


@dataclass(frozen=True)
class Call:
    """One `step` call: clients left out of `inputs`, and clients that leave after uploading."""

    absent: frozenset[int]
    leaving: frozenset[int]

    def __repr__(self) -> str:
        return f"Call(absent={sorted(self.absent)}, leaving={sorted(self.leaving)})"


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
        drops = ", ".join(f"{d.client}@{d.step}:{d.stage.value}" for d in self.dropouts)
        tamper = sorted((s, c, g.value) for s, c, g in self.tamper)
        return (f"Federation(n={self.n}, m={self.m}, quorum={self.quorum}, clip={self.clip:g}, "
                f"{self.dtype}, dropouts=[{drops}], late={sorted(self.late)}, tamper={tamper}, "
                f"calls={list(self.calls)}, seed={self.seed})")

    def plan(self) -> FaultPlan:
        return FaultPlan(list(self.dropouts), set(self.late), set(self.tamper))

    def silent_at(self) -> dict[int, tuple[int, int]]:
        """client -> (step, stage index) of its earliest planned dropout (worked out here, not
        by the code under test)."""
        points: dict[int, tuple[int, int]] = {}
        for d in self.dropouts:
            point = (d.step, _ORDER[d.stage])
            points[d.client] = min(points.get(d.client, point), point)
        return points

    def after_setup(self) -> set[int]:
        """Who sent its key, had it arrive, and is still there when step 1 begins."""
        silent_at = self.silent_at()
        return {c for c in range(self.n) if silent_at.get(c, (1, 0)) > (0, _ORDER[Stage.ROSTER])
                and (0, c, Stage.ADVERTISE) not in self.tamper}

    def uploads_arrive(self, step: int, clients: set[int]) -> set[int]:
        """Those of `clients` whose upload at `step` is sent and reaches the server in time."""
        silent_at = self.silent_at()
        return {c for c in clients if silent_at.get(c, (step + 1, 0)) > (step, UPLOAD)
                and (step, c) not in self.late and (step, c, Stage.UPLOAD) not in self.tamper}

    def inputs(self, call: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, call])
        # twice the clip: clipping is part of what is checked
        return rng.uniform(-2 * self.clip, 2 * self.clip, (self.n, self.m)).astype(self.dtype)


def _dropout(draw, client: int, last_step: int) -> Dropout:
    step = draw(st.integers(0, last_step))
    stages = list(SETUP_STAGES) if step == 0 else STEP_STAGES
    return Dropout(client, step, draw(st.sampled_from(stages)))


@st.composite
def federations(draw, *, max_calls: int = 3, last_step: int = 4,
                wire_faults: bool = True) -> Federation:
    n = draw(st.integers(2, 20))
    # half the federations at about half their clients, so that most calls can sum
    quorum = draw(st.one_of(st.integers(1, max(1, n // 2)), st.integers(1, n)))
    rate = draw(st.sampled_from([0.0, 0.1, 0.2, 0.4]))
    dropouts, late, tamper = [], set(), set()
    for client in range(n):
        if draw(st.floats(0, 1)) < rate:
            dropouts.append(_dropout(draw, client, last_step))
            if draw(st.integers(0, 4)) == 0:  # named twice: the earliest must win
                dropouts.append(_dropout(draw, client, last_step))
        if wire_faults and draw(st.floats(0, 1)) < rate / 2:
            step = draw(st.integers(0, last_step))
            if step and draw(st.booleans()):
                late.add((step, client))
            else:
                tamper.add((step, client, Stage.UPLOAD if step else Stage.ADVERTISE))
    calls = []
    for _ in range(draw(st.integers(min(1, max_calls), max_calls))):
        absent = draw(st.sets(st.integers(0, n - 1), max_size=2))
        leaving = draw(st.sets(st.integers(0, n - 1), max_size=2)) - absent
        calls.append(Call(frozenset(absent), frozenset(leaving)))
    return Federation(
        n=n, m=draw(st.integers(1, 6)), quorum=quorum,
        clip=draw(st.sampled_from([0.01, 0.5, 1.0, 3.7, 100.0])),
        dtype=draw(st.sampled_from(["float16", "float32", "float64"])),
        dropouts=tuple(dropouts), late=frozenset(late), tamper=frozenset(tamper),
        calls=tuple(calls), seed=draw(st.integers(0, 2**32 - 1)))


def _clipped_sum(fed: Federation, values: np.ndarray, clients) -> np.ndarray:
    rows = values[sorted(clients)].astype(np.float64)
    return np.clip(rows, -fed.clip, fed.clip).sum(axis=0)


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
    silent_at = fed.silent_at()
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
            assert np.abs(outcome.total - _clipped_sum(fed, values, included)).max() <= bound
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
    exact = _clipped_sum(fed, values.astype(np.float64), expected)
    assert np.abs(result.total - exact).max() <= result.error_bound
