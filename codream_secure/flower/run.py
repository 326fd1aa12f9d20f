"""A whole CoDream-fast run whose clients answer over a Link: connect, warm up, rounds, report."""

from __future__ import annotations

import datetime as dt
import time

from ..config import SimulationConfig
from ..simulation import SimulationOutcome
from .link import Link
from .payload import Reply
from .report import remote_outcome
from .server_role import Deadlines, RemoteFederation

__all__ = ["run_remote"]


def run_remote(config: SimulationConfig, link: Link, *, nodes: dict[int, int],
               deadlines: Deadlines | None = None, progress=None,
               hellos: dict[int, Reply] | None = None) -> SimulationOutcome:
    """Run every round with the clients behind `link` (`nodes`: client -> SuperNode id, for
    the report; `hellos`: the clients' answers to a hello already sent) and return the report
    and the last dreams."""
    started, clock = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    fed = RemoteFederation(config, link, deadlines=deadlines, progress=progress)
    fed.connect(hellos)
    warm = fed.warm_up()
    if progress:
        progress.log(f"warm-up: mean client accuracy {sum(warm.test) / len(warm.test):.3f}")
    for round_index in range(1, config.codream.rounds + 1):
        record = fed.run_round(round_index)
        if progress:
            progress.log(f"round {round_index}: mean client accuracy "
                         f"{sum(record.test) / len(record.test):.3f}")
    return remote_outcome(fed, nodes=nodes, started=started, clock=clock)
