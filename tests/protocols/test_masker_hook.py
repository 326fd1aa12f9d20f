"""A client's masker hook: its array is never modified, whatever the ring size."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.api import SecAggSession


@pytest.mark.parametrize("ring_bits", [20, 32])
def test_the_client_never_writes_to_the_array_its_masker_returned(ring_bits):
    rng = np.random.default_rng(2)
    dtype = np.uint32
    returned = {c: rng.integers(0, 2**32, 50, dtype=dtype) for c in range(3)}  # high bits set
    before = {c: a.copy() for c, a in returned.items()}
    session = SecAggSession(3, 50, clip=1.0, protocol="secagg", ring_bits=ring_bits,
                            maskers={c: (lambda v, codec, s: returned[s.client_id])
                                     for c in range(3)})
    outcome = session.step({c: np.zeros(50, np.float32) for c in range(3)})
    for c in range(3):  # at 20 bits the client reduces a copy, not the masker's array
        np.testing.assert_array_equal(returned[c], before[c])
    assert outcome.ring_total.max() < 2**ring_bits
