"""The CoDream ServerApp: finds one SuperNode per partition, runs CoDream-fast with them and
writes simulate's report folder at [run] out on the machine that runs the ServerApp."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..errors import CoDreamError
from ..out_folder import check_output_folder, make_output_folder
from ..report import REPORT_FILES, write_report
from .link import GridLink
from .payload import Payload, Reply, UndecodableReplyError
from .run import run_remote
from .runconfig import FlowerRunOptions

__all__ = ["app", "discover_partitions"]

app = ServerApp()


class NodesError(CoDreamError):
    """The SuperNodes do not serve the run's partitions."""


def discover_partitions(grid: Grid, clients: int, *, wait: float, deadline: float,
                        poll: float = 0.5) -> tuple[dict[int, int], dict[int, Reply]]:
    """partition id -> node id, from each connected SuperNode's answer to a hello (also
    returned, by partition); waits up to `wait` seconds for `clients` SuperNodes. Partitions
    nobody serves are missing from both."""
    end = time.monotonic() + wait
    nodes = list(grid.get_node_ids())
    while len(nodes) < clients and time.monotonic() < end:
        time.sleep(poll)
        nodes = list(grid.get_node_ids())
    link = GridLink(grid, {node: node for node in nodes})
    answered = link.call({node: Payload("hello") for node in nodes}, deadline=deadline)
    found: dict[int, int] = {}
    hellos: dict[int, Reply] = {}
    for node, why in sorted(answered.missed.items()):
        print(f"SuperNode {node} left out: {why}", flush=True)
    for node, reply in sorted(answered.replies.items()):
        try:
            if reply.refused:
                raise UndecodableReplyError(reply.refused)
            partition = int(reply.value("partition", int))
        except UndecodableReplyError as error:
            print(f"SuperNode {node} left out: {error}", flush=True)
            continue
        if partition in found:
            raise NodesError(f"SuperNodes {found[partition]} and {node} both serve "
                             f"partition-id {partition}")
        found[partition], hellos[partition] = node, reply
    if len(found) < 2:
        raise NodesError(f"{len(found)} SuperNode(s) answered for this run's {clients} "
                         f"partitions within {wait:g} s; CoDream needs at least 2")
    return found, hellos


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run CoDream-fast over the grid and write the report."""
    options = FlowerRunOptions.from_run_config(context.run_config)
    config = options.config
    if config.run.baselines:  # they need every client's data in one place
        print(f"[run] baselines {', '.join(config.run.baselines)} are not run on Flower; the "
              "report has CoDream only", flush=True)
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, baselines=()))
    out = Path(config.run.out)
    check_output_folder(out, REPORT_FILES)
    nodes, hellos = discover_partitions(grid, config.data.clients,
                                        wait=options.wait_for_nodes,
                                        deadline=options.deadlines.work)
    link = GridLink(grid, nodes)
    outcome = run_remote(config, link, nodes=nodes, deadlines=options.deadlines,
                         progress=_PrintProgress(), hellos=hellos)
    make_output_folder(out)
    write_report(outcome, out)
    print(f"report written to {out}")


class _PrintProgress:
    """Round lines and departures on the ServerApp's log."""

    def log(self, text: str) -> None:
        print(text, flush=True)
