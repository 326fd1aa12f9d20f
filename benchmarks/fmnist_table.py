"""The README's Fashion-MNIST table: CoDream vs isolated vs FedAvg vs centralized over seeds.

    python benchmarks/fmnist_table.py                 # the README settings (reduced for 2 CPUs)
    python benchmarks/fmnist_table.py --seeds 0 1 2 --partitions dirichlet iid

Needs Fashion-MNIST (`apt-get install dataset-fashion-mnist`, or --data-dir with the IDX files).
Heterogeneous runs use four architectures; FedAvg comes from a homogeneous run (all smallcnn),
whose CoDream row is reported too. Writes table.md and runs.json into --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from codream_secure.audit.reporting import environment, write_json, write_text
from codream_secure.config import SimulationConfig
from codream_secure.simulation import run_simulation

HETEROGENEOUS = ("smallcnn", "resnet8", "wrn16_1", "mobilenet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--partitions", nargs="+", default=["dirichlet", "iid"])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--max-train", type=int, default=3000)
    parser.add_argument("--max-test", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dream-steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fmnist"))
    args = parser.parse_args(argv)
    write_json(args.out / "environment.json", environment())
    runs, start = [], time.perf_counter()
    for part in args.partitions:
        for seed in args.seeds:
            for variant, models, baselines in (
                ("heterogeneous", HETEROGENEOUS, ("isolated", "centralized")),
                ("homogeneous", ("smallcnn",), ("fedavg",)),
            ):
                config = SimulationConfig.from_keys(
                    dataset="fashion-mnist", data_dir=args.data_dir, max_train=args.max_train,
                    max_test=args.max_test, models=models, partition=part, alpha=0.1,
                    rounds=args.rounds, warmup_epochs=3, local_epochs=1,
                    dream_steps=args.dream_steps, baselines=baselines, seed=seed,
                    out=str(args.out / f"{part}-{variant}-s{seed}"))
                report = run_simulation(config).report
                runs.append({"partition": part, "variant": variant, "seed": seed,
                             "final": {m: v["mean_accuracy"] for m, v in report["final"].items()},
                             "seconds": report["timing"]["total_seconds"]})
                write_json(args.out / "runs.json", runs)
                print(runs[-1], flush=True)
    lines = ["| partition | method | mean accuracy (%) | std over seeds | seeds |",
             "|---|---|---|---|---|"]
    for part in args.partitions:
        for variant, method, label in (("heterogeneous", "codream", "CoDream (4 architectures)"),
                                       ("heterogeneous", "isolated", "isolated"),
                                       ("homogeneous", "codream", "CoDream (all smallcnn)"),
                                       ("homogeneous", "fedavg", "FedAvg (all smallcnn)"),
                                       ("heterogeneous", "centralized", "centralized")):
            values = [100 * r["final"][method] for r in runs
                      if r["partition"] == part and r["variant"] == variant]
            if values:
                lines.append(f"| {part} | {label} | {np.mean(values):.1f} | "
                             f"{np.std(values):.1f} | {len(values)} |")
    minutes = (time.perf_counter() - start) / 60
    lines.append(f"\nTotal time {minutes:.1f} min for {len(runs)} runs.")
    write_text(args.out / "table.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
