"""Overhead of secure aggregation: ours vs Flower's SecAgg+ in the same run, and a CoDream step.

    python -m codream_secure.audit.overhead.versus_flower           # README figures
    python -m codream_secure.audit.overhead.versus_flower --n 20 --m 65536   # a quick look
    python -m codream_secure.audit.overhead.versus_flower --no-flower  # without the flwr extra

README figures: n=100, m=2^20, 10% drop.

Prints a table and writes overhead.json / overhead.md into --out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from codream_secure.audit.reporting import host, write_table_report
from protocols.api import SecAggSession, secure_sum
from protocols.session import Dropout, Stage


@dataclass
class Row:
    """One protocol's costs on one configuration."""

    system: str
    protocol: str
    n: int
    m: int
    dropped_after_upload: int
    degree: int
    threshold: int
    client_seconds_mean: float
    server_seconds: float
    bytes_up_per_client: float
    bytes_down_per_client: float
    expansion_up: float
    max_abs_error: float


def _inputs(n: int, m: int, clip: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-clip, clip, size=(n, m)).astype(np.float32)


def _dropped(n: int, rate: float) -> list[int]:
    """The last round(rate * n) clients drop after their masked upload (a fixed, public choice)."""
    return list(range(n - round(rate * n), n))


def run_ours(vectors: np.ndarray, *, protocol: str, clip: float, drop: list[int]) -> Row:
    n, m = vectors.shape
    result = secure_sum(vectors, protocol=protocol, clip=clip,
                        dropouts=[Dropout(c, 1, Stage.SHARES) for c in drop])
    exact = vectors[list(result.included)].astype(np.float64).sum(0)
    return Row("codream-secure", protocol, n, m, len(drop), result.degree, result.threshold,
               float(result.client_seconds.mean()), result.server_seconds,
               float(result.bytes_up.mean()), float(result.bytes_down.mean()),
               float(result.bytes_up.mean()) / (4 * m),
               float(np.max(np.abs(result.total - exact))))


def run_flower(vectors: np.ndarray, *, clip: float, drop: list[int], num_shares: int,
               threshold: int) -> Row:
    from codream_secure.audit.overhead.flower_secaggplus import run_flower_secaggplus

    n, m = vectors.shape
    result = run_flower_secaggplus(vectors, drop_after_upload=drop, num_shares=num_shares,
                                   reconstruction_threshold=threshold, clipping_range=clip)
    exact = vectors[list(result.included)].astype(np.float64).sum(0)
    return Row("flower 1.42", "secagg+", n, m, len(drop), num_shares - 1, threshold,
               float(result.client_seconds.mean()), result.server_seconds,
               float(result.bytes_up.mean()), float(result.bytes_down.mean()),
               float(result.bytes_up.mean()) / (4 * m),
               float(np.max(np.abs(result.sum - exact))))


def session_step_ms(n: int, m: int, *, steps: int, clip: float = 1.0) -> dict[str, float]:
    """Median per-step cost inside one long session (setup excluded), and a plain float sum."""
    vectors = _inputs(n, m, clip, seed=1)
    session = SecAggSession(n, m, clip=clip, protocol="secagg")
    traffic = session.network.traffic
    totals = []
    for _ in range(steps + 2):
        before = traffic.client_seconds.sum() + traffic.server_seconds
        session.step({c: vectors[c] for c in range(n)})
        totals.append(traffic.client_seconds.sum() + traffic.server_seconds - before)
    plain = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        vectors.sum(axis=0)
        plain.append(time.perf_counter() - start)
    secure_ms = 1e3 * statistics.median(totals[2:])
    plain_ms = 1e3 * statistics.median(plain[2:])
    return {"n": n, "m": m, "steps": steps, "secure_ms": secure_ms, "plain_sum_ms": plain_ms,
            "ratio": secure_ms / plain_ms}


def _format(rows: list[Row]) -> str:
    head = ("| system | protocol | n | m | dropped | k | t | client s | server s | up/client "
            "| down/client | expansion | max abs error |\n|" + "---|" * 13)
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r.system} | {r.protocol} | {r.n} | {r.m} | {r.dropped_after_upload} | {r.degree} "
            f"| {r.threshold} | {r.client_seconds_mean:.3f} | {r.server_seconds:.3f} "
            f"| {r.bytes_up_per_client / 2**20:.3f} MiB "
            f"| {r.bytes_down_per_client / 2**10:.1f} KiB "
            f"| {r.expansion_up:.3f}x | {r.max_abs_error:.2e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="number of clients")
    parser.add_argument("--m", type=int, default=2**20, help="vector length")
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="fraction of clients that drop after their masked upload")
    parser.add_argument("--clip", type=float, default=8.0, help="clipping range (Flower's default)")
    parser.add_argument("--protocols", default="secagg+,secagg", help="ours, comma-separated")
    parser.add_argument("--no-flower", action="store_true", help="skip Flower's SecAgg+")
    parser.add_argument("--step-m", type=int, default=786_432,
                        help="vector length of the CoDream session step (one dream batch)")
    parser.add_argument("--step-repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead"))
    args = parser.parse_args(argv)

    vectors = _inputs(args.n, args.m, args.clip, seed=0)
    drop = _dropped(args.n, args.dropout)
    rows = [run_ours(vectors, protocol=p.strip(), clip=args.clip, drop=drop)
            for p in args.protocols.split(",")]
    ratios = {}
    if not args.no_flower:
        ours = rows[0]
        flower = run_flower(vectors, clip=args.clip, drop=drop, num_shares=ours.degree + 1,
                            threshold=ours.threshold)
        rows.append(flower)
        ratios = {
            "client_compute_flower_over_ours":
                flower.client_seconds_mean / ours.client_seconds_mean,
            "server_compute_flower_over_ours": flower.server_seconds / ours.server_seconds,
            "bytes_up_ours_over_flower": ours.bytes_up_per_client / flower.bytes_up_per_client,
            "error_ours_over_flower": ours.max_abs_error / max(flower.max_abs_error, 1e-300),
        }
    step = session_step_ms(4, args.step_m, steps=args.step_repeats)
    machine = host()
    table = _format(rows)
    print(table)
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    print(f"session step n=4 m={step['m']}: secure {step['secure_ms']:.2f} ms, plain float sum "
          f"{step['plain_sum_ms']:.2f} ms, ratio {step['ratio']:.1f}x")
    report = {"config": vars(args) | {"out": str(args.out)}, "machine": machine,
              "rows": [asdict(r) for r in rows], "ratios": ratios, "session_step": step}
    write_table_report(args.out, "overhead", report, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
