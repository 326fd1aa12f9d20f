"""Inputs no client could send are refused before any message; quorums and budgets hold."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.api import SecAggSession, secure_sum
from protocols.codec import FixedPointCodec
from protocols.dp.mechanisms import DPSpec
from protocols.errors import (
    NonFiniteInputError,
    OverflowBudgetError,
    ParameterError,
    TooFewSurvivorsError,
)
from protocols.inputs import check_vectors
from protocols.paillier.roles import PaillierKeyHolder
from protocols.paillier.session import PaillierSession, generate_keypair
from protocols.plain import PlainSession
from protocols.registry import get, open_session

N, M = 4, 6
GOOD = {c: np.full(M, 0.25 * (c + 1)) for c in range(N)}

BAD_STEPS = [
    ({**GOOD, 0: np.array([0.0, np.nan, 0, 0, 0, 0])}, (), NonFiniteInputError, "client 0"),
    ({**GOOD, 1: np.full(M, np.inf)}, (), NonFiniteInputError, "client 1"),
    ({**GOOD, 2: np.zeros(M + 1)}, (), ParameterError, "client 2's vector has 7 values"),
    ({**GOOD, 0: np.zeros(M, complex)}, (), ParameterError, "real numbers.*complex128"),
    ({**GOOD, 0: np.array(["a"] * M)}, (), ParameterError, "real numbers"),
    ({**GOOD, 0: [{}] * M}, (), ParameterError, "real numbers.*object"),
    ({**GOOD, 3: np.arange(M)}, (), ParameterError, "client 3's vector must be float"),
    ({**GOOD, 9: np.zeros(M)}, (), ParameterError, r"clients \[9\], which are not active"),
    ({1: GOOD[1], 2: GOOD[2], 3: GOOD[3]}, (0,), ParameterError, r"drop_after_upload .*\[0\]"),
]


@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
@pytest.mark.parametrize(("inputs", "dropping", "error", "message"), BAD_STEPS)
def test_secagg_refuses_bad_inputs_before_any_message(protocol, inputs, dropping, error,
                                                      message):
    session = SecAggSession(N, M, clip=4.0, protocol=protocol)
    before = session.traffic.bytes_down.copy()
    with pytest.raises(error, match=message):
        session.step(inputs, drop_after_upload=dropping)
    # nothing was sent, nobody left, and the next step sums everyone
    assert (session.traffic.bytes_down == before).all() and not session.network.refusals
    outcome = session.step(GOOD)
    assert outcome.included == frozenset(range(N))
    assert np.allclose(outcome.total, sum(GOOD.values()), atol=session.error_bound(N))


def test_plain_session_refuses_the_same_inputs():
    for inputs, dropping, error, message in BAD_STEPS:
        if "must be float" in message:
            continue  # the plain session sends float32 of any real input, integers included
        with pytest.raises(error, match=message):
            PlainSession(N, M).step(inputs, drop_after_upload=dropping)
    with pytest.raises(ParameterError, match="float32's range"):
        PlainSession(N, M).step({**GOOD, 0: np.full(M, 1e300)})


def test_a_masker_that_refuses_its_vector_mid_step_stops_the_step():
    def refusing(vector, codec, secrets):
        raise NonFiniteInputError("NaN found on the device")

    session = SecAggSession(N, M, clip=4.0, protocol="secagg", maskers={0: refusing})
    with pytest.raises(NonFiniteInputError, match=r"client 0.s masker refused .*discarded"):
        session.step(GOOD)
    assert session.active == frozenset({1, 2, 3})  # as the message says
    fresh = SecAggSession(N, M, clip=4.0, protocol="secagg", maskers={0: refusing})
    with pytest.raises(ParameterError, match="client 0's vector has 5 values"):
        fresh.step({**GOOD, 0: np.zeros(M - 1)})  # a masker's vector: its length is checked


def test_numpy_integers_are_counts_too():
    session = SecAggSession(np.int64(N), np.int32(M), clip=4.0, protocol="secagg")
    assert type(session.vector_length) is int and session.n_clients == N
    assert session.step(GOOD).included == frozenset(range(N))


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "4"])
def test_counts_must_be_ints(value):
    for build in (lambda: SecAggSession(N, value, clip=1.0),
                  lambda: PlainSession(N, value),
                  lambda: SecAggSession(value, M, clip=1.0)):
        with pytest.raises(ParameterError, match="must be an int >= "):
            build()


@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
def test_threshold_zero_is_refused_not_replaced_by_the_default(protocol):
    with pytest.raises(ParameterError, match="threshold 0"):
        secure_sum(np.ones((4, 3)), protocol=protocol, threshold=0)
    assert get(protocol).plan(4, threshold=None).threshold == 2
    assert get(protocol).plan(4, threshold=0).threshold == 0  # left for the server


@pytest.mark.parametrize(("vectors", "message"), [
    ([[1 + 5j, 0], [1, 0], [1, 0]], "complex128"),
    ([{"a": 1}, {"a": 2}], "object"),
    ([[10**400, 0], [1, 0]], "object"),
    ([["1", "2"], ["3", "4"]], "<U1"),
    ([[1.0, 2.0], [1.0, 2.0, 3.0]], r"same length, got sizes \[2, 3\]"),
])
def test_secure_sum_refuses_what_is_not_real_numbers(vectors, message):
    with pytest.raises(ParameterError, match=message):
        check_vectors(vectors)


# ---- Paillier: the key holder's quorum ----------------------------------------------------------

def test_the_key_holder_never_decrypts_a_sum_of_fewer_than_its_quorum(keypair2048):
    spec = DPSpec(mode="distributed", noise_multiplier=1.0, l2_clip=1.0, min_contributors=2)
    session = open_session("paillier", N, M, clip=1.0, dp=spec, keypair=keypair2048)
    assert session.threshold == 2 and session.inner.key_holder.quorum == 2
    before = session.inner.traffic.key_holder_bytes_out
    # the server, which knows the quorum, does not even forward one upload
    with pytest.raises(TooFewSurvivorsError, match=r"server, step 1.*needs 2, only 1"):
        session.step({0: np.full(M, 0.3)})
    # no plaintext left the key holder; the next step, with a quorum, is released
    assert session.inner.traffic.key_holder_bytes_out == before
    outcome = session.step({0: np.full(M, 0.3), 1: np.full(M, 0.1)})
    assert outcome.included == frozenset({0, 1})
    with pytest.raises(ParameterError, match="quorum must be at most the 4 clients"):
        PaillierSession(N, M, clip=1.0, keypair=keypair2048, quorum=5)
    with pytest.raises(ParameterError, match="quorum must be an int >= 1"):
        PaillierKeyHolder(keypair2048, n_clients=N, vector_length=M, quorum=0,
                          codec=FixedPointCodec.for_clients(N, clip=1.0))


def test_paillier_refuses_bad_inputs_before_encrypting(keypair2048):
    with PaillierSession(N, M, clip=1.0, keypair=keypair2048, workers=1) as session:
        setup = session.traffic.bytes_up.copy()  # each client's key for the key holder
        with pytest.raises(NonFiniteInputError, match="client 0"):
            session.step({**GOOD, 0: np.full(M, np.nan)})
        assert not session.refusals and (session.traffic.bytes_up == setup).all()


# ---- the overflow budget is exact ---------------------------------------------------------------

def test_a_clip_plus_headroom_that_rounds_down_as_floats_is_refused():
    # R + H rounds down by hundreds of units at 2^61; the ring's margin is one unit per client
    n, ulp = 3, 512
    top = math.floor(Fraction((1 << 63) - 1, n) - 1)
    top -= top % ulp
    clip, headroom = float(top - ulp), float(ulp + ulp // 2 - 1)
    assert clip + headroom < Fraction(clip) + Fraction(headroom)  # the float sum is short
    with pytest.raises(OverflowBudgetError):
        FixedPointCodec.for_clients(n, clip=clip, ring_bits=64, scale_bits=0, headroom=headroom)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 50), ring_bits=st.sampled_from([16, 32, 64]),
       clip=st.floats(1e-3, 2.0**62, allow_nan=False),
       headroom=st.floats(0.0, 2.0**62, allow_nan=False))
def test_every_accepted_budget_holds_n_worst_case_noisy_encodings(n, ring_bits, clip, headroom):
    try:
        codec = FixedPointCodec.for_clients(n, clip=clip, ring_bits=ring_bits, headroom=headroom)
    except OverflowBudgetError:
        return
    f = codec.scale_bits
    worst = math.ceil(Fraction(clip) * 2**f) + codec.noise_units(headroom)  # |encoding + noise|
    assert n * worst <= (1 << (ring_bits - 1)) - 1


def test_an_odd_key_size_is_refused_instead_of_searching_forever():
    # phe draws two primes of key_bits // 2 bits until N has key_bits bits: never, if odd
    with pytest.raises(ParameterError, match="must be even, got 2049"):
        generate_keypair(2049)


def test_a_step_with_too_few_survivors_leaves_the_session_ready():
    # n = 5, t = 3: a step of 3 uploads fails; the next one starts afresh (no StageError)
    session = SecAggSession(5, M, clip=4.0, protocol="secagg")
    five = {c: np.full(M, 0.5) for c in range(5)}
    with pytest.raises(TooFewSurvivorsError):
        session.step({c: five[c] for c in range(3)})
    assert session.active == frozenset(range(3))  # the clients that dropped stay gone
    with pytest.raises(TooFewSurvivorsError):  # still too few, and said so again
        session.step({c: five[c] for c in range(3)})


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_a_bad_dropout_stage_is_refused_whatever_the_rate(rate):
    from protocols.session import FaultPlan

    with pytest.raises(ParameterError, match="dropout stage must be one of"):
        FaultPlan.random(4, rate=rate, stage="sometime")
