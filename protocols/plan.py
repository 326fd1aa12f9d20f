"""Parameter planning, once: threshold, graph degree, ring and scale bits of a session.

An aggregator's spec (protocols.registry) turns its choices into one frozen `AggregationPlan`;
the session, DP planning and the run configuration all read that plan instead of re-deriving it.
The (k, t) search for sparse graphs lives in protocols.graph and is called from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .codec import FixedPointCodec
from .graph import (
    COMPLETE_GRAPH_BELOW,
    NeighbourGraph,
    choose_parameters,
    complete_graph,
    harary_graph,
)

__all__ = [
    "MIN_EXPECTED_DROPOUT",
    "PLAIN_NOISE_SCALE_BITS",
    "AggregationPlan",
    "majority_threshold",
    "mask_graph",
    "mask_graph_parameters",
]

PLAIN_NOISE_SCALE_BITS = 24  # local noise in the clear is drawn on a 2^-24 grid
MIN_EXPECTED_DROPOUT = 0.05  # a registry session sizes its SecAgg+ graph for at least 5% dropout


def majority_threshold(n_clients: int) -> int:
    """A majority of the other n - 1 clients on the complete graph: t = floor((n - 1) / 2) + 1."""
    return (n_clients - 1) // 2 + 1


def mask_graph_parameters(n_clients: int, *, sparse: bool, threshold: int | None = None,
                          degree: int | None = None, expected_dropout: float = 0.1,
                          corrupt_rate: float = 0.05) -> tuple[int | None, int]:
    """(Harary degree, or None for the complete graph; share threshold), without any graph.

    `sparse` (SecAgg+) lets the (k, t) search of protocols.graph pick a sparse graph.
    """
    small = n_clients < COMPLETE_GRAPH_BELOW and degree is None
    if not sparse or degree == n_clients - 1 or small:
        # SecAgg+ uses the complete graph for small n anyway (it costs no more); the
        # majority threshold then applies, as for SecAgg.
        return None, _given(threshold, majority_threshold(n_clients))
    if degree is not None:
        return degree, _given(threshold, degree // 2 + 1)
    params = choose_parameters(n_clients, dropout_rate=expected_dropout,
                               corrupt_rate=corrupt_rate)
    return (None if params.complete else params.degree), _given(threshold, params.threshold)


def mask_graph(n_clients: int, *, sparse: bool, threshold: int | None = None,
               degree: int | None = None, expected_dropout: float = 0.1,
               corrupt_rate: float = 0.05) -> tuple[NeighbourGraph, int]:
    """The neighbour graph and share threshold a SecAgg/SecAgg+ session of n clients uses."""
    sparse_degree, threshold = mask_graph_parameters(
        n_clients, sparse=sparse, threshold=threshold, degree=degree,
        expected_dropout=expected_dropout, corrupt_rate=corrupt_rate)
    if sparse_degree is None:
        return complete_graph(n_clients), threshold
    return harary_graph(n_clients, sparse_degree, seed=os.urandom(32)), threshold


def _given(threshold: int | None, default: int) -> int:
    """The caller's threshold (0 included, which the server refuses), else the default."""
    return default if threshold is None else threshold


@dataclass(frozen=True)
class AggregationPlan:
    """The parameters one session of an aggregator runs with, decided before it opens.

    `threshold` is the Shamir threshold (SecAgg), the key holder's decryption quorum (Paillier)
    or 1 (nothing enforced); `degree` the neighbours each client masks with (n - 1: the complete
    graph); `min_contributors` the fewest client vectors a released sum can hold, which
    distributed DP noise must be sized for. `fixed_point`: inputs are clipped and encoded in the
    ring Z_2^ring_bits (else they travel as floats).
    """

    aggregator: str
    n_clients: int
    threshold: int
    degree: int
    min_contributors: int
    ring_bits: int = 32
    fixed_point: bool = True

    @property
    def complete_graph(self) -> bool:
        return self.degree >= self.n_clients - 1

    def scale_bits(self, *, clip: float, headroom: float = 0.0) -> int | None:
        """The fixed-point precision a session encodes at (None: floats, no grid).

        Float sums go on a 2^-24 grid only when clients add lattice noise (`headroom` > 0).
        """
        if not self.fixed_point:
            return PLAIN_NOISE_SCALE_BITS if headroom > 0 else None
        return FixedPointCodec.for_clients(self.n_clients, clip=clip, ring_bits=self.ring_bits,
                                           headroom=headroom).scale_bits
