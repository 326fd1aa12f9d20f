"""What the server sees of one client looks uniform and carries no trace of the input."""

from __future__ import annotations

import numpy as np
from scipy import stats

from protocols.secagg.messages import MaskedInput

from .conftest import make_session


def _masked_upload(m: int, value_of_client0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    server, clients, network, inputs, codec = make_session(3, m, threshold=2, steps=1)
    inputs.values[1, 0] = value_of_client0
    network.setup()
    requests = server.open_step()
    masked = MaskedInput.decode(clients[0].handle(requests[0])).vector
    return masked, codec.encode(value_of_client0)


def _chi_square_p(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    return float(stats.chisquare(counts).pvalue)


def test_masked_upload_bytes_are_uniform_even_for_a_constant_input():
    # p-value threshold 1e-4: a correct implementation fails this by chance once in 10,000 runs
    for value in (0.0, 0.75):
        masked, _ = _masked_upload(8192, np.full(8192, value, dtype=np.float32))
        assert _chi_square_p(masked.tobytes()) > 1e-4


def test_chi_square_detects_an_unmasked_vector():
    # the same test must fail on the plain encoding, or it proves nothing
    _, encoded = _masked_upload(8192, np.full(8192, 0.75, dtype=np.float32))
    assert _chi_square_p(encoded.tobytes()) < 1e-12


def test_masked_upload_is_uncorrelated_with_the_input():
    m = 20000
    x = np.random.default_rng(5).uniform(-1, 1, m).astype(np.float32)
    masked, encoded = _masked_upload(m, x)
    r = np.corrcoef(x.astype(np.float64), masked.astype(np.float64))[0, 1]
    # under independence r ~ N(0, 1/m); 4.5 standard deviations fail by chance ~1e-5 of the time
    assert abs(r) < 4.5 / np.sqrt(m)
    signed = encoded.view(np.int32).astype(np.float64)
    assert np.corrcoef(x, signed)[0, 1] > 0.99  # the unmasked encoding is of course correlated
