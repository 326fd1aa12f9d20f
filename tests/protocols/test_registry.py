"""One session interface over every aggregator, and the plain baseline session."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from protocols.api import secure_sum
from protocols.dp.mechanisms import DPSpec
from protocols.errors import NonFiniteInputError, ParameterError, TooFewSurvivorsError
from protocols.plain import PlainSession
from protocols.plan import AggregationPlan
from protocols.registry import get, names, open_session, register, unregister
from protocols.session import Dropout, FaultPlan, Stage
from protocols.spec import AggregatorSpec


@pytest.mark.parametrize("protocol", ["plain", "secagg", "secagg+", "paillier"])
def test_every_aggregator_sums_the_clients_that_made_it(protocol):
    rng = np.random.default_rng(0)
    vectors = rng.uniform(-1, 1, size=(6, 40)).astype(np.float32)
    session = open_session(protocol, 6, 40, clip=1.0, key_bits=2048)
    outcome = session.step({c: vectors[c] for c in (0, 1, 2, 4, 5)}, drop_after_upload=[4])
    assert outcome.included == frozenset({0, 1, 2, 4, 5}) and 3 in outcome.dropped
    exact = vectors[[0, 1, 2, 4, 5]].astype(np.float64).sum(0)
    np.testing.assert_allclose(outcome.total, exact, atol=session.error_bound(5) + 1e-6)
    up = session.traffic.bytes_up  # client 3 never uploaded (at most its key setup)
    assert up[0] - up[3] >= 4 * 40
    following = session.step({c: vectors[c] for c in (0, 1, 2, 5)})
    assert following.included == frozenset({0, 1, 2, 5})


def test_unknown_aggregator_is_named():
    with pytest.raises(ParameterError, match="unknown aggregator 'rot13'"):
        open_session("rot13", 3, 4, clip=1.0)


def test_plain_session_refuses_bad_vectors_and_strangers():
    session = PlainSession(3, 4)
    with pytest.raises(NonFiniteInputError, match="client 1"):
        session.step({0: np.zeros(4), 1: np.array([0, np.nan, 0, 0])})
    with pytest.raises(ParameterError, match="client 0's vector has 3 values"):
        session.step({0: np.zeros(3)})
    with pytest.raises(ParameterError, match=r"clients \[7\]"):
        session.step({7: np.zeros(4)})
    with pytest.raises(TooFewSurvivorsError):
        session.step({})


def test_plain_session_adds_each_clients_own_noise():
    class Ones:
        headroom = 1.0

        def sample(self, length, scale_bits):
            return np.full(length, 2**scale_bits, dtype=np.int64)

    session = PlainSession(3, 4, noise=Ones())
    outcome = session.step({c: np.zeros(4) for c in range(3)})
    np.testing.assert_array_equal(outcome.total, np.full(4, 3.0))


class ShiftedPlainSpec(AggregatorSpec):
    """A fifth aggregator for the test: each client sends x + 1, the server subtracts one per
    client it summed (no protection at all; it only shows what a registration takes)."""

    name = "toy-shifted-plain"
    masks_inputs = False
    fixed_point = False

    def plan(self, n_clients, *, threshold=None, degree=None, expected_dropout=0.1,
             ring_bits=32, private=False):
        return AggregationPlan(self.name, n_clients, threshold=1, degree=n_clients - 1,
                               min_contributors=1, ring_bits=ring_bits, fixed_point=False)

    def open(self, plan, vector_length, *, clip, noise, options):
        return ShiftedPlainSession(plan.n_clients, vector_length)


class ShiftedPlainSession(PlainSession):
    def step(self, inputs, *, drop_after_upload=()):
        shifted = {c: np.asarray(v, dtype=np.float64) + 1.0 for c, v in inputs.items()}
        outcome = super().step(shifted, drop_after_upload=drop_after_upload)
        return dataclasses.replace(outcome, total=outcome.total - len(outcome.included))


@pytest.fixture
def toy_aggregator():
    register(ShiftedPlainSpec())
    yield ShiftedPlainSpec.name
    unregister(ShiftedPlainSpec.name)


def test_a_registered_fifth_aggregator_runs_through_secure_sum_and_open_session(toy_aggregator):
    assert toy_aggregator in names()
    vectors = np.arange(12, dtype=np.float64).reshape(4, 3)
    result = secure_sum(vectors, protocol=toy_aggregator,
                        dropouts=[Dropout(2, 1, Stage.UPLOAD), Dropout(3, 1, Stage.SHARES)])
    assert result.protocol == toy_aggregator and result.included == (0, 1, 3)
    np.testing.assert_array_equal(result.total, vectors[[0, 1, 3]].sum(0))
    session = open_session(toy_aggregator, 4, 3, clip=1.0)
    outcome = session.step({c: vectors[c] for c in range(4)})
    np.testing.assert_array_equal(outcome.total, vectors.sum(0))
    spec = DPSpec(mode="central", noise_multiplier=1e-9, l2_clip=100.0)
    private = open_session(toy_aggregator, 4, 3, clip=1.0, dp=spec)
    assert np.allclose(private.step({c: vectors[c] for c in range(4)}).total, vectors.sum(0))


def test_the_registry_refuses_a_second_spec_of_one_name_and_forgets_an_unregistered_one(
        toy_aggregator):
    with pytest.raises(ParameterError, match="already registered"):
        register(ShiftedPlainSpec())
    unregister(toy_aggregator)
    with pytest.raises(ParameterError, match="unknown aggregator 'toy-shifted-plain'"):
        get(toy_aggregator)
    register(ShiftedPlainSpec())  # for the fixture's teardown


def test_capabilities_refuse_options_an_aggregator_cannot_honour():
    with pytest.raises(ParameterError, match="pairwise-mask uploads"):
        open_session("paillier", 3, 4, clip=1.0, unmasker=lambda *a: None)
    with pytest.raises(ParameterError, match="no in-process network"):
        open_session("plain", 3, 4, clip=1.0, faults=FaultPlan())
    assert [get(n).pairwise_masks for n in names()[:4]] == [False, True, True, False]
