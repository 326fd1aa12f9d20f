"""secure_sum and SecAggSession: the one-call helper users reach for first."""

from __future__ import annotations

import numpy as np
import pytest

from protocols import Dropout, SecAggSession, Stage, secure_sum
from protocols.errors import NonFiniteInputError, ParameterError, TooFewSurvivorsError


@pytest.mark.parametrize("protocol", ["plain", "secagg", "secagg+"])
def test_sum_with_a_dropout_after_upload(protocol):
    vectors = np.random.default_rng(1).uniform(-2, 2, (8, 50))
    result = secure_sum(vectors, protocol=protocol, clip=2.0,
                        dropouts=[Dropout(5, 1, Stage.SHARES), Dropout(6, 1, Stage.UPLOAD)])
    assert 6 not in result.included and 5 in result.included
    exact = vectors[list(result.included)].sum(0)
    assert np.max(np.abs(result.total - exact)) <= max(result.error_bound, 1e-5)
    assert result.bytes_up.shape == (8,) and result.bytes_up[0] >= 4 * 50


def test_weighted_mean_over_the_survivors():
    rng = np.random.default_rng(2)
    vectors = rng.uniform(-1, 1, (6, 40))
    weights = [10, 3, 0, 7, 25, 1]
    result = secure_sum(vectors, protocol="secagg", clip=1.0, weights=weights, max_weight=50,
                        dropouts=[Dropout(4, 1, Stage.UPLOAD)])
    kept = [c for c in range(6) if c != 4]
    assert result.weight_sum == pytest.approx(sum(weights[c] for c in kept), abs=1e-6)
    expected = np.average(vectors[kept], axis=0, weights=[weights[c] for c in kept])
    np.testing.assert_allclose(result.weighted_mean, expected, atol=1e-6)
    assert result.total.shape == (40,)


def test_bad_weights_and_unweighted_mean_are_refused():
    vectors = np.zeros((3, 4))
    with pytest.raises(ParameterError, match="weights"):
        secure_sum(vectors, protocol="secagg", clip=1.0, weights=[1, -1, 2])
    with pytest.raises(ParameterError, match="max_weight"):
        secure_sum(vectors, protocol="secagg", clip=1.0, weights=[1, 5, 2], max_weight=3)
    with pytest.raises(ParameterError, match="weights="):
        _ = secure_sum(vectors, protocol="secagg", clip=1.0).weighted_mean


def test_bad_inputs_get_clear_errors():
    with pytest.raises(NonFiniteInputError, match="client 1's vector holds 1 NaN"):
        secure_sum([np.zeros(3), np.array([0, np.nan, 0]), np.zeros(3)], clip=1.0)
    with pytest.raises(ParameterError, match="same length"):
        secure_sum([np.zeros(3), np.zeros(4)], clip=1.0)
    with pytest.raises(ParameterError, match="unknown aggregator 'magic'; choose one of plain"):
        secure_sum(np.zeros((3, 3)), protocol="magic")
    with pytest.raises(ParameterError, match="at least 2 clients"):
        secure_sum(np.zeros((1, 3)))
    with pytest.raises(TooFewSurvivorsError, match="needs"):
        secure_sum(np.zeros((4, 3)), protocol="secagg", clip=1.0,
                   dropouts=[Dropout(c, 1, Stage.UPLOAD) for c in (1, 2, 3)])


def test_session_steps_share_one_key_setup():
    session = SecAggSession(5, 10, clip=1.0, protocol="secagg")
    keys = dict(session.server.public_keys)
    for step in range(1, 4):
        outcome = session.step({c: np.full(10, 0.1 * c) for c in range(5)})
        assert outcome.step == step
        bound = session.codec.error_bound(5)
        np.testing.assert_allclose(outcome.total, np.full(10, 1.0), atol=bound)
    assert session.server.public_keys == keys
    outcome = session.step({c: np.zeros(10) for c in (0, 1, 2, 3)})  # client 4 is gone
    assert outcome.included == {0, 1, 2, 3} and session.active == {0, 1, 2, 3}
