"""Paillier offers outside the client's OfferLimits and oversized messages are refused unread."""

from __future__ import annotations

import dataclasses
import re
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import MalformedMessageError, ParameterError, TooFewSurvivorsError
from protocols.limits import MAX_KEY_BITS, OfferLimits
from protocols.paillier.limits import residue_width
from protocols.paillier.messages import (
    MAX_INT_BYTES,
    TAG_BYTES,
    Ciphertexts,
    Offer,
    UploadBundle,
)
from protocols.paillier.roles import PaillierClient
from protocols.paillier.session import PaillierSession, generate_keypair
from protocols.wire import Writer

from .conftest import known_answer_keypair

KEYPAIR = known_answer_keypair()
N, M = 4, 10
MANY = 1 << 17  # two-byte integers in a hostile list: a 256 KiB body


def _session(n: int = N, m: int = M, **options) -> PaillierSession:
    return PaillierSession(n, m, clip=1.0, keypair=KEYPAIR, workers=1, unsafe_small_keys=True,
                           **options)


def _peak(call: Callable[[], object]) -> tuple[int, BaseException | None]:
    """The peak memory `call` allocates, and the ProtocolError it raised (if any)."""
    tracemalloc.start()
    try:
        call()
        raised = None
    except (MalformedMessageError, ParameterError) as error:
        raised = error
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, raised


def _many_ints(writer: Writer) -> Writer:
    """An integer list of MANY two-byte integers (257, each a fresh int), every byte present."""
    return writer.u32(2).u32(MANY).fixed(b"\x01" * 2 * MANY, 2 * MANY)


def _long_upload(s: PaillierSession, client: int = 0) -> bytes:
    w = (Writer(Ciphertexts.TYPE).fixed(s.server.session_id, 16).u64(s.server.last_step)
         .u8(Ciphertexts.UPLOAD).ids([client]))
    return _many_ints(w).fixed(bytes(TAG_BYTES), TAG_BYTES).finish()


def test_a_long_upload_is_refused_by_its_length_and_the_decoder_alone_would_allocate():
    s = _session()
    honest = s.clients[1].upload(s.server.open_step(), np.zeros(M))
    hostile = _long_upload(s)
    peak, raised = _peak(lambda: s.server.forward({0: hostile, 1: honest}))
    assert raised is None and peak < 64 * 1024
    [(step, client, error)] = s.server.rejections  # excluded like a dropout, unread
    assert (step, client) == (1, 0) and "more than the" in str(error)
    # the control: the decoder without the limit in front builds a million integers first
    control, raised = _peak(lambda: Ciphertexts.decode(hostile, Ciphertexts.UPLOAD))
    assert raised is None and control > 4 * 1024 * 1024


def test_the_key_holder_refuses_a_long_bundle_unread():
    s = _session()
    s.server.open_step()
    upload = _long_upload(s)
    w = Writer(UploadBundle.TYPE).fixed(s.key_holder.session_id, 16).u64(1).u32(1)
    hostile = w.u64(len(upload)).fixed(upload, len(upload)).finish()
    peak, raised = _peak(lambda: s.key_holder.decrypt(hostile))
    assert isinstance(raised, MalformedMessageError) and "more than the" in str(raised)
    assert peak < 64 * 1024
    control, raised = _peak(lambda: UploadBundle.decode(hostile))
    assert raised is None and control > 4 * 1024 * 1024


def test_a_client_refuses_a_long_offer_unread():
    s = _session()
    honest = Offer.decode(s.server.offer(0))
    w = Writer(Offer.TYPE).fixed(honest.session_id, 16).u32(0).u32(N).u64(M).f64(1.0)
    w.u8(honest.scale_bits).u8(32).u8(0).u64(0).u8(1).fixed(honest.auth_key, 32)
    hostile = _many_ints(w).finish()  # a million moduli where one belongs
    peak, raised = _peak(lambda: PaillierClient(0, hostile, unsafe_small_keys=True))
    assert isinstance(raised, MalformedMessageError) and "more than the" in str(raised)
    assert peak < 64 * 1024
    # the control: the decoder refuses it too, but only after building every integer
    control, raised = _peak(lambda: Offer.decode(hostile))
    assert isinstance(raised, MalformedMessageError) and control > 4 * 1024 * 1024


def _offer(**fields) -> bytes:
    honest = Offer.decode(_session().server.offer(0))
    return dataclasses.replace(honest, **fields).encode()


