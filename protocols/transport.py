"""One transport interface: send one request per client, get the replies that came in time.

The same SecAgg server state machine runs over any transport (the in-process router of
protocols/network.py, Flower's grid): `run_setup` and `run_step` carry its requests and feed it
the replies. They know nothing of time or faults: a transport decides what "in time" means and
says, in `Delivery.missed`, who sent nothing usable and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from .errors import MalformedMessageError, StageError
from .secagg.messages import (
    ConsistencyRequest,
    DropRequest,
    Roster,
    SessionOffer,
    ShareRequest,
    StepRequest,
)
from .secagg.server import SecAggServer
from .session import Stage, StepOutcome
from .wire import message_type

__all__ = ["Delivery", "Missed", "Transport", "run_setup", "run_step", "stage_of_request"]

# request type code -> the stage a client answering it is in
_REQUEST_STAGE = {
    SessionOffer.TYPE: Stage.ADVERTISE, Roster.TYPE: Stage.ROSTER, StepRequest.TYPE: Stage.UPLOAD,
    DropRequest.TYPE: Stage.PAIRWISE, ConsistencyRequest.TYPE: Stage.CONSISTENCY,
    ShareRequest.TYPE: Stage.SHARES,
}
_NO_REPLY_DUE = frozenset({Stage.ROSTER})  # a roster is answered with nothing


@dataclass(frozen=True)
class Missed:
    """A client that sent no usable reply to one request, and why."""

    step: int  # 0 = key setup
    stage: Stage  # the stage of the request
    client: int
    reason: str  # e.g. "no reply before the 5.0 s deadline", "error reply: node unavailable"


@dataclass(frozen=True)
class Delivery:
    """What came back from one exchange: the replies that arrived in time, and who missed."""

    replies: dict[int, bytes]  # client -> reply; b"" is an answer with no reply due (a roster)
    missed: tuple[Missed, ...]


class Transport(Protocol):
    """Send one request per client; return the replies that arrived before the stage's deadline."""

    def exchange(self, requests: Mapping[int, bytes], *, step: int, stage: Stage) -> Delivery: ...


def stage_of_request(payload: bytes) -> Stage:
    """The stage a client answering this server request is in, by its wire message type."""
    code = message_type(payload)  # refuses what is not a framed message
    stage = _REQUEST_STAGE.get(code)
    if stage is None:
        raise MalformedMessageError(f"message type {code} is not a server request")
    return stage


def _batch_stage(requests: Mapping[int, bytes]) -> Stage | None:
    """The one stage of a batch of requests (None when it is empty)."""
    stages = {stage_of_request(payload) for payload in requests.values()}
    if not stages:
        return None
    if len(stages) > 1:
        raise StageError(f"one exchange must carry requests of one stage, got "
                         f"{sorted(s.value for s in stages)}")
    return stages.pop()


class _Round:
    """The drivers' bookkeeping: who missed what (also into the caller's `sink`, so what
    happened before a TooFewSurvivorsError or ConsistencyAbortError is not lost)."""

    def __init__(self, server: SecAggServer, transport: Transport,
                 sink: list[Missed] | None) -> None:
        self.server, self.transport, self.sink = server, transport, sink
        self.missed: list[Missed] = []

    def note(self, entry: Missed) -> None:
        self.missed.append(entry)
        if self.sink is not None:
            self.sink.append(entry)

    def exchange(self, requests: Mapping[int, bytes],
                 step: int) -> tuple[Stage | None, dict[int, bytes]]:
        """The stage of `requests` and the non-empty replies of the clients asked."""
        stage = _batch_stage(requests)
        if stage is None:
            return None, {}  # nobody asked: nothing to send, nothing missed
        delivery = self.transport.exchange(requests, step=step, stage=stage)
        told = set()
        for entry in delivery.missed:
            self.note(entry)
            told.add(entry.client)
        usable = {}
        for cid in requests:
            reply = delivery.replies.get(cid)
            if reply:
                usable[cid] = reply
            elif reply is not None and stage in _NO_REPLY_DUE:
                continue  # answered, as it should, with nothing
            elif cid not in told:
                why = "no reply" if reply is None else "an empty reply where one was due"
                self.note(Missed(step, stage, cid, why))
        return stage, usable

    def receive(self, requests: Mapping[int, bytes], step: int) -> dict[int, bytes] | StepOutcome:
        """Send `requests`, feed the server the replies; a reply it rejects counts as missed."""
        stage, replies = self.exchange(requests, step)
        before = len(self.server.rejections)
        try:
            return self.server.receive(replies)
        finally:
            for _, cid, error in self.server.rejections[before:]:
                if stage is not None:  # only replies are rejected, and they answer requests
                    self.note(Missed(step, stage, cid, f"rejected by the server: {error}"))


def run_setup(server: SecAggServer, transport: Transport, *,
              missed: list[Missed] | None = None) -> list[Missed]:
    """Offer the session, collect the key advertisements, deliver the rosters (step 0).

    Returns who missed what; each entry is also appended to `missed` when given, as it happens.
    """
    round_ = _Round(server, transport, missed)
    rosters = round_.receive(server.open_session(), 0)
    if not isinstance(rosters, dict):
        raise StageError("the key stage ended in a step outcome instead of rosters")
    round_.exchange(rosters, 0)  # rosters need no reply
    return round_.missed


def run_step(server: SecAggServer, transport: Transport, *,
             missed: list[Missed] | None = None) -> tuple[StepOutcome, list[Missed]]:
    """Open the server's next step and run it to its outcome, with who missed what.

    TooFewSurvivorsError and ConsistencyAbortError propagate (the caller abandons the step);
    entries noted before them are in `missed` when given.
    """
    round_ = _Round(server, transport, missed)
    requests = server.open_step()
    step = server.last_step
    while True:
        result = round_.receive(requests, step)
        if isinstance(result, StepOutcome):
            return result, round_.missed
        requests = result
