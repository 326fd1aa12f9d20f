"""Small transports for driving a SecAgg server in tests, and a client that lives in its state.

`DirectTransport` hands each request to its client in turn, with scripted silences and replies;
`Restoring` is a client rebuilt from its saved state for every message and saved again after,
as a Flower ClientApp in a fresh process per message is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from protocols.errors import ProtocolError
from protocols.secagg.client import SecAggClient
from protocols.session import Stage, stage_index
from protocols.transport import Delivery, Missed


class DirectTransport:
    """Delivers requests to `clients` at once. A client in `silent` ({client: (step, stage)})
    answers nothing from that point on; `replace` ({(step, stage, client): bytes}) is sent in
    place of that client's reply; a refusal comes back as an error reply."""

    def __init__(self, clients: Mapping[int, object], *,
                 silent: Mapping[int, tuple[int, Stage]] | None = None,
                 replace: Mapping[tuple[int, Stage, int], bytes] | None = None) -> None:
        self.clients = clients
        self.silent = {c: (s, stage_index(st)) for c, (s, st) in (silent or {}).items()}
        self.replace = dict(replace or {})
        self.stages: list[tuple[int, Stage]] = []  # every exchange's (step, stage), in order

    def exchange(self, requests: Mapping[int, bytes], *, step: int, stage: Stage) -> Delivery:
        self.stages.append((step, stage))
        replies: dict[int, bytes] = {}
        missed: list[Missed] = []
        for cid, payload in requests.items():
            point = self.silent.get(cid)
            if point is not None and (step, stage_index(stage)) >= point:
                missed.append(Missed(step, stage, cid, "no reply before the deadline"))
                continue
            try:
                reply = self.clients[cid].handle(payload)
            except ProtocolError as error:
                missed.append(Missed(step, stage, cid, f"error reply: {error}"))
                continue
            replies[cid] = self.replace.get((step, stage, cid), reply or b"")
        return Delivery(replies, tuple(missed))


class Restoring:
    """A client kept only as its saved state: restored before each message, saved after."""

    def __init__(self, provider: Callable[[int], np.ndarray], **options: object) -> None:
        self.provider = provider
        self.state = SecAggClient(provider, **options).to_state()  # type: ignore[arg-type]
        self.restores = 0

    def client(self) -> SecAggClient:
        client = SecAggClient.from_state(self.state, self.provider)
        assert client.to_state() == self.state  # nothing is lost or changed by a round trip
        self.restores += 1
        return client

    def handle(self, payload: bytes) -> bytes | None:
        client = self.client()
        reply = client.handle(payload)
        self.state = client.to_state()
        return reply
