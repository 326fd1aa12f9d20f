"""Authenticated links of the in-process network: tampering is detected, never summed."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.errors import IntegrityError
from protocols.network import _Link
from protocols.session import FaultPlan, Stage

from .conftest import make_session


def test_a_link_round_trips_and_uses_a_fresh_nonce_per_frame():
    link = _Link()
    payload = bytes(range(256)) * 40
    first, second = link.seal(payload), link.seal(payload)
    assert first != second  # a fresh nonce (and so a fresh tag) per frame
    assert link.open(first) == payload and link.open(second) == payload
    assert link.open(link.seal(b"")) == b""


@pytest.mark.parametrize("where", [0, 11, 12, 500, -17, -16, -1])  # nonce, payload, tag
def test_any_flipped_byte_fails_authentication(where):
    link = _Link()
    frame = bytearray(bytes(link.seal(b"x" * 1000)))  # the wire form: nonce, payload, tag
    frame[where] ^= 0x01
    with pytest.raises(IntegrityError, match="tampered"):
        link.open(bytes(frame))


def test_frames_from_another_link_or_too_short_are_refused():
    frame = _Link().seal(b"payload")
    with pytest.raises(IntegrityError):
        _Link().open(frame)
    with pytest.raises(IntegrityError, match="shorter"):
        _Link().open(bytes(frame)[:27])


def test_a_frame_and_its_wire_form_open_alike_and_the_payload_is_not_copied():
    link, payload = _Link(), bytes(3 << 20)
    frame = link.seal(payload)
    assert len(bytes(frame)) == 12 + len(payload) + 16
    assert link.open(frame) is payload  # in process, a megabyte upload crosses by reference
    assert link.open(bytes(frame)) == payload


def test_a_tampered_upload_costs_its_client_the_step_and_nothing_else():
    faults = FaultPlan(tamper={(1, 2, Stage.UPLOAD)})
    _, _, network, inputs, codec = make_session(5, 64, threshold=3, steps=2, faults=faults)
    network.setup()
    outcome = network.step()
    assert 2 not in outcome.included and outcome.included == frozenset({0, 1, 3, 4})
    (step, client, error), = network.refusals
    assert (step, client) == (1, 2) and isinstance(error, IntegrityError)
    expected = np.zeros(64, dtype=codec.dtype)
    for c in sorted(outcome.included):
        expected = codec.add(expected, codec.encode(inputs.values[1, c]))
    np.testing.assert_array_equal(outcome.ring_total, expected)
