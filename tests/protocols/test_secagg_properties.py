"""End-to-end properties: the exact sum of the survivors' quantised inputs, or a clear refusal."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.errors import ConsistencyAbortError, TooFewSurvivorsError
from protocols.graph import complete_graph, harary_graph
from protocols.session import Dropout, FaultPlan, Stage

from .conftest import make_session

STAGES = [Stage.UPLOAD, Stage.PAIRWISE, Stage.CONSISTENCY, Stage.SHARES]


@st.composite
def scenarios(draw):
    n = draw(st.integers(2, 60))
    m = draw(st.integers(1, 24))
    steps = draw(st.integers(1, 3))
    sparse = n >= 5 and draw(st.booleans())
    if sparse:
        degree = draw(st.integers(1, (n - 2) // 2)) * 2
        graph = harary_graph(n, degree, seed=bytes(draw(st.binary(min_size=32, max_size=32))))
    else:
        degree, graph = n - 1, complete_graph(n)
    threshold = draw(st.integers(1, degree))
    rate = draw(st.sampled_from([0.0, 0.05, 0.2, 0.5]))
    dropouts = []
    for client in range(n):
        if draw(st.floats(0, 1)) < rate:
            if draw(st.integers(0, 9)) == 0:
                dropouts.append(Dropout(client, 0, Stage.ADVERTISE))
            else:
                dropouts.append(Dropout(client, draw(st.integers(1, steps)),
                                        draw(st.sampled_from(STAGES))))
    threat_model = draw(st.sampled_from(["active", "semi-honest"]))
    return n, m, steps, graph, threshold, dropouts, draw(st.integers(0, 2**31)), threat_model


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_step_is_the_exact_survivor_sum_or_too_few(scenario):
    n, m, steps, graph, threshold, dropouts, seed, threat_model = scenario
    faults = FaultPlan(dropouts=dropouts)
    server, _, network, inputs, codec = make_session(
        n, m, threshold=threshold, steps=steps, seed=seed, graph=graph, faults=faults,
        threat_model=threat_model)
    silent = {d.client: (d.step, d.stage) for d in dropouts}
    try:
        network.setup()
        for step in range(1, steps + 1):
            outcome = network.step()
            uploaded = {c for c in range(n)
                        if c not in silent or silent[c][0] > step
                        or (silent[c][0] == step and silent[c][1] is not Stage.UPLOAD)}
            assert outcome.included <= uploaded
            assert outcome.included.isdisjoint(outcome.dropped)
            assert len(outcome.included) >= threshold
            expected = np.zeros(m, dtype=codec.dtype)
            for c in sorted(outcome.included):
                expected = codec.add(expected, codec.encode(inputs.values[step, c]))
            np.testing.assert_array_equal(outcome.ring_total, expected)
            clipped = inputs.values[step, sorted(outcome.included)].astype(np.float64).sum(0)
            bound = codec.error_bound(len(outcome.included))
            assert np.max(np.abs(outcome.total - clipped)) <= bound
            if graph.is_complete:
                # on the complete graph nobody alive through the whole step is ever left out
                whole = {c for c in uploaded if c not in silent or silent[c][0] > step}
                assert whole <= outcome.included
    except TooFewSurvivorsError as error:
        assert error.needed == threshold
        assert error.remaining < error.needed or "live share holders" in str(error)
    except ConsistencyAbortError as error:
        # only the active model has the round, and only an uploaded client that fell silent
        # before it (and was not asked for pair seeds first) can stall it
        assert threat_model == "active"
        assert error.silent and all(
            silent.get(c, (0, None))[0] == error.step
            and silent[c][1] in (Stage.PAIRWISE, Stage.CONSISTENCY) for c in error.silent)


def test_no_dropouts_complete_graph_sum_matches_float_sum():
    server, _, network, inputs, codec = make_session(6, 100, threshold=4, steps=2,
                                                     rounding="stochastic")
    network.setup()
    for step in (1, 2):
        outcome = network.step()
        assert outcome.included == frozenset(range(6))
        exact = inputs.values[step].astype(np.float64).sum(0)
        assert np.max(np.abs(outcome.total - exact)) <= codec.error_bound(6)


def test_dropout_after_upload_is_still_counted():
    # semi-honest: with no consistency round, a client silent after its upload still counts
    faults = FaultPlan(dropouts=[Dropout(2, 1, Stage.SHARES), Dropout(4, 1, Stage.PAIRWISE)])
    server, _, network, inputs, codec = make_session(6, 32, threshold=3, faults=faults,
                                                     threat_model="semi-honest")
    network.setup()
    outcome = network.step()
    # 2 uploaded and then fell silent: its self-mask comes back from the others' shares
    assert 2 in outcome.included
    # 4 was never asked for pair seeds (nobody dropped before upload), so it counts too
    assert 4 in outcome.included


def test_silent_survivor_during_pair_recovery_becomes_a_dropout():
    faults = FaultPlan(dropouts=[Dropout(0, 1, Stage.UPLOAD), Dropout(3, 1, Stage.PAIRWISE)])
    server, _, network, inputs, codec = make_session(7, 16, threshold=3, faults=faults)
    network.setup()
    outcome = network.step()
    assert outcome.dropped == {0, 3}
    expected = inputs.values[1, [1, 2, 4, 5, 6]].astype(np.float64).sum(0)
    assert np.max(np.abs(outcome.total - expected)) <= codec.error_bound(5)


def test_too_few_survivors_names_the_numbers():
    faults = FaultPlan(dropouts=[Dropout(c, 1, Stage.UPLOAD) for c in range(3)])
    _, _, network, _, _ = make_session(5, 8, threshold=3, faults=faults)
    network.setup()
    try:
        network.step()
    except TooFewSurvivorsError as error:
        assert (error.needed, error.remaining) == (3, 2)
        assert "needs 3" in str(error) and "only 2 remain" in str(error)
    else:
        raise AssertionError("two survivors of five with t = 3 must be refused")
