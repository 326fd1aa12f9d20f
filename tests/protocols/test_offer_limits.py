"""Absurd offers and oversized messages are refused by their numbers, before any allocation."""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import SecAggSession
from protocols.errors import MalformedMessageError, ParameterError, StageError
from protocols.limits import OfferLimits
from protocols.secagg.client import SecAggClient
from protocols.secagg.limits import SEALED_SHARE_BYTES, session_sizes
from protocols.secagg.messages import (
    ConsistencyReply,
    ConsistencyRequest,
    DropRequest,
    KeyAdvertisement,
    MaskedInput,
    PairwiseReveal,
    Roster,
    SessionOffer,
    ShareRequest,
    ShareReveal,
    StepRequest,
)

from .conftest import make_session

SID = bytes(range(16))


def _offer(n: int, degree: int, *, threshold: int = 1, m: int = 10, client: int = 0,
           ring_bits: int = 64) -> bytes:
    return SessionOffer(SID, client, n, degree, threshold, bytes(32), ring_bits, 0, 1.0,
                        m).encode()


def _peak_bytes(client: SecAggClient, data: bytes) -> tuple[int, BaseException | None]:
    """The peak memory `client.handle(data)` allocates, and what it raised."""
    tracemalloc.start()
    try:
        client.handle(data)
        raised = None
    except ParameterError as error:
        raised = error
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, raised


@pytest.mark.parametrize(("offer", "field"), [
    (_offer(2**32 - 1, 2), "n_clients must be in [2, 100000] (OfferLimits.max_clients)"),
    (_offer(2**32 - 1, 2**32 - 2), "n_clients"),
    (_offer(100_001, 100_000), "n_clients"),
    (_offer(10, 9, m=2**28 + 1), "vector_length must be in [1, 268435456]"),
    (_offer(10, 9, m=2**64 - 1), "vector_length"),
    (_offer(10, 9, m=0), "vector_length"),
    (_offer(10, 10), "degree must be even in [2, n-2] or exactly n-1 = 9"),
    (_offer(10, 3), "degree must be even"),
    (_offer(10, 0), "degree must be even"),
    (_offer(10, 9, threshold=0), "threshold 0 must be between 1"),
    (_offer(10, 4, threshold=5), "threshold 5 must be between 1"),
    (_offer(10, 9, client=10), "client_id 10 is not valid for 10 clients"),
])
def test_an_absurd_offer_is_refused_before_anything_is_built(offer, field):
    assert len(offer) == 91
    client = SecAggClient(lambda step: np.zeros(1))
    peak, raised = _peak_bytes(client, offer)
    assert raised is not None and re.search(re.escape(field), str(raised))
    assert peak < 64 * 1024  # nothing proportional to the offer's numbers
    assert client.client_id == -1 and client._offer is None


def test_lifting_the_limit_is_what_lets_an_offer_allocate():
    offer = _offer(50_000, 2)  # a sparse graph over 50,000 clients
    refused, error = _peak_bytes(SecAggClient(lambda step: np.zeros(1),
                                              limits=OfferLimits(max_clients=1_000)), offer)
    assert isinstance(error, ParameterError) and refused < 64 * 1024
    # the control: with the default limit of 100,000 the client builds the graph
    accepted, error = _peak_bytes(SecAggClient(lambda step: np.zeros(1)), offer)
    assert error is None and accepted > 1_000_000


def test_the_limits_admit_sessions_up_to_them():
    client = SecAggClient(lambda step: np.zeros(1))
    client.handle(_offer(100_000, 99_999, threshold=50_000, m=2**28))
    assert client.client_id == 0


@pytest.mark.parametrize(("options", "field"), [
    ({"max_clients": 1}, "OfferLimits.max_clients"),
    ({"max_degree": 0}, "OfferLimits.max_degree"),
    ({"max_vector_length": 2.5}, "OfferLimits.max_vector_length"),
    ({"max_vector_length": 2**31 + 1}, "OfferLimits.max_vector_length"),
])
def test_limits_themselves_are_checked(options, field):
    with pytest.raises(ParameterError, match=re.escape(field)):
        OfferLimits(**options)


