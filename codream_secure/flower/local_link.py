"""A Link whose clients answer in this process: each message builds a fresh ClientRole from
the client's saved state alone (as a Flower ClientApp in a fresh process would). A `fault`
hook silences or replaces chosen replies, for tests and for measuring the roles without a
network."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..config import SimulationConfig
from .client_role import ClientRole, ClientState
from .link import Answered, payload_size
from .payload import Payload, Reply

__all__ = ["Fault", "InProcessLink"]

# (client, payload, calls so far) -> None to answer normally, or a failure
Fault = Callable[[int, Payload, int], "str | Reply | None"]


@dataclass
class InProcessLink:
    """Every client answers in this process; `fault` may silence one (a string: the reason it
    missed) or replace its reply (a Reply). `bytes_up`/`bytes_down` count what a network would
    carry (arrays and byte strings)."""

    config: SimulationConfig
    fault: Fault | None = None
    states: dict[int, ClientState] = field(default_factory=dict)
    calls: int = 0
    log: list[tuple[int, str, str]] = field(default_factory=list)  # (client, action, purpose)
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    round_trip_seconds: float = 0.0

    @property
    def round_trips(self) -> int:
        return self.calls

    def call(self, payloads: Mapping[int, Payload], *, deadline: float) -> Answered:
        self.calls += 1
        began = time.perf_counter()
        replies: dict[int, Reply] = {}
        missed: dict[int, str] = {}
        for client, payload in payloads.items():
            self.log.append((client, payload.action, str(payload.values.get("purpose", ""))))
            self.bytes_down[client] = self.bytes_down.get(client, 0) + payload_size(payload)
            failure = self.fault(client, payload, self.calls) if self.fault else None
            if isinstance(failure, str):
                missed[client] = failure
                continue
            if isinstance(failure, Reply):
                replies[client] = failure
                continue
            state = self.states.setdefault(client, ClientState())
            replies[client] = reply = ClientRole(self.config, client, state).handle(payload)
            self.bytes_up[client] = self.bytes_up.get(client, 0) + payload_size(reply)
        self.round_trip_seconds += time.perf_counter() - began
        return Answered(replies, missed)
