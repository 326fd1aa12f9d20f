"""Pixel vs generator dreams on Fashion-MNIST: round time and the teacher's confidence.

    OMP_NUM_THREADS=1 python benchmarks/dream_modes.py --mode pixel
    OMP_NUM_THREADS=1 python benchmarks/dream_modes.py --mode generator --set generator_batches=2

Reduced Fashion-MNIST settings for 2 CPUs (3,000 train / 2,000 test images, Dirichlet 0.1,
four architectures, 5 rounds, warm-up 3, one local epoch), without baselines. For every
round it records the seconds of each phase and the teacher's confidence on its dreams: the mean
over dreams of the largest class probability of the averaged soft labels. Appends one JSON line
per run to --out/runs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from codream_secure.audit.reporting import environment, write_json
from codream_secure.config import SimulationConfig
from codream_secure.simulation import run_simulation

HETEROGENEOUS = ("smallcnn", "resnet8", "wrn16_1", "mobilenet")


def _value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("pixel", "generator"), required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="further config keys, e.g. generator_local_steps=10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--aggregator", default="secagg")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dream-modes"))
    args = parser.parse_args(argv)
    extra = {key: _value(value) for key, value in (item.split("=", 1) for item in args.set)}
    config = SimulationConfig.from_keys(**{
        "dataset": "fashion-mnist", "data_dir": args.data_dir, "max_train": 3000,
        "max_test": 2000, "models": HETEROGENEOUS, "partition": "dirichlet", "alpha": 0.1,
        "rounds": args.rounds, "warmup_epochs": 3, "local_epochs": 1, "dream_steps": 40,
        "baselines": (), "seed": args.seed, "aggregator": args.aggregator,
        "dream_mode": args.mode, "threads": 1,
        "out": str(args.out / f"{args.mode}-{args.aggregator}-s{args.seed}"), **extra})
    write_json(args.out / "environment.json", environment())
    start = time.perf_counter()
    report = run_simulation(config).report
    rounds = report["rounds"][1:]
    row = {
        "mode": args.mode, "seed": args.seed, "aggregator": args.aggregator, "set": extra,
        "seconds_total": time.perf_counter() - start,
        "round_seconds": [sum(r["seconds"].values()) for r in rounds],
        "synthesis_seconds": [r["seconds"]["dreams"] + r["seconds"]["aggregation"]
                              for r in rounds],
        "seconds": [r["seconds"] for r in rounds],
        "teacher_confidence": [r["teacher"].get("max_probability") for r in rounds],
        "skipped_batches": [r.get("skipped_batches") for r in rounds],
        "mean_test": [r["codream"]["mean_test"] for r in report["rounds"]],
        "final_mean_accuracy": report["final"]["codream"]["mean_accuracy"],
        "clipped_values": report["aggregator"]["measured"]["clipped_values"],
    }
    row["median_round_seconds"] = float(np.median(row["round_seconds"]))
    row["median_synthesis_seconds"] = float(np.median(row["synthesis_seconds"]))
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "runs.jsonl").open("a", encoding="utf-8") as file:
        file.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
