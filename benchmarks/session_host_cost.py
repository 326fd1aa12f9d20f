"""Host time of one SecAgg session step outside the clients' device maskers.

    python benchmarks/session_host_cost.py [--clients 4] [--length 786432] [--steps 8]
                                           [--unmasker host,device] [--turns 3]
                                           [--masker device,device-pageable,fixed]

With device masking (`[device] masking = "device"` in simulate's config) each client's upload is
built by a masker; everything else (key derivation, Shamir shares, typed messages over
authenticated links, the server's unmasking) stays on the host. This prints the median step
time, the part spent outside the maskers (the cost device masking cannot remove) and, of that,
the server's unmasking (ring sum and mask regeneration), which `--unmasker device` moves to the
GPU (`simulate` does on CUDA). `--masker fixed` replaces the device maskers by one that returns
a precomputed ring vector, and `--unmasker none` the server's unmasking by zeros (sums are then
meaningless): what remains is the protocol layer alone (keys, shares, messages, links).
`--masker device-pageable` downloads each CUDA upload into pageable memory instead of pinned.
Several maskers or unmaskers, comma-separated, run one session per pair, in interleaved turns.
"""

from __future__ import annotations

import argparse

from codream_secure.audit.device.cli import positive_int
from codream_secure.audit.device.host_cost import MASKERS, UNMASKERS, host_costs


def _name_list(allowed: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """An argparse type: a comma-separated list of distinct names from `allowed`."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name for name in text.split(",") if name)
        unknown = [name for name in names if name not in allowed]
        if not names or unknown or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(
                f"expected distinct names from {','.join(allowed)}, got {text!r}")
        return names
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/session_host_cost.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=positive_int, default=4,
                        help="clients in the session (at least 2)")
    parser.add_argument("--length", type=positive_int, default=256 * 3 * 32 * 32,
                        help="values per upload (default: a 256x3x32x32 dream batch)")
    parser.add_argument("--steps", type=positive_int, default=8,
                        help="timed steps per turn after one warm-up step")
    parser.add_argument("--unmasker", type=_name_list(UNMASKERS), default=("host",),
                        help="the server's unmasking, or several comma-separated (timed in "
                             "turn): host (numpy), device (protocol_unmasker on CUDA; on the CPU "
                             "when there is none: torch's slow keystream), none (zeros: time "
                             "the protocol layer alone)")
    parser.add_argument("--turns", type=positive_int, default=1,
                        help="how often each unmasker's session runs its steps, in turn")
    parser.add_argument("--masker", type=_name_list(MASKERS), default=("device",),
                        help="the clients' maskers, or several comma-separated (timed in turn): "
                             "device (protocol_masker, CUDA uploads downloaded into pinned "
                             "memory), device-pageable (into pageable memory), fixed (a "
                             "precomputed vector: no masking work)")
    args = parser.parse_args(argv)
    if args.clients < 2:
        parser.error(f"--clients: secure aggregation needs at least 2 clients, got {args.clients}")
    costs = host_costs(args.clients, args.length, args.steps, args.unmasker,
                       maskers=args.masker, turns=args.turns)
    for (masker, name), (total, outside, server) in costs.items():
        print(f"n={args.clients} m={args.length} masker={masker}: session step "
              f"{total:.1f} ms, outside the maskers {outside:.1f} ms (the difference, "
              f"{total - outside:.1f} ms, is the maskers' with their downloads), of which the "
              f"server's unmasking ({name}) {server:.1f} ms (median of {args.steps * args.turns} "
              f"steps, {args.turns} turn{'s' * (args.turns > 1)} interleaved)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