@pytest.mark.parametrize(("fields", "limits", "refusal"), [
    ({"n_clients": 2**32 - 1}, OfferLimits(), "n_clients must be in [2, 100000] "
                                              "(OfferLimits.max_clients)"),
    ({"n_clients": 1}, OfferLimits(), "OfferLimits.max_clients"),
    ({"client_id": 0, "n_clients": 100_001}, OfferLimits(), "OfferLimits.max_clients"),
    ({"vector_length": 2**28 + 1}, OfferLimits(), "OfferLimits.max_vector_length"),
    ({"vector_length": 2**64 - 1}, OfferLimits(), "OfferLimits.max_vector_length"),
    ({"vector_length": 0}, OfferLimits(), "OfferLimits.max_vector_length"),
    ({"client_id": 0, "n_clients": 2**31}, OfferLimits(max_clients=1_000),
     "OfferLimits.max_clients"),
    ({"modulus": KEYPAIR[0].n}, OfferLimits(max_key_bits=128), "at most 128 bits "
                                                                "(OfferLimits.max_key_bits)"),
    ({"modulus": (1 << 8192) | 1}, OfferLimits(), "more than the"),  # no message carries it
])
def test_an_offer_outside_the_limits_is_refused_naming_them(fields, limits, refusal):
    with pytest.raises((ParameterError, MalformedMessageError), match=re.escape(refusal)):
        PaillierClient(0, _offer(**fields), unsafe_small_keys=True, limits=limits)


def test_a_client_id_beyond_the_offered_clients_is_refused():
    data = _offer(client_id=N)
    with pytest.raises(ParameterError, match=f"client_id {N} is not valid for {N} clients"):
        PaillierClient(N, data, unsafe_small_keys=True)


def test_lifting_a_limit_is_what_lets_the_offer_in():
    big = _offer(n_clients=50_000, scale_bits=10)  # a ring that holds 50,000 inputs
    with pytest.raises(ParameterError, match=re.escape("OfferLimits.max_clients")):
        PaillierClient(0, big, unsafe_small_keys=True, limits=OfferLimits(max_clients=1_000))
    # the control: under the default limits the same offer is taken and packed for 50,000
    client = PaillierClient(0, big, unsafe_small_keys=True)
    assert client.layout.max_summands == 50_000
    with pytest.raises(ParameterError, match=re.escape("OfferLimits.max_key_bits")):
        PaillierClient(0, _offer(), unsafe_small_keys=True, limits=OfferLimits(max_key_bits=255))
    assert PaillierClient(0, _offer(), unsafe_small_keys=True, limits=OfferLimits(max_key_bits=256))


@pytest.mark.parametrize(("options", "field"), [
    ({"limits": OfferLimits(max_clients=3)}, "OfferLimits.max_clients"),
    ({"limits": OfferLimits(max_vector_length=M - 1)}, "OfferLimits.max_vector_length"),
    ({"limits": OfferLimits(max_key_bits=255)}, "OfferLimits.max_key_bits"),
])
def test_a_session_refuses_to_open_beyond_its_clients_limits(options, field):
    with pytest.raises(ParameterError, match=re.escape(field)):
        _session(**options)


def test_keys_no_message_can_carry_are_refused_before_they_are_drawn():
    with pytest.raises(ParameterError, match=f"at most {MAX_KEY_BITS} bits"):
        generate_keypair(MAX_KEY_BITS + 2)
    with pytest.raises(ParameterError, match=re.escape("OfferLimits.max_key_bits")):
        PaillierSession(N, M, clip=1.0, key_bits=4096, limits=OfferLimits(max_key_bits=3072))
    with pytest.raises(ParameterError, match=re.escape("OfferLimits.max_key_bits must be at most")):
        OfferLimits(max_key_bits=MAX_KEY_BITS + 1)
    # the largest modulus's residues mod N^2 fill the widest integer field exactly
    assert residue_width((1 << MAX_KEY_BITS) - 1) == MAX_INT_BYTES


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(1, 200))
def test_message_limits_are_exactly_the_largest_honest_messages(n, m):
    x = np.random.default_rng(n * m).uniform(-1, 1, (n, m))
    s = _session(n, m)
    request = s.server.open_step()
    uploads = {c: s.clients[c].upload(request, x[c]) for c in range(n)}
    longer = {c: u + b"\x00" for c, u in uploads.items()}
    with pytest.raises(TooFewSurvivorsError):  # every one a byte too long: all refused
        s.server.forward(longer)
    assert [str(e) for _, _, e in s.server.rejections][:1] == [
        f"message of type {Ciphertexts.TYPE} is {len(longer[0])} bytes, more than the "
        f"{len(uploads[0])} this session's parameters allow"]
    bundle = s.server.forward(uploads)  # all n: the longest bundle
    with pytest.raises(MalformedMessageError, match="more than"):
        s.key_holder.decrypt(bundle + b"\x00")
    plaintexts = s.key_holder.decrypt(bundle)  # the sum of all n: the longest
    with pytest.raises(MalformedMessageError, match="more than"):
        s.server.finish(plaintexts + b"\x00")
    assert np.abs(s.server.finish(plaintexts).total - x.sum(0)).max() <= s.error_bound(n)
    with pytest.raises(MalformedMessageError, match="more than"):
        s.clients[0].upload(s.server.open_step() + b"\x00", x[0])
