"""report.json for a run over Flower: simulate's layout (so `codream-secure report` renders it),
the CoDream rows only (baselines need every client's data in one place), and a `runtime`
section naming the SuperNodes, the deadlines and every client that departed, when and why."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
import time

import torch

from ..simulation import SimulationOutcome, software_versions
from .server_role import RemoteFederation

__all__ = ["remote_outcome"]


def _aggregator(fed: RemoteFederation) -> dict:
    grad, labels = fed.grad_channel, fed.label_channel
    pairwise = grad.server is not None or labels.server is not None
    return {"name": fed.config.aggregation.aggregator,
            "threshold": grad.threshold if pairwise else None,
            "degree": grad.degree if pairwise else None,
            "ring_bits": fed.config.aggregation.ring_bits if pairwise else None,
            "scale_bits": {"dream": grad.server.codec.scale_bits,
                           "labels": labels.server.codec.scale_bits}
            if grad.server is not None and labels.server is not None else None,
            "error_bound_per_step": {"dream": grad.error_bound(), "labels": labels.error_bound()}
            if pairwise else None,
            "masking": {"dream": "host", "labels": "host"},
            "unmasking": {"dream": "host", "labels": "host"},
            # a plain reference would need the clients' vectors, which never leave them
            "measured": {"max_abs_error_vs_plain": None, "mean_abs_error_vs_plain": None,
                         "steps_compared": 0, "steps": grad.steps + labels.steps}}


def remote_outcome(fed: RemoteFederation, *, nodes: dict[int, int], started: dt.datetime,
                   clock: float) -> SimulationOutcome:
    """The report of a finished remote run, and its last dreams."""
    config, info = fed.config, fed.info
    assert info is not None
    finished = dt.datetime.now(dt.timezone.utc)
    report = {
        "schema_version": 1,
        "config": config.to_dict(),
        "versions": software_versions(),
        "seeds": {"seed": config.run.seed},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu",
                    "torch_threads": torch.get_num_threads(), "role": "Flower ServerApp"},
        "dataset": {"name": config.data.dataset, "source": "each SuperNode's own partition",
                    "train": sum(fed.train_sizes), "test": None,
                    "input_shape": list(info.input_shape), "num_classes": info.num_classes,
                    "client_sizes": fed.train_sizes,
                    "normalization": {"mean": list(info.mean), "std": list(info.std)}},
        "aggregator": _aggregator(fed),
        "privacy": {"enabled": False, "unit": None, "epsilon": None,
                    "per_round_epsilon": [None] * len(fed.rounds),
                    "note": "no differential privacy: secure aggregation hides individual "
                            "vectors from the server but every released sum is exact"},
        "rounds": [r.to_dict() for r in fed.rounds],
        "final": {"codream": fed.result.summary()},
        "baseline_curves": {},
        "runtime": {"name": "flower", "supernodes": {str(c): n for c, n in nodes.items()},
                    "deadlines_seconds": {"protocol": fed.deadlines.protocol,
                                          "work": fed.deadlines.work},
                    "departures": fed.departures,
                    "round_trips": getattr(fed.link, "round_trips", None),
                    "round_trip_seconds": getattr(fed.link, "round_trip_seconds", None),
                    "survivors": sorted(fed.alive)},
        "timing": {"total_seconds": time.perf_counter() - clock,
                   "started": started.isoformat(), "finished": finished.isoformat(),
                   "resumed": False},
        "command": " ".join(sys.argv),
    }
    dreams = fed.last_dreams if fed.last_dreams is not None \
        else torch.zeros(0, *info.input_shape)
    return SimulationOutcome(report, dreams.cpu().numpy(), tuple(info.mean), tuple(info.std))
