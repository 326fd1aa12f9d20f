"""Decoders: canonical round trips; random and mutated bytes raise only ProtocolError."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import MalformedMessageError, ProtocolError
from protocols.secagg.client import SecAggClient
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
    decode_message,
)

SID = bytes(range(16))
EXAMPLES = [
    SessionOffer(SID, 3, 10, 9, 6, bytes(32), 32, 20, 1.5, 1000),
    SessionOffer(SID, 3, 10, 9, 6, bytes(32), 32, 20, 1.5, 1000, "nearest", "chacha20",
                 "semi-honest"),
    KeyAdvertisement(SID, 3, bytes(range(32))),
    Roster(SID, 3, {1: bytes(32), 7: bytes([1]) * 32}),
    StepRequest(SID, 4, frozenset({0, 2, 9})),
    MaskedInput(SID, 3, 4, np.arange(10, dtype=np.uint32), {0: b"abc", 5: b"\x00" * 49}),
    MaskedInput(SID, 3, 4, np.arange(3, dtype=np.uint64), {}),
    DropRequest(SID, 4, frozenset({1})),
    PairwiseReveal(SID, 3, 4, {1: bytes(32)}),
    ShareRequest(SID, 4, frozenset({0, 3}), {0: b"sealed"}),
    ShareRequest(SID, 4, frozenset({0, 3}), {0: b"sealed"}, {0: bytes([9]) * 32}),
    ConsistencyRequest(SID, 4, frozenset({2, 5})),
    ConsistencyReply(SID, 3, 4, {0: bytes(32), 6: bytes([1]) * 32}),
    ShareReveal(SID, 3, 4, {0: bytes(33), 3: bytes([7]) * 33}),
]


def _same(a, b) -> bool:
    if isinstance(a, MaskedInput):
        return (a.session_id, a.client_id, a.step, a.envelopes) == (
            b.session_id, b.client_id, b.step, b.envelopes) and np.array_equal(a.vector, b.vector) \
            and a.vector.dtype == b.vector.dtype
    return a == b


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_and_canonical(message):
    data = message.encode()
    decoded = decode_message(data)
    assert _same(decoded, message)
    assert decoded.encode() == data


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_truncation_and_trailing_bytes_are_refused(message):
    data = message.encode()
    for cut in range(len(data)):
        with pytest.raises(MalformedMessageError):
            decode_message(data[:cut])
    with pytest.raises(MalformedMessageError, match="trailing"):
        decode_message(data + b"\x00")


def test_unsorted_ids_and_oversized_lists_are_refused():
    data = bytearray(StepRequest(SID, 1, frozenset({1, 2})).encode())
    ids_at = len(data) - 8
    data[ids_at:] = (2).to_bytes(4, "little") + (1).to_bytes(4, "little")
    with pytest.raises(MalformedMessageError, match="strictly increasing"):
        decode_message(bytes(data))
    head = StepRequest(SID, 1, frozenset()).encode()[:-4]
    with pytest.raises(MalformedMessageError, match="exceed"):
        decode_message(head + (1 << 30).to_bytes(4, "little"))


def test_unknown_threat_model_code_is_refused():
    data = bytearray(EXAMPLES[0].encode())
    data[-1] = 7
    with pytest.raises(MalformedMessageError, match="threat model"):
        decode_message(bytes(data))


def test_wrong_type_and_bad_magic():
    with pytest.raises(MalformedMessageError, match="magic"):
        decode_message(b"XXXX\x01\x04" + bytes(30))
    with pytest.raises(MalformedMessageError, match="unknown message type"):
        decode_message(b"CDSA\x01\x63")
    with pytest.raises(MalformedMessageError, match="expected message type"):
        StepRequest.decode(DropRequest(SID, 1, frozenset()).encode())
    with pytest.raises(MalformedMessageError):
        decode_message("not bytes")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_errors(data):
    for candidate in (data, b"CDSA\x01" + data):
        with contextlib.suppress(ProtocolError):
            decode_message(candidate)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EXAMPLES), st.data())
def test_mutated_messages_raise_only_protocol_errors(message, data):
    raw = bytearray(message.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        decode_message(bytes(raw))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(EXAMPLES), st.binary(max_size=64))
def test_client_fed_garbage_raises_only_protocol_errors(message, noise):
    client = SecAggClient(lambda step: np.zeros(4))
    for data in (message.encode(), noise, message.encode()[:-1] + noise):
        with contextlib.suppress(ProtocolError):
            client.handle(data)
