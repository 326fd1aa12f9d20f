"""The server's pluggable unmasker: what it is handed, and what the server refuses back."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.api import SecAggSession
from protocols.errors import ParameterError
from protocols.registry import open_session
from protocols.secagg.server import host_unmask


def _inputs(n: int, m: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(9)
    return {c: rng.uniform(-1, 1, m).astype(np.float32) for c in range(n)}


def test_the_unmasker_gets_survivors_uploads_and_one_signed_seed_per_mask_to_remove():
    calls = []

    def recording(uploads, signed_seeds, codec):
        calls.append((len(uploads), sorted(sign for _, sign in signed_seeds)))
        return host_unmask(uploads, signed_seeds, codec)

    inputs = _inputs(5, 40)
    # nearest rounding: stochastic rounding is keyed by each client's own secret, so two
    # sessions agree bit for bit only without it
    session = SecAggSession(5, 40, clip=1.0, protocol="secagg", unmasker=recording,
                            rounding="nearest")
    reference = SecAggSession(5, 40, clip=1.0, protocol="secagg", rounding="nearest")
    for step in range(3):  # step 1: client 2 drops before uploading
        sent = {c: v for c, v in inputs.items() if not (step == 1 and c == 2)}
        a = session.step(sent)
        b = reference.step(sent)
        np.testing.assert_array_equal(a.ring_total, b.ring_total)
        assert a.included == b.included
        inputs = sent
    # step 1: four self masks and each survivor's pair mask with 2: 0 and 1 added it (+1, their
    # ids are below 2's) and remove it with -1, 3 and 4 subtracted it and add it back (+1);
    # step 2: 2 has left the session
    assert calls == [(5, [-1] * 5), (4, [-1] * 6 + [1] * 2), (4, [-1] * 4)]


@pytest.mark.parametrize("bad", [np.zeros(39, np.uint32), np.zeros(40, np.int64)],
                         ids=["short", "wrong-dtype"])
def test_an_unmasker_returning_the_wrong_vector_is_a_parameter_error(bad):
    session = SecAggSession(3, 40, clip=1.0, protocol="secagg",
                            unmasker=lambda uploads, seeds, codec: bad)
    with pytest.raises(ParameterError, match=r"the protocol needs \(40,\) uint32"):
        session.step(_inputs(3, 40))


@pytest.mark.parametrize("protocol", ["plain", "paillier"])
def test_an_unmasker_for_a_protocol_without_masks_is_refused(protocol):
    with pytest.raises(ParameterError, match="pairwise-mask uploads"):
        open_session(protocol, 3, 10, clip=1.0, unmasker=host_unmask)
