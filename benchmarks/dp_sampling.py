"""`python benchmarks/dp_sampling.py`: how long one client's DP noise takes to draw.

Times the distributed mechanisms' integer noise (Skellam, discrete Gaussian; one client's share,
`protocols.dp.DistributedNoise.sample`) and the central Gaussian added to a decoded sum
(`add_central_noise`), median of warm calls, for a digits-sized and a ResNet-sized release.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from protocols.dp.mechanisms import DistributedNoise, DPSpec, add_central_noise

SIZES = (4096, 786_432)  # one digits dream batch; one 256x3x32x32 batch
SCALE_BITS = 24


def _median_ms(call, repeats: int) -> float:
    call()  # warm: first-call allocations and imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/dp_sampling.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per row (median)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES),
                        help="values per release (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if min(args.sizes) < 1:
        parser.error("--sizes must be at least 1")
    spec = {"noise_multiplier": 1.0, "l2_clip": 1.0}
    for size in args.sizes:
        for kind in ("skellam", "discrete_gaussian"):
            noise = DistributedNoise(DPSpec(mode="distributed", noise=kind, min_contributors=3,
                                            **spec))
            ms = _median_ms(lambda n=noise, m=size: n.sample(m, SCALE_BITS), args.repeats)
            print(f"{size:>8} values  {kind:<18} {ms:8.2f} ms")
        central = DPSpec(mode="central", **spec)
        total = np.zeros(size)
        ms = _median_ms(lambda s=central, t=total: add_central_noise(t, s), args.repeats)
        print(f"{size:>8} values  {'central gaussian':<18} {ms:8.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
