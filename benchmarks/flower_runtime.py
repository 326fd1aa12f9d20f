"""CoDream-fast in one process, through the Flower roles, in Flower's simulation runtime and in a
Flower deployment on loopback: seconds per round trip and per round, bytes per client.

    OMP_NUM_THREADS=1 python benchmarks/flower_runtime.py --out docs/results/flower-runtime

One config for every runtime (the embedded digits, --clients clients on smallcnn, SecAgg,
generator dreams with --batches dream batches a round, --rounds rounds). The runtimes:
  simulate     codream-secure simulate's federation, every client in one process
  roles        the Flower app's ClientRole and RemoteFederation behind an in-process link: the
               same messages and state handling, no Flower
  simulation   Flower's simulation runtime (flower-superlink --simulation, Ray), on loopback
  deployment   a SuperLink and one flower-supernode process per client, on loopback
Writes results.json and results.md into --out; the runs' report folders go below it.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from codream_secure.audit.reporting import environment, write_json, write_text
from codream_secure.config import SimulationConfig
from codream_secure.flower.local_link import InProcessLink
from codream_secure.flower.local_run import deploy_local
from codream_secure.flower.run import run_remote
from codream_secure.flower.server_role import Deadlines
from codream_secure.simulation import run_simulation

RUNTIMES = ("simulate", "roles", "simulation", "deployment")


def _config(args: argparse.Namespace, out: Path) -> SimulationConfig:
    return SimulationConfig.from_keys(
        clients=args.clients, models=("smallcnn",), server_model="smallcnn",
        rounds=args.rounds, warmup_epochs=2, local_epochs=1, dream_mode="generator",
        generator_batches=args.batches, aggregator="secagg", baselines=(), threads=1,
        partition="iid", out=str(out))


def _run(runtime: str, config: SimulationConfig) -> tuple[dict, float]:
    """The run's report and its wall-clock seconds."""
    began = time.perf_counter()
    if runtime == "simulate":
        report = run_simulation(config).report
    elif runtime == "roles":
        link = InProcessLink(config)
        report = run_remote(config, link, nodes={c: c for c in range(config.data.clients)},
                            deadlines=Deadlines()).report
    else:
        import json

        out = deploy_local(config, deadlines=Deadlines(protocol=60, work=600),
                           simulation=runtime == "simulation", echo=lambda _: None)
        report = json.loads((out / "report.json").read_text())
    return report, time.perf_counter() - began


def _row(runtime: str, report: dict, wall: float) -> dict:
    rounds = [r for r in report["rounds"] if r["round"] >= 1]
    per_round = [sum(r["seconds"].values()) for r in rounds]
    up = np.mean([np.mean(r["bytes_up"]) for r in rounds])
    down = np.mean([np.mean(r["bytes_down"]) for r in rounds])
    runtime_info = report.get("runtime") or {}
    trips = runtime_info.get("round_trips")
    trip_seconds = runtime_info.get("round_trip_seconds")
    return {"runtime": runtime, "wall_seconds": wall,
            "seconds_per_round": float(np.mean(per_round)),
            "round_trips": trips,
            "seconds_per_round_trip": None if not trips else trip_seconds / trips,
            "bytes_up_per_client_round": float(up), "bytes_down_per_client_round": float(down),
            "final_mean_accuracy": report["final"]["codream"]["mean_accuracy"],
            "departures": len(runtime_info.get("departures") or [])}


def _markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"CoDream-fast, digits, {args.clients} clients (smallcnn), SecAgg, {args.batches} "
             f"dream batches a round, {args.rounds} rounds.", "",
             "| runtime | s per round | round trips (run) | s per round trip | KB up / down "
             "per client and round | final accuracy |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        trip = row["seconds_per_round_trip"]
        lines.append(
            f"| {row['runtime']} | {row['seconds_per_round']:.1f} | "
            f"{row['round_trips'] if row['round_trips'] is not None else '-'} | "
            f"{'-' if trip is None else f'{trip:.2f}'} | "
            f"{row['bytes_up_per_client_round'] / 1e3:.0f} / "
            f"{row['bytes_down_per_client_round'] / 1e3:.0f} | "
            f"{100 * row['final_mean_accuracy']:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help=f"comma-separated subset of {', '.join(RUNTIMES)}")
    args = parser.parse_args(argv)
    rows = []
    for runtime in args.runtimes.split(","):
        if runtime not in RUNTIMES:
            parser.error(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
        config = _config(args, (args.out / "runs" / runtime).resolve())
        report, wall = _run(runtime, config)
        rows.append(_row(runtime, report, wall))
        print(f"{runtime}: {rows[-1]}", flush=True)
    settings = dataclasses.asdict(_config(args, args.out))
    write_json(args.out / "results.json", {"environment": environment(), "rows": rows,
                                           "config": settings})
    write_text(args.out / "results.md", _markdown(rows, args))
    print(_markdown(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
