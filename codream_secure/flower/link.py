"""Requests to clients and the replies that came back before a deadline: the one operation the
CoDream server needs of a network. GridLink runs it over a Flower Grid."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from .payload import Payload, Reply, UndecodableReplyError

__all__ = ["Answered", "GridLink", "Link"]

MESSAGE_TYPE = "query.codream"


@dataclass(frozen=True)
class Answered:
    """The replies that arrived in time, and why each other client gave none."""

    replies: dict[int, Reply]
    missed: dict[int, str]


class Link(Protocol):
    """Send one payload per client; return the replies that arrived before `deadline` s."""

    def call(self, payloads: Mapping[int, Payload], *, deadline: float) -> Answered: ...


class GridLink:
    """A Link over a Flower Grid: push every message, then pull every `poll` seconds until all
    replies are in or the deadline passes (Flower's own send_and_receive has no deadline by
    default, and a dead SuperNode is reported only after its heartbeats run out)."""

    def __init__(self, grid: object, nodes: Mapping[int, int], *, poll: float = 0.02,
                 clock=time.monotonic, sleep=time.sleep) -> None:
        """`nodes` maps each client id to its SuperNode's node id."""
        self.grid, self.nodes, self.poll = grid, dict(nodes), poll
        self._clock, self._sleep = clock, sleep
        self.bytes_down: dict[int, int] = {}
        self.bytes_up: dict[int, int] = {}
        self.round_trips = 0
        self.round_trip_seconds = 0.0  # wall time from the first push to the last reply

    def call(self, payloads: Mapping[int, Payload], *, deadline: float) -> Answered:
        from flwr.app import Message

        from .records import payload_to_content, reply_from_content

        began = self._clock()
        messages = {}
        for client, payload in payloads.items():
            messages[client] = Message(payload_to_content(payload),
                                       dst_node_id=self.nodes[client], message_type=MESSAGE_TYPE,
                                       ttl=max(deadline, 1.0) + 60, group_id="codream")
            self.bytes_down[client] = self.bytes_down.get(client, 0) + payload_size(payload)
        stored = set(self.grid.push_messages(list(messages.values())))
        # the grid sets each message's id as it pushes it, and returns those it accepted
        ids = {m.metadata.message_id: c for c, m in messages.items()
               if m.metadata.message_id in stored}
        replies: dict[int, Reply] = {}
        missed = {c: "the grid did not accept the request" for c in messages
                  if c not in ids.values()}
        end = self._clock() + deadline
        pending = set(ids)
        while pending:
            for message in self.grid.pull_messages(list(pending)):
                message_id = message.metadata.reply_to_message_id
                client = ids.get(message_id)
                if client is None or message_id not in pending:
                    continue
                pending.discard(message_id)
                if message.has_error():
                    missed[client] = f"error reply: {message.error.reason or message.error.code}"
                    continue
                try:
                    reply = reply_from_content(message.content)
                except UndecodableReplyError as error:
                    missed[client] = f"undecodable reply: {error}"
                    continue
                self.bytes_up[client] = self.bytes_up.get(client, 0) + payload_size(reply)
                replies[client] = reply
            if not pending or self._clock() >= end:
                break
            self._sleep(self.poll)
        for message_id in pending:
            missed[ids[message_id]] = f"no reply before the {deadline:g} s deadline"
        self.round_trips += 1
        self.round_trip_seconds += self._clock() - began
        return Answered(replies, missed)


def payload_size(item: Payload | Reply) -> int:
    """Bytes of a payload's or reply's arrays and byte strings (what dominates the wire)."""
    arrays = sum(a.nbytes for a in item.arrays.values())
    return arrays + sum(len(v) for v in item.values.values() if isinstance(v, bytes))
