"""Stochastic rounding is keyed by a client secret and the session id: the server cannot redo it."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.api import SecAggSession
from protocols.codec import FixedPointCodec

from .conftest import tap_wire


def _inputs(n: int, m: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(12)
    return {c: rng.uniform(-1, 1, m) for c in range(n)}


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_two_sessions_with_one_seed_differ_only_under_stochastic_rounding(rounding):
    x = _inputs(4, 2000)
    a, b = (SecAggSession(4, 2000, clip=1.0, protocol="secagg", rounding=rounding,
                          rounding_seed=b"s" * 32) for _ in range(2))
    first, second = a.step(x), b.step(x)
    exact = sum(x.values())
    for out in (first, second):
        assert np.abs(out.total - exact).max() <= a.error_bound(4)
    same = np.array_equal(first.ring_total, second.ring_total)
    # 2000 off-grid coordinates of 4 clients: equal stochastic roundings would be a 2^-8000 event
    assert same == (rounding == "nearest")


def _byte_strings(obj, seen: set[int]) -> list[bytes]:
    """Every bytes value reachable from obj through attributes and containers."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, (bytes, bytearray)):
        return [bytes(obj)]
    if isinstance(obj, np.ndarray):
        return [obj.tobytes()]
    if isinstance(obj, dict):
        items = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return []
    return [b for item in items for b in _byte_strings(item, seen)]


def test_the_server_holds_nothing_the_dither_is_derived_from(monkeypatch):
    keys_used: list[bytes] = []
    encode = FixedPointCodec.encode

    def recording(self, x, *, rounding_key=None):
        keys_used.append(rounding_key)
        return encode(self, x, rounding_key=rounding_key)

    monkeypatch.setattr(FixedPointCodec, "encode", recording)
    session = SecAggSession(4, 64, clip=1.0, protocol="secagg", rounding_seed=b"s" * 32)
    wire = tap_wire(session.network)
    x = _inputs(4, 64)
    session.step(x)
    session.step(x)
    secrets = [c._dither_secret for c in session.network.clients.values()]
    assert len(keys_used) == 8 and len(set(keys_used)) == 8  # a fresh key per client and step
    held = _byte_strings(session.server, set())
    # control: the same walk finds the secret in the object that does hold it
    assert any(secrets[0] in blob for blob in _byte_strings(session.network.clients[0], set()))
    for secret in [*secrets, *keys_used]:
        assert not any(secret in blob for blob in held)
        assert not any(secret in message for message in wire)
