"""Flower 1.42 SecAgg+ baseline: the sum it returns, who is in it, and the costs it reports."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from codream_secure.audit.overhead.flower_secaggplus import FlowerRunResult, run_flower_secaggplus

N, M = 5, 1000
CLIP, QRANGE = 8.0, 2**22


def _tolerance(n: int, clip: float = CLIP, qrange: int = QRANGE) -> float:
    """Flower's worst-case sum error: under 1.125 quanta of 2c/Q per client (float32 inputs)."""
    return 1.125 * n * (2 * clip / qrange) + 1e-9


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    """Five float32 client vectors inside the clipping range, edges included."""
    rng = np.random.default_rng(7)
    vecs = rng.uniform(-CLIP, CLIP, size=(N, M)).astype(np.float32)
    vecs[0, :4] = [-CLIP, CLIP, 0.0, 1e-7]
    return vecs


def _check_costs(result: FlowerRunResult, m: int) -> None:
    """Bytes and timings are per client, positive, and the upload holds m+1 int64 values."""
    for arr in (result.client_seconds, result.bytes_up, result.bytes_down):
        assert arr.shape == (N,)
        assert np.all(arr > 0)
    assert result.server_seconds > 0
    assert np.all(result.bytes_up > 8 * (m + 1))


def test_sum_without_dropout(vectors: np.ndarray) -> None:
    """All five inputs are summed to within Flower's quantisation error."""
    result = run_flower_secaggplus(vectors, num_shares=5, reconstruction_threshold=3)
    assert result.included == tuple(range(N))
    assert result.sum.shape == (M,)
    exact = vectors.astype(np.float64).sum(axis=0)
    assert np.max(np.abs(result.sum - exact)) <= _tolerance(N)
    _check_costs(result, M)


def test_sum_with_dropout_after_upload(vectors: np.ndarray) -> None:
    """A client that drops after uploading stays in the sum; Flower rebuilds its self-mask."""
    result = run_flower_secaggplus(
        vectors, drop_after_upload=[2], num_shares=5, reconstruction_threshold=3
    )
    assert result.included == tuple(range(N))
    exact = vectors.astype(np.float64).sum(axis=0)
    assert np.max(np.abs(result.sum - exact)) <= _tolerance(N)
    _check_costs(result, M)
    others = [i for i in range(N) if i != 2]
    assert result.bytes_down[2] < result.bytes_down[others].min()


def test_sum_with_dropout_before_upload(vectors: np.ndarray) -> None:
    """A client that drops before uploading is left out; its pairwise masks are removed."""
    result = run_flower_secaggplus(
        vectors, drop_before_upload=[4], num_shares=5, reconstruction_threshold=3
    )
    assert result.included == (0, 1, 2, 3)
    exact = vectors[:4].astype(np.float64).sum(axis=0)
    assert np.max(np.abs(result.sum - exact)) <= _tolerance(4)
    assert result.bytes_up[4] < 8 * M


def test_rejects_bad_input(vectors: np.ndarray) -> None:
    """Non-float32 input and out-of-range dropouts are refused."""
    with pytest.raises(ValueError):
        run_flower_secaggplus(vectors.astype(np.float64), num_shares=5, reconstruction_threshold=3)
    with pytest.raises(ValueError):
        run_flower_secaggplus(
            vectors, drop_after_upload=[N], num_shares=5, reconstruction_threshold=3
        )
