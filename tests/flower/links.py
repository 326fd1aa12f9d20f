"""In-process Links for tests: each message builds a fresh ClientRole from the client's saved
state alone (as a Flower ClientApp in a fresh process would), with scripted failures."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from codream_secure.config import SimulationConfig
from codream_secure.flower.client_role import ClientRole, ClientState
from codream_secure.flower.link import Answered
from codream_secure.flower.payload import Payload, Reply

# (client, payload, calls so far) -> None to answer normally, or a failure
Fault = Callable[[int, Payload, int], "str | Reply | None"]


@dataclass
class InProcessLink:
    """Every client answers in this process; `fault` may silence one (a string: the reason it
    missed) or replace its reply (a Reply)."""

    config: SimulationConfig
    fault: Fault | None = None
    states: dict[int, ClientState] = field(default_factory=dict)
    calls: int = 0
    log: list[tuple[int, str, str]] = field(default_factory=list)  # (client, action, stage)

    def call(self, payloads: Mapping[int, Payload], *, deadline: float) -> Answered:
        self.calls += 1
        replies: dict[int, Reply] = {}
        missed: dict[int, str] = {}
        for client, payload in payloads.items():
            self.log.append((client, payload.action, str(payload.values.get("purpose", ""))))
            failure = self.fault(client, payload, self.calls) if self.fault else None
            if isinstance(failure, str):
                missed[client] = failure
                continue
            if isinstance(failure, Reply):
                replies[client] = failure
                continue
            state = self.states.setdefault(client, ClientState())
            replies[client] = ClientRole(self.config, client, state).handle(payload)
        return Answered(replies, missed)
