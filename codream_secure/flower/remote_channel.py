"""Sums of vectors the clients compute themselves, over a Link: SecAgg / SecAgg+ sessions run
by the protocol layer's own server state machine and drivers, or a plain sum.

The channel sends each client the work its input comes from (with the upload request of a
secure step), so a vector never exists outside its client unmasked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protocols.errors import ConsistencyAbortError, TooFewSurvivorsError
from protocols.secagg.server import SecAggServer
from protocols.secagg.session import pairwise_server
from protocols.session import Stage
from protocols.transport import Delivery, Missed, run_setup, run_step

from ..config import AggregationConfig
from ..errors import ConfigError
from .link import Link
from .payload import Payload, UndecodableReplyError

__all__ = ["FLOWER_AGGREGATORS", "Departure", "LinkTransport", "RemoteChannel"]

FLOWER_AGGREGATORS = ("plain", "secagg", "secagg+")


@dataclass(frozen=True)
class Departure:
    """A client that gave no usable reply: where (purpose, protocol step, stage) and why."""

    client: int
    purpose: str
    step: int | None
    stage: str
    reason: str


class LinkTransport:
    """protocols.transport.Transport over a Link for one session: session index i is client
    `clients[i]`; the upload stage's requests carry `work` (values, arrays)."""

    def __init__(self, link: Link, clients: Sequence[int], *, purpose: str,
                 deadline: float) -> None:
        self.link, self.clients, self.purpose, self.deadline = link, list(clients), purpose, \
            deadline
        self._index = {c: i for i, c in enumerate(self.clients)}
        self.work: tuple[dict, dict] = ({}, {})

    def exchange(self, requests, *, step: int, stage: Stage) -> Delivery:
        values, arrays = self.work if stage is Stage.UPLOAD else ({}, {})
        payloads = {self.clients[i]: Payload("secure", {"purpose": self.purpose, "request": data,
                                                        **values}, arrays)
                    for i, data in requests.items()}
        answered = self.link.call(payloads, deadline=self.deadline)
        replies: dict[int, bytes] = {}
        missed = [Missed(step, stage, self._index[c], why) for c, why in answered.missed.items()]
        for client, reply in answered.replies.items():
            index = self._index[client]
            if reply.refused:
                missed.append(Missed(step, stage, index, f"refused: {reply.refused}"))
                continue
            try:
                data = reply.value("reply", bytes)
            except UndecodableReplyError as error:
                missed.append(Missed(step, stage, index, f"undecodable reply: {error}"))
                continue
            assert isinstance(data, bytes)
            replies[index] = data
        return Delivery(replies, tuple(missed))


