"""Shared helpers for driving SecAgg and Paillier sessions in tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from protocols.codec import FixedPointCodec
from protocols.graph import complete_graph
from protocols.network import InProcessNetwork
from protocols.paillier.session import generate_keypair, unsafe_keypair_from_primes
from protocols.secagg.client import SecAggClient
from protocols.secagg.messages import ConsistencyReply, ConsistencyRequest
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
                 graph=None, faults: FaultPlan | None = None, rounding: str = "nearest",
                 threat_model: str = "active"):
    """A server, honest clients and a network, with the key setup already run."""
    codec = FixedPointCodec.for_clients(n, clip=1.0, rounding=rounding)
    inputs = Inputs(n, m, steps, seed=seed)
    server = SecAggServer(graph=graph or complete_graph(n), threshold=threshold, codec=codec,
                          vector_length=m, threat_model=threat_model)
    clients = {c: SecAggClient(inputs.provider(c), threat_model=threat_model)
               for c in range(n)}
    network = InProcessNetwork(server, clients, faults=faults)
    return server, clients, network, inputs, codec


@pytest.fixture
def session5():
    """Five honest clients, complete graph, threshold 3, setup done."""
    server, clients, network, inputs, codec = make_session(5, 64, threshold=3, steps=4)
    network.setup()
    return server, clients, network, inputs, codec


def confirm(session_id: bytes, clients, step: int, members, dropped=frozenset()):
    """Run the consistency round on `members` (nobody dropped unless told): (owner, holder) ->
    token, as an honest server would collect them."""
    tokens = {}
    for c in members:
        reply = ConsistencyReply.decode(clients[c].handle(
            ConsistencyRequest(session_id, step, frozenset(dropped)).encode()))
        tokens.update({(c, holder): token for holder, token in reply.tokens.items()})
    return tokens


def tap_wire(network: InProcessNetwork) -> list[bytes]:
    """Every request and reply `network` carries from now on, in order (a test's wiretap)."""
    wire: list[bytes] = []
    exchange = network.exchange

    def tapped(requests, **where):
        delivery = exchange(requests, **where)
        wire.extend([*requests.values(), *(r for r in delivery.replies.values() if r)])
        return delivery

    network.exchange = tapped
    return wire


def known_answer_keypair():
    """The 256-bit Paillier keypair of tests/vectors/paillier_packed.json (tests only)."""
    vectors = json.loads((Path(__file__).parents[1] / "vectors" / "paillier_packed.json")
                         .read_text())
    return unsafe_keypair_from_primes(int(vectors["p"], 16), int(vectors["q"], 16))


@pytest.fixture(scope="session")
def keypair2048():
    """One 2048-bit Paillier keypair, the smallest the safe path accepts, drawn once."""
    return generate_keypair(2048)