def test_a_session_refuses_to_open_beyond_its_clients_limits():
    with pytest.raises(ParameterError, match=re.escape("OfferLimits.max_clients")):
        SecAggSession(5, 4, clip=1.0, limits=OfferLimits(max_clients=4))
    with pytest.raises(ParameterError, match=re.escape("OfferLimits.max_vector_length")):
        SecAggSession(5, 40, clip=1.0, limits=OfferLimits(max_vector_length=32))
    with pytest.raises(ParameterError, match=re.escape("OfferLimits.max_degree")):
        SecAggSession(5, 4, clip=1.0, protocol="secagg", limits=OfferLimits(max_degree=3))
    session = SecAggSession(5, 4, clip=1.0, limits=OfferLimits(max_clients=5))
    assert session.step({c: np.zeros(4) for c in range(5)}).included == frozenset(range(5))


def _maximal(k: int, m: int, ring_bits: int) -> list[object]:
    """One message of each type with k entries (k neighbours) and m values: the largest."""
    ids = frozenset(range(k))
    keyed = {i: bytes(32) for i in ids}
    sealed = {i: bytes(SEALED_SHARE_BYTES) for i in ids}
    dtype = np.uint64 if ring_bits > 32 else np.uint32
    return [
        SessionOffer(SID, 0, k + 1, k, 1, bytes(32), ring_bits, 0, 1.0, m),
        KeyAdvertisement(SID, 0, bytes(32)), Roster(SID, 0, keyed), StepRequest(SID, 1, ids),
        MaskedInput(SID, 0, 1, np.zeros(m, dtype), sealed), DropRequest(SID, 1, ids),
        PairwiseReveal(SID, 0, 1, keyed), ConsistencyRequest(SID, 1, ids),
        ConsistencyReply(SID, 0, 1, keyed),
        ShareRequest(SID, 1, ids | {k}, sealed, keyed),
        ShareReveal(SID, 0, 1, {i: bytes(33) for i in ids}),
    ]


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 300), st.integers(1, 2_000), st.sampled_from([16, 32, 64]))
def test_message_limits_are_exactly_the_largest_honest_message(n, m, ring_bits):
    sizes = session_sizes(n_clients=n, degree=n - 1, vector_length=m, ring_bits=ring_bits)
    assert len(sizes.limits) == 11
    for message in _maximal(n - 1, m, ring_bits):
        data = message.encode()
        sizes.check(data)  # fits
        with pytest.raises(MalformedMessageError, match="more than"):
            sizes.check(data + b"\x00")  # one byte more does not


def test_the_server_refuses_an_oversized_reply_unread():
    server, clients, network, inputs, codec = make_session(5, 16, threshold=3)
    offers = server.open_session()
    adverts = {c: clients[c].handle(offers[c]) for c in range(5)}
    adverts[2] = adverts[2] + bytes(10_000_000)  # 10 MB behind a valid advertisement
    tracemalloc.start()
    server.receive(adverts)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(c, type(e)) for _, c, e in server.rejections] == [(2, MalformedMessageError)]
    assert "more than the 58 this session's parameters allow" in str(server.rejections[0][2])
    assert peak < 1_000_000 and server.active == {0, 1, 3, 4}


def test_a_client_refuses_an_oversized_request_unread():
    server, clients, network, inputs, codec = make_session(5, 16, threshold=3)
    network.setup()
    step = StepRequest(server.session_id, 1, frozenset({1, 2, 3, 4})).encode()
    with pytest.raises(MalformedMessageError, match="more than"):
        clients[0].handle(step + bytes(4))
    fresh = SecAggClient(lambda step: np.zeros(1))
    with pytest.raises(StageError, match="before any session offer"):
        fresh.handle(step + bytes(100))  # before its offer, it reads nothing but an offer
    with pytest.raises(MalformedMessageError, match="more than the 91"):
        fresh.handle(_offer(10, 9) + bytes(100))
    assert clients[0].handle(step) is not None  # the honest request still works
