"""One session interface over every aggregator, and the plain baseline session."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.errors import NonFiniteInputError, ParameterError, TooFewSurvivorsError
from protocols.plain import PlainSession
from protocols.registry import open_session


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
