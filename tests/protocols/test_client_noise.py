"""The distributed-noise hook: clients add integer noise after encoding, before masking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protocols.api import SecAggSession
from protocols.codec import FixedPointCodec
from protocols.errors import OverflowBudgetError, ParameterError, TooFewSurvivorsError


class KnownNoise:
    """Noise with a known value per call, so the sum can be predicted exactly."""

    def __init__(self, headroom: float, units: list[int] | None = None) -> None:
        self.headroom, self.units, self.drawn = headroom, units, []

    def sample(self, length: int, scale_bits: int) -> np.ndarray:
        limit = math.ceil(self.headroom * 2**scale_bits)
        rng = np.random.default_rng(len(self.drawn))
        values = rng.integers(-limit, limit + 1, size=length, dtype=np.int64)
        if self.units is not None:
            values = np.asarray(self.units, dtype=np.int64)
        self.drawn.append(values)
        return values


@pytest.mark.parametrize("ring_bits", [16, 32, 48])
def test_sum_carries_exactly_the_noise_the_clients_added(ring_bits):
    noise = KnownNoise(headroom=0.5)
    n, m = 4, 50
    session = SecAggSession(n, m, clip=1.0, protocol="secagg", ring_bits=ring_bits,
                            rounding="nearest", noise=noise)
    f = session.codec.scale_bits
    grid = np.random.default_rng(1).integers(-2**f, 2**f, size=(n, m)) / 2**f
    outcome = session.step({c: grid[c] for c in range(n)})
    expected = grid.sum(0) + np.sum(noise.drawn, axis=0) / 2**f
    np.testing.assert_array_equal(outcome.total, expected)
    assert 0 < max(int(np.abs(d).max()) for d in noise.drawn) <= math.ceil(0.5 * 2**f)


def test_headroom_lowers_the_scale_so_the_noisy_sum_cannot_wrap():
    plain = FixedPointCodec.for_clients(4, clip=1.0, ring_bits=32)
    noisy = FixedPointCodec.for_clients(4, clip=1.0, ring_bits=32, headroom=7.0)
    assert noisy.clip == 1.0 and noisy.scale_bits == plain.scale_bits - 3
    noisy.check_budget(4, headroom=7.0)
    with pytest.raises(OverflowBudgetError, match="noise headroom"):
        plain.check_budget(4, headroom=7.0)
    with pytest.raises(ParameterError, match="headroom"):
        FixedPointCodec.for_clients(4, clip=1.0, headroom=float("nan"))


def test_noise_beyond_its_declared_bound_is_refused():
    class Liar(KnownNoise):
        def sample(self, length, scale_bits):
            return np.full(length, 10 * 2**scale_bits, dtype=np.int64)

    _assert_every_client_refuses(Liar(headroom=1.0), "declared bound")


def test_noise_of_the_wrong_type_is_refused():
    class Floats(KnownNoise):
        def sample(self, length, scale_bits):
            return np.zeros(length)

    _assert_every_client_refuses(Floats(headroom=1.0), "int64")


def _assert_every_client_refuses(noise, message: str) -> None:
    """Each client refuses to upload (a ParameterError it records), so the step cannot complete."""
    session = SecAggSession(3, 8, clip=1.0, protocol="secagg", noise=noise)
    with pytest.raises(TooFewSurvivorsError):
        session.step({c: np.zeros(8) for c in range(3)})
    refusals = session.network.refusals
    assert len(refusals) == 3
    assert all(isinstance(e, ParameterError) and message in str(e) for _, _, e in refusals)
