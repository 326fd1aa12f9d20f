"""Echo ServerApp: pings every node for a few rounds and writes who answered to a JSON file.

Run config: ``result-path`` (where the JSON goes), ``num-nodes`` (how many nodes to wait for),
``rounds`` (round trips), ``wait-s`` (how long to wait for nodes and for each round's replies),
``poll-s`` (how often to pull replies; 0 uses ``Grid.send_and_receive``, which pulls every 3 s).
The run fails (the ServerApp raises) unless `num-nodes` nodes answered every round with distinct
partition-ids.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


class EchoFailed(RuntimeError):
    """Some node did not answer, or two nodes claimed the same partition."""


def _wait_for_nodes(grid: Grid, count: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count or time.monotonic() > deadline:
            return nodes
        time.sleep(0.2)


def _exchange(grid: Grid, messages: list[Message], wait_s: float, poll_s: float) -> list[Message]:
    """The replies that arrive within `wait_s`, pulled every `poll_s` seconds."""
    if not poll_s:
        return list(grid.send_and_receive(messages, timeout=wait_s))
    pending, replies = set(grid.push_messages(messages)), []
    deadline = time.monotonic() + wait_s
    while pending and time.monotonic() < deadline:
        time.sleep(poll_s)
        pulled = list(grid.pull_messages(pending))
        replies += pulled
        pending -= {reply.metadata.reply_to_message_id for reply in pulled}
    return replies


def _one_round(grid: Grid, nodes: list[int], round_: int, wait_s: float,
               poll_s: float) -> dict[int, dict]:
    """node id -> node config of every node that answered this round."""
    messages = [Message(RecordDict({"ping": ConfigRecord({"round": round_})}), node, "query")
                for node in nodes]
    answers: dict[int, dict] = {}
    for reply in _exchange(grid, messages, wait_s, poll_s):
        if not reply.has_error() and int(reply.content["pong"]["round"]) == round_:
            answers[reply.metadata.src_node_id] = dict(reply.content["node-config"])
    return answers


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Ping every node `rounds` times, write what came back and the timings; fail on a gap."""
    config = context.run_config
    count, rounds, wait_s = int(config["num-nodes"]), int(config["rounds"]), float(config["wait-s"])
    started_at, started = time.time(), time.monotonic()
    nodes = _wait_for_nodes(grid, count, wait_s)
    nodes_seen_s = time.monotonic() - started
    answers: dict[int, dict] = {}
    round_seconds = []
    for round_ in range(rounds):
        round_start = time.monotonic()
        answers = _one_round(grid, nodes, round_, wait_s, float(config["poll-s"]))
        round_seconds.append(time.monotonic() - round_start)
        if sorted(answers) != nodes:
            break
    partitions = {str(node): answer["partition-id"] for node, answer in answers.items()}
    result = {"node_ids": nodes, "partitions": partitions,
              "node_configs": {str(node): answer for node, answer in answers.items()},
              "started_at": started_at, "nodes_seen_s": nodes_seen_s,
              "round_seconds": round_seconds}
    Path(str(config["result-path"])).write_text(json.dumps(result, indent=1))
    if len(nodes) < count or sorted(answers) != nodes or len(set(partitions.values())) < count:
        raise EchoFailed(f"expected {count} distinct partitions, got {partitions} from {nodes}")
