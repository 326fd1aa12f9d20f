"""What the consistency round costs: one SecAgg step under "semi-honest" and "active".

    python benchmarks/consistency_cost.py                   # n=4, m=786432 and n=100, m=2^20
    python benchmarks/consistency_cost.py --reps 1 --quick  # a quick look (small vectors)

Each repetition opens a fresh session per threat model (a client that drops after its upload
leaves the session), runs one step, and records that step's wall time, the clients' and the
server's compute seconds, and the bytes per client; the two models alternate so both see the
same machine load. Writes consistency_cost.json (rows and the environment record) into --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from codream_secure.audit.reporting import environment, write_json
from protocols.api import SecAggSession

THREAT_MODELS = ("semi-honest", "active")
# (n, m, clients that drop after their upload): the README's two configurations
CASES = ((4, 786_432, 0), (100, 1 << 20, 10))
QUICK_CASES = ((4, 4096, 0), (30, 4096, 3))


@dataclass
class Sample:
    """One step of one session."""

    step_seconds: float
    client_seconds: float  # mean over the clients
    server_seconds: float
    bytes_up: float  # per client, mean
    bytes_down: float
    included: int


def one_step(n: int, m: int, dropped: int, threat_model: str, seed: int) -> Sample:
    """A fresh SecAgg+ session and one step of it, with `dropped` clients silent after upload."""
    x = np.random.default_rng(seed).uniform(-1, 1, (n, m)).astype(np.float32)
    session = SecAggSession(n, m, clip=1.0, protocol="secagg+", threat_model=threat_model,
                            expected_dropout=max(dropped / n, 0.05))
    traffic = session.traffic
    before = (traffic.client_seconds.copy(), traffic.server_seconds,
              traffic.bytes_up.copy(), traffic.bytes_down.copy())
    start = time.perf_counter()
    outcome = session.step({c: x[c] for c in range(n)},
                           drop_after_upload=range(n - dropped, n))
    wall = time.perf_counter() - start
    exact = x[sorted(outcome.included)].astype(np.float64).sum(0)
    if np.abs(outcome.total - exact).max() > session.error_bound(len(outcome.included)):
        raise AssertionError("the secure sum is off by more than the codec's bound")
    return Sample(wall, float((traffic.client_seconds - before[0]).mean()),
                  traffic.server_seconds - before[1], float((traffic.bytes_up - before[2]).mean()),
                  float((traffic.bytes_down - before[3]).mean()), len(outcome.included))


def measure(cases, reps: int) -> list[dict]:
    """Median of `reps` steps per (case, threat model), the two models interleaved."""
    rows = []
    for n, m, dropped in cases:
        samples: dict[str, list[Sample]] = {model: [] for model in THREAT_MODELS}
        for rep in range(reps):
            for model in THREAT_MODELS:
                samples[model].append(one_step(n, m, dropped, model, seed=rep))
        for model, found in samples.items():
            median = {k: statistics.median(getattr(s, k) for s in found)
                      for k in asdict(found[0])}
            rows.append({"n": n, "m": m, "dropped_after_upload": dropped,
                         "threat_model": model, "reps": reps, **median})
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python benchmarks/consistency_cost.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="steps per case and threat model")
    parser.add_argument("--quick", action="store_true", help="small vectors, for a smoke run")
    parser.add_argument("--out", type=Path, default=Path("runs/consistency_cost"))
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    rows = measure(QUICK_CASES if args.quick else CASES, args.reps)
    result = {"command": " ".join(["python benchmarks/consistency_cost.py", *argv]),
              "rows": rows, "environment": environment()}
    write_json(args.out / "consistency_cost.json", result)
    print(f"{'n':>4} {'m':>8} {'drop':>4} {'model':>11} {'step s':>8} {'client s':>9} "
          f"{'server s':>9} {'up B/client':>12} {'down B/client':>13}")
    for r in rows:
        print(f"{r['n']:>4} {r['m']:>8} {r['dropped_after_upload']:>4} {r['threat_model']:>11} "
              f"{r['step_seconds']:>8.3f} {r['client_seconds']:>9.3f} "
              f"{r['server_seconds']:>9.3f} {r['bytes_up']:>12.0f} {r['bytes_down']:>13.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
