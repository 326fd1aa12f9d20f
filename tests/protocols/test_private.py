"""DP around every aggregator: clipping, noise of the promised scale, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protocols.dp.mechanisms import DPSpec
from protocols.errors import ParameterError
from protocols.registry import get, open_session

M = 20_000
# The sample variance of M iid normal values has relative standard error sqrt(2 / M) = 1 %;
# 6 standard errors keep a false failure below 1e-8 per check.
TOLERANCE = 6 * math.sqrt(2 / M)


@pytest.mark.parametrize("protocol", ["plain", "secagg", "secagg+"])
def test_central_noise_has_the_promised_scale(protocol):
    spec = DPSpec(mode="central", noise_multiplier=2.0, l2_clip=0.5)
    session = open_session(protocol, 4, M, clip=1.0, dp=spec)
    outcome = session.step({c: np.zeros(M) for c in range(4)})
    variance = float(np.var(outcome.total))
    assert abs(variance / (2.0 * 0.5) ** 2 - 1) < TOLERANCE
    assert session.releases == 1


@pytest.mark.parametrize(("protocol", "m"), [("plain", M), ("secagg", M), ("secagg+", M),
                                              ("paillier", 2_000)])
def test_distributed_noise_summed_over_clients_covers_the_central_target(protocol, m):
    n = 5
    t = get(protocol).plan(n, private=True).min_contributors
    spec = DPSpec(mode="distributed", noise_multiplier=1.5, l2_clip=1.0, min_contributors=t)
    session = open_session(protocol, n, m, clip=1.0, dp=spec, key_bits=2048)
    outcome = session.step({c: np.zeros(m) for c in range(n)})
    # each of the n clients adds variance (zC)^2 / t: the sum carries n / t times the target
    expected = (1.5 * 1.0) ** 2 * n / t
    assert abs(float(np.var(outcome.total)) / expected - 1) < 6 * math.sqrt(2 / m)
    assert abs(float(np.mean(outcome.total))) < 6 * math.sqrt(expected / m)


def test_every_vector_is_clipped_to_the_l2_bound_before_summing():
    spec = DPSpec(mode="central", noise_multiplier=1e-9, l2_clip=1.0)
    session = open_session("secagg", 3, 4, clip=1.0, dp=spec)
    big = np.array([3.0, 4.0, 0.0, 0.0])  # norm 5 -> scaled to norm 1
    outcome = session.step({0: big, 1: big, 2: np.zeros(4)})
    np.testing.assert_allclose(outcome.total, [1.2, 1.6, 0, 0], atol=1e-6)
    assert session.clipped == 2


def test_distributed_noise_sized_for_more_contributors_than_guaranteed_is_refused():
    spec = DPSpec(mode="distributed", noise_multiplier=1.0, l2_clip=1.0, min_contributors=4)
    with pytest.raises(ParameterError, match="as few as 3"):
        open_session("secagg", 4, 10, clip=1.0, dp=spec)


def test_the_release_floor_follows_the_protocol():
    assert get("plain").plan(5, threshold=3).min_contributors == 1
    assert get("secagg").plan(4, threshold=2).min_contributors == 3
    assert get("paillier").plan(5, threshold=3).min_contributors == 3


@pytest.mark.parametrize("protocol", ["plain", "secagg", "secagg+"])
def test_secure_sum_with_dp_noises_the_survivors_sum(protocol):
    from protocols.api import secure_sum
    from protocols.session import Dropout, Stage

    spec = DPSpec(mode="distributed", noise_multiplier=1.0, l2_clip=1.0, min_contributors=1)
    result = secure_sum(np.zeros((6, M)), protocol=protocol, dp=spec,
                        dropouts=[Dropout(5, 1, Stage.UPLOAD), Dropout(4, 1, Stage.SHARES)])
    assert result.included == (0, 1, 2, 3, 4) and result.dropped == (5,)
    # five clients each add variance (zC)^2 / 1
    assert abs(float(np.var(result.total)) / 5 - 1) < TOLERANCE


def test_secure_sum_refuses_weights_with_dp():
    from protocols.api import secure_sum

    spec = DPSpec(mode="central", noise_multiplier=1.0, l2_clip=1.0)
    with pytest.raises(ParameterError, match="weights and dp"):
        secure_sum(np.zeros((3, 4)), dp=spec, weights=[1, 1, 1])
