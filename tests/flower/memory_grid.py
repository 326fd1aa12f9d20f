"""An in-memory Flower Grid for tests: messages go to ClientApps in this process, each node with
its own Context (so client state survives only in context.state), and scripted node failures."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE = 0

# (node, message count for that node) -> None (answer), "silent", "error" or "garbage"
Behaviour = Callable[[int, int], "str | None"]


@dataclass
class MemoryGrid(Grid):
    """Nodes 101, 102, ... serve partitions 0, 1, ...; `behaviour` scripts their failures."""

    client_app: object
    partitions: int
    run_config: dict
    behaviour: Behaviour | None = None
    node_config: dict = field(default_factory=dict)
    contexts: dict[int, Context] = field(default_factory=dict)
    replies: dict[str, Message] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1
        for k in range(self.partitions):
            node = 101 + k
            config = {"partition-id": k, "num-partitions": self.partitions, **self.node_config}
            self.contexts[node] = Context(run_id=1, node_id=node, node_config=config,
                                          state=RecordDict(), run_config=dict(self.run_config))

    # Grid's abstract interface
    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl,
                       group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = str(uuid.uuid4())
            message.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            node = message.metadata.dst_node_id
            self.counts[node] = self.counts.get(node, 0) + 1
            fate = self.behaviour(node, self.counts[node]) if self.behaviour else None
            if fate == "silent":
                continue
            TaskIdentity.node_id = node
            try:
                if fate == "error":
                    reply = Message(Error(code=5, reason="node unavailable"), reply_to=message)
                elif fate == "garbage":
                    reply = Message(RecordDict({"x": ConfigRecord({"y": 1})}),
                                    reply_to=message)
                else:
                    reply = self.client_app(message, self.contexts[node])
            finally:
                TaskIdentity.node_id = SERVER_NODE
            self.replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))
