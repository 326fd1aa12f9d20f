"""Shared helpers for driving SecAgg sessions in tests."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.codec import FixedPointCodec
from protocols.graph import complete_graph
from protocols.network import InProcessNetwork
from protocols.secagg.client import SecAggClient
from protocols.secagg.server import SecAggServer
from protocols.session import FaultPlan


class Inputs:
    """Per-client, per-step input vectors drawn once from a seeded numpy generator."""

    def __init__(self, n: int, m: int, steps: int, *, seed: int, clip: float = 1.0) -> None:
        rng = np.random.default_rng(seed)
        self.values = rng.uniform(-clip, clip, size=(steps + 1, n, m)).astype(np.float32)

    def provider(self, cid: int):
        return lambda step: self.values[step, cid]


def make_session(n: int, m: int, *, threshold: int, steps: int = 1, seed: int = 0,
                 graph=None, faults: FaultPlan | None = None, rounding: str = "nearest"):
    """A server, honest clients and a network, with the key setup already run."""
    codec = FixedPointCodec.for_clients(n, clip=1.0, rounding=rounding)
    inputs = Inputs(n, m, steps, seed=seed)
    server = SecAggServer(graph=graph or complete_graph(n), threshold=threshold, codec=codec,
                          vector_length=m)
    clients = {c: SecAggClient(inputs.provider(c)) for c in range(n)}
    network = InProcessNetwork(server, clients, faults=faults)
    return server, clients, network, inputs, codec


@pytest.fixture
def session5():
    """Five honest clients, complete graph, threshold 3, setup done."""
    server, clients, network, inputs, codec = make_session(5, 64, threshold=3, steps=4)
    network.setup()
    return server, clients, network, inputs, codec
