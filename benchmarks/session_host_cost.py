"""Host time of one SecAgg session step outside the clients' device maskers.

    python -m benchmarks.session_host_cost [--clients 4] [--length 786432] [--steps 8]

With device masking (`simulate --masking device`) each client's upload is built by a masker;
everything else (key derivation, Shamir shares, typed messages over authenticated links, the
server's unmasking) stays on the host. This prints the median step time and the part spent
outside the maskers: the cost device masking cannot remove.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from codream_secure.gpu.masking import protocol_masker
from protocols.api import SecAggSession


def host_cost(n: int, m: int, steps: int) -> tuple[float, float]:
    """(median step ms, median ms outside the maskers) over `steps` steps after one warm-up."""
    inside: list[float] = []

    def timed(inner):  # type: ignore[no-untyped-def]
        def mask(vector, codec, secrets):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            out = inner(vector, codec, secrets)
            inside.append(time.perf_counter() - start)
            return out
        return mask

    session = SecAggSession(n, m, clip=8.0, protocol="secagg", prg="chacha20",
                            maskers={c: timed(protocol_masker()) for c in range(n)})
    rng = np.random.default_rng(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = {c: torch.from_numpy(rng.normal(0, 0.1, m).astype(np.float32)).to(device)
              for c in range(n)}
    session.step(inputs)
    totals, outside = [], []
    for _ in range(steps):
        inside.clear()
        start = time.perf_counter()
        session.step(inputs)
        total = time.perf_counter() - start
        totals.append(1e3 * total)
        outside.append(1e3 * (total - sum(inside)))
    return statistics.median(totals), statistics.median(outside)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--length", type=int, default=256 * 3 * 32 * 32)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    total, outside = host_cost(args.clients, args.length, args.steps)
    print(f"n={args.clients} m={args.length}: session step {total:.1f} ms, outside the maskers "
          f"{outside:.1f} ms (median of {args.steps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
