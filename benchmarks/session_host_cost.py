"""Host time of one SecAgg session step outside the clients' device maskers.

    python -m benchmarks.session_host_cost [--clients 4] [--length 786432] [--steps 8]
                                           [--unmasker host|device] [--masker device|fixed]

With device masking (`simulate --masking device`) each client's upload is built by a masker;
everything else (key derivation, Shamir shares, typed messages over authenticated links, the
server's unmasking) stays on the host. This prints the median step time, the part spent
outside the maskers (the cost device masking cannot remove) and, of that, the server's
unmasking (ring sum and mask regeneration), which `--unmasker device` moves to the GPU
(`simulate` does on CUDA). `--masker fixed` replaces the device maskers by one that returns a
precomputed ring vector, and `--unmasker none` the server's unmasking by zeros (sums are then
meaningless): what remains is the protocol layer alone (keys, shares, messages, links).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks.device.cli import positive_int
from codream_secure.gpu.masking import protocol_masker, protocol_unmasker
from protocols.api import SecAggSession
from protocols.secagg.server import host_unmask


def _timed(inner, seconds: list[float]):  # type: ignore[no-untyped-def]
    """`inner` with each call's wall time appended to `seconds`."""
    def call(*args):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = inner(*args)
        seconds.append(time.perf_counter() - start)
        return out
    return call


def _fixed_masker(n: int, m: int):  # type: ignore[no-untyped-def]
    """A stand-in masker: a precomputed uniform ring vector per client, no work per step."""
    rng = np.random.default_rng(1)
    uploads = [rng.integers(0, 2**32, m, dtype=np.uint32) for _ in range(n)]
    return lambda vector, codec, secrets: uploads[secrets.client_id]


def host_cost(n: int, m: int, steps: int, *, unmasker: str = "host",
              masker: str = "device") -> tuple[float, float, float]:
    """Median ms of (a step, its part outside the maskers, the server's unmasking)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    masking: list[float] = []
    unmasking: list[float] = []
    if unmasker == "host":
        unmask = host_unmask
    elif unmasker == "none":
        unmask = lambda uploads, seeds, codec: np.zeros(m, codec.dtype)  # noqa: E731
    else:
        unmask = protocol_unmasker(device)
    mask = protocol_masker() if masker == "device" else _fixed_masker(n, m)
    session = SecAggSession(n, m, clip=8.0, protocol="secagg", prg="chacha20",
                            maskers={c: _timed(mask, masking) for c in range(n)},
                            unmasker=_timed(unmask, unmasking))
    rng = np.random.default_rng(0)
    inputs = {c: torch.from_numpy(rng.normal(0, 0.1, m).astype(np.float32)).to(device)
              for c in range(n)}
    session.step(inputs)
    totals, outside, server = [], [], []
    for _ in range(steps):
        masking.clear()
        unmasking.clear()
        start = time.perf_counter()
        session.step(inputs)
        total = time.perf_counter() - start
        totals.append(1e3 * total)
        outside.append(1e3 * (total - sum(masking)))
        server.append(1e3 * sum(unmasking))
    return statistics.median(totals), statistics.median(outside), statistics.median(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.session_host_cost",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=positive_int, default=4,
                        help="clients in the session (at least 2)")
    parser.add_argument("--length", type=positive_int, default=256 * 3 * 32 * 32,
                        help="values per upload (default: a 256x3x32x32 dream batch)")
    parser.add_argument("--steps", type=positive_int, default=8,
                        help="timed steps after one warm-up step")
    parser.add_argument("--unmasker", choices=("host", "device", "none"), default="host",
                        help="the server's unmasking: numpy on the host, or protocol_unmasker "
                             "on CUDA (on the CPU when there is none: torch's slow keystream), "
                             "or none (zeros: time the protocol layer alone)")
    parser.add_argument("--masker", choices=("device", "fixed"), default="device",
                        help="the clients' maskers: protocol_masker, or a fixed vector")
    args = parser.parse_args(argv)
    if args.clients < 2:
        parser.error(f"--clients: secure aggregation needs at least 2 clients, got {args.clients}")
    total, outside, server = host_cost(args.clients, args.length, args.steps,
                                       unmasker=args.unmasker, masker=args.masker)
    print(f"n={args.clients} m={args.length} masker={args.masker}: session step {total:.1f} ms, "
          f"outside the maskers {outside:.1f} ms, of which the server's unmasking "
          f"({args.unmasker}) {server:.1f} ms (median of {args.steps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