class RemoteChannel:
    """One kind of sum (generator updates or soft labels): a session per `open`, a step per
    `sum`; who gave no usable reply is in `departures`."""

    def __init__(self, aggregation: AggregationConfig, *, clip: float, purpose: str,
                 link: Link, deadline: float) -> None:
        if aggregation.aggregator not in FLOWER_AGGREGATORS:
            raise ConfigError(f"[aggregation] aggregator = {aggregation.aggregator!r} does not "
                              f"run on Flower; choose one of {', '.join(FLOWER_AGGREGATORS)}")
        self.aggregation, self.clip, self.purpose = aggregation, clip, purpose
        self.link, self.deadline = link, deadline
        self.spec = aggregation.spec()
        self.departures: list[Departure] = []
        self.clients: list[int] = []
        self.server: SecAggServer | None = None
        self.transport: LinkTransport | None = None
        self.steps = 0

    def _depart(self, missed: Sequence[Missed]) -> None:
        for m in missed:
            self.departures.append(Departure(self.clients[m.client], self.purpose, m.step,
                                             m.stage.value, m.reason))

    def open(self, clients: Sequence[int], vector_length: int) -> None:
        """A session over `clients` for vectors of this length: the open one when it has exactly
        these clients active and this length (key setups cost two round trips; every secret a
        step reveals is specific to that step), else a fresh one, key setup included."""
        if self.aggregation.aggregator == "plain":
            self.clients, self.vector_length = sorted(clients), vector_length
            return
        if len(clients) < 2:
            raise TooFewSurvivorsError(needed=2, remaining=len(clients),
                                       context=f"the {self.purpose} session's key setup")
        if self.server is not None and vector_length == self.vector_length and \
                {self.clients[i] for i in self.server.active} == set(clients):
            return
        self.clients, self.vector_length = sorted(clients), vector_length
        n = len(self.clients)
        plan = self.spec.plan(n, expected_dropout=self.aggregation.dropout_rate,
                              ring_bits=self.aggregation.ring_bits)
        self.server = pairwise_server(n, vector_length, clip=self.clip,
                                      sparse=self.spec.sparse_graph, threshold=plan.threshold,
                                      degree=plan.degree, ring_bits=plan.ring_bits,
                                      expected_dropout=self.aggregation.dropout_rate,
                                      threat_model=self.aggregation.threat_model)
        self.transport = LinkTransport(self.link, self.clients, purpose=self.purpose,
                                       deadline=self.deadline)
        missed: list[Missed] = []
        try:
            run_setup(self.server, self.transport, missed=missed)
        finally:
            self._depart(missed)

    @property
    def threshold(self) -> int | None:
        return None if self.server is None else self.server.threshold

    @property
    def degree(self) -> int | None:
        return None if self.server is None else self.server.graph.degree

    def error_bound(self) -> float | None:
        """Worst-case per-coordinate decode error of one sum (None for a plain sum)."""
        return None if self.server is None else self.server.codec.error_bound(len(self.clients))

    def sum(self, values: dict, arrays: dict[str, np.ndarray]
            ) -> tuple[np.ndarray, frozenset[int]]:
        """The sum of the clients' inputs computed from (values, arrays), and who is in it."""
        self.steps += 1
        if self.server is None:
            return self._plain_sum(values, arrays)
        assert self.transport is not None
        self.transport.work = (values, arrays)
        missed: list[Missed] = []  # filled as it happens, so an abort loses none of it
        try:
            while True:
                try:
                    outcome, _ = run_step(self.server, self.transport, missed=missed)
                    break
                except ConsistencyAbortError:
                    # nothing of the aborted step was unmasked; retry with fresh secrets
                    self.server.abandon_step()
        except TooFewSurvivorsError:
            self.server.abandon_step()
            raise
        finally:
            self.transport.work = ({}, {})
            self._depart(missed)
        return outcome.total, frozenset(self.clients[i] for i in outcome.included)

    def _plain_sum(self, values: dict, arrays: dict[str, np.ndarray]
                   ) -> tuple[np.ndarray, frozenset[int]]:
        payloads = {c: Payload("plain", {"purpose": self.purpose, **values}, arrays)
                    for c in self.clients}
        answered = self.link.call(payloads, deadline=self.deadline)
        vectors: dict[int, np.ndarray] = {}
        for client, why in answered.missed.items():
            self.departures.append(Departure(client, self.purpose, None, "upload", why))
        for client, reply in answered.replies.items():
            try:
                if reply.refused:
                    raise UndecodableReplyError(f"refused: {reply.refused}")
                vector = reply.array("vector", dtype=np.float32, size=self.vector_length)
                if not np.isfinite(vector).all():
                    raise UndecodableReplyError("the vector holds NaN or inf")
            except UndecodableReplyError as error:
                self.departures.append(Departure(client, self.purpose, None, "upload",
                                                 str(error)))
                continue
            vectors[client] = vector
        if not vectors:
            raise TooFewSurvivorsError(needed=1, remaining=0, context=f"the {self.purpose} sum")
        self.clients = sorted(vectors)
        total = np.sum([vectors[c] for c in self.clients], axis=0, dtype=np.float64)
        return total, frozenset(self.clients)
