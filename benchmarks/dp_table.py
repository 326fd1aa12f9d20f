"""The README's accuracy-vs-epsilon table: CoDream on Fashion-MNIST with and without DP.

    python benchmarks/dp_table.py            # the README settings (reduced for 2 CPUs)
    python benchmarks/dp_table.py --epsilons 8 32 --sample-epsilons 8

A reduced budget for 2 CPUs (3000 training images, 5 rounds, 40 dream steps, four
architectures, IID), secagg. Client level: distributed Skellam noise, z calibrated to each
epsilon over all 205 releases. Sample level: DP-SGD local training at each epsilon. Writes
table.md and runs.json into --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fmnist_table import HETEROGENEOUS  # the sibling script: run this one as a file

from codream_secure.audit.reporting import environment, write_json, write_text
from codream_secure.config import SimulationConfig
from codream_secure.report import write_report
from codream_secure.simulation import run_simulation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="*", default=[8.0, 64.0])
    parser.add_argument("--sample-epsilons", type=float, nargs="*", default=[8.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/dp-table"))
    args = parser.parse_args(argv)
    write_json(args.out / "environment.json", environment())
    variants = [("none", {}, "isolated,centralized")]
    variants += [(f"client eps={e:g}", {"dp": "client", "dp_epsilon": e}, "") for e in
                 args.epsilons]
    variants += [(f"sample eps={e:g}", {"dp": "sample", "dp_epsilon": e}, "") for e in
                 args.sample_epsilons]
    runs, start = [], time.perf_counter()
    for name, dp, baselines in variants:
        config = SimulationConfig.from_keys(
            dataset="fashion-mnist", data_dir=args.data_dir, max_train=3000, max_test=2000,
            models=HETEROGENEOUS, partition=args.partition, alpha=0.1, rounds=5, warmup_epochs=3,
            local_epochs=1, dream_steps=40, baselines=tuple(filter(None, baselines.split(","))),
            seed=args.seed, out=str(args.out / name.replace(" ", "-").replace("=", "")), **dp)
        outcome = run_simulation(config)
        write_report(outcome, Path(config.run.out))
        report = outcome.report
        privacy, codream = report["privacy"], report["final"]["codream"]
        runs.append({"variant": name, "epsilon": privacy["epsilon"],
                     "delta": config.privacy.dp_delta, "delta_total": privacy.get("delta_total"),
                     "noise_multiplier": privacy.get("nominal_noise_multiplier"),
                     "final": {m: v["mean_accuracy"] for m, v in report["final"].items()},
                     "selected_round": codream.get("selected_round"),
                     "last_round": codream.get("last_round_mean_accuracy"),
                     "per_round": [r["codream"]["mean_test"] for r in report["rounds"]],
                     "seconds": report["timing"]["total_seconds"]})
        write_json(args.out / "runs.json", runs)
        print(runs[-1], flush=True)
    lines = ["| DP | epsilon (delta 1e-5) | total delta | noise multiplier z | CoDream accuracy "
             "(%), each client at its best-validation round | after the last round (%) | per "
             "round (%) |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        eps = "–" if run["epsilon"] is None else f"{run['epsilon']:.2f}"
        z = "–" if run["noise_multiplier"] is None else f"{run['noise_multiplier']:.3g}"
        total = "–" if run["delta_total"] is None else f"{run['delta_total']:.3g}"
        curve = " / ".join(f"{100 * a:.0f}" for a in run["per_round"])
        chosen = "/".join(map(str, run["selected_round"]))
        lines.append(f"| {run['variant']} | {eps} | {total} | {z} | "
                     f"{100 * run['final']['codream']:.1f} "
                     f"(rounds {chosen}) | {100 * run['last_round']:.1f} | {curve} |")
    for method in ("isolated", "centralized"):
        value = runs[0]["final"].get(method)
        if value is not None:
            lines.append(f"| {method} (no DP) | – | – | – | {100 * value:.1f} | | |")
    lines.append(f"\nTotal time {(time.perf_counter() - start) / 60:.1f} min, seed {args.seed}, "
                 f"partition {args.partition}.")
    write_text(args.out / "table.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
