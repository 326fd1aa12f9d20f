"""Echo ClientApp: answers every query with the node's config (partition-id included)."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def echo(message: Message, context: Context) -> Message:
    """Reply with the round the server asked about and this node's whole node config."""
    pong = ConfigRecord({"round": int(message.content["ping"]["round"])})
    node_config = ConfigRecord(dict(context.node_config))
    return Message(RecordDict({"pong": pong, "node-config": node_config}), reply_to=message)
