"""The CoDream ClientApp: one client per SuperNode, its partition named by the SuperNode's
node config (`partition-id`, `num-partitions`, optionally `data-dir`)."""

from __future__ import annotations

import dataclasses

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from ..errors import CoDreamError
from .client_role import ClientRole, ClientState, check_partition
from .payload import Reply, UndecodableReplyError
from .records import payload_from_content, reply_to_content
from .runconfig import simulation_config

__all__ = ["app"]

app = ClientApp()

_MODEL, _PROTOCOL = "codream.model", "codream.protocol"


def load_state(context: Context) -> ClientState:
    """The client's weights and protocol states from the SuperNode's context.state."""
    state = ClientState()
    if _MODEL in context.state.array_records:
        state.model = context.state.array_records[_MODEL].to_torch_state_dict()
    if _PROTOCOL in context.state.config_records:
        state.protocol = {k: v for k, v in context.state.config_records[_PROTOCOL].items()
                          if isinstance(v, bytes)}
    return state


def save_state(state: ClientState, context: Context) -> None:
    if state.model is not None:
        context.state.array_records[_MODEL] = ArrayRecord(torch_state_dict=state.model)
    context.state.config_records[_PROTOCOL] = ConfigRecord(dict(state.protocol))


def _answer(message: Message, context: Context) -> Reply:
    try:
        payload = payload_from_content(message.content)
        config = simulation_config(context.run_config)
        node = context.node_config
        partition = check_partition(config, node.get("partition-id"),
                                    node.get("num-partitions"))
        if node.get("data-dir"):
            config = dataclasses.replace(config, data=dataclasses.replace(
                config.data, data_dir=str(node["data-dir"])))
        state = load_state(context)
        reply = ClientRole(config, partition, state).handle(payload)
        save_state(state, context)
        return reply
    except (CoDreamError, UndecodableReplyError) as error:
        return Reply(refused=f"{type(error).__name__}: {error}")


@app.query("codream")
def codream(message: Message, context: Context) -> Message:
    """Every CoDream request: the action inside the message says what to do."""
    with torch.inference_mode(False):
        return Message(reply_to_content(_answer(message, context)), reply_to=message)
