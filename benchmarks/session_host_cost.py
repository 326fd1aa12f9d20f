"""Host time of one SecAgg session step outside the clients' device maskers.

    python -m benchmarks.session_host_cost [--clients 4] [--length 786432] [--steps 8]
                                           [--unmasker host,device] [--turns 3]
                                           [--masker device,device-pageable,fixed]

With device masking (`simulate --masking device`) each client's upload is built by a masker;
everything else (key derivation, Shamir shares, typed messages over authenticated links, the
server's unmasking) stays on the host. This prints the median step time, the part spent
outside the maskers (the cost device masking cannot remove) and, of that, the server's
unmasking (ring sum and mask regeneration), which `--unmasker device` moves to the GPU
(`simulate` does on CUDA). `--masker fixed` replaces the device maskers by one that returns a
precomputed ring vector, and `--unmasker none` the server's unmasking by zeros (sums are then
meaningless): what remains is the protocol layer alone (keys, shares, messages, links).
`--masker device-pageable` downloads each CUDA upload into pageable memory instead of pinned.
Several maskers or unmaskers, comma-separated, run one session per pair, in interleaved turns.
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


UNMASKERS = ("host", "device", "none")
MASKERS = ("device", "device-pageable", "fixed")


class _TimedSession:
    """One SecAgg session whose maskers and unmasker record their wall time per call."""

    def __init__(self, n: int, m: int, unmasker: str, masker: str, device: str) -> None:
        self.unmasker, self.masker = unmasker, masker
        self.masking: list[float] = []
        self.unmasking: list[float] = []
        if unmasker == "host":
            unmask = host_unmask
        elif unmasker == "none":
            unmask = lambda uploads, seeds, codec: np.zeros(m, codec.dtype)  # noqa: E731
        else:
            unmask = protocol_unmasker(device)
        if masker == "fixed":
            mask = _fixed_masker(n, m)
        else:
            mask = protocol_masker(pinned=masker == "device")
        self.session = SecAggSession(n, m, clip=8.0, protocol="secagg", prg="chacha20",
                                     maskers={c: _timed(mask, self.masking) for c in range(n)},
                                     unmasker=_timed(unmask, self.unmasking))
        self.totals: list[float] = []
        self.outside: list[float] = []
        self.server: list[float] = []

    def step(self, inputs: dict, *, record: bool = True) -> None:
        """One session step; its ms (total, outside the maskers, unmasking) when recorded."""
        self.masking.clear()
        self.unmasking.clear()
        start = time.perf_counter()
        self.session.step(inputs)
        total = time.perf_counter() - start
        if record:
            self.totals.append(1e3 * total)
            self.outside.append(1e3 * (total - sum(self.masking)))
            self.server.append(1e3 * sum(self.unmasking))

    def medians(self) -> tuple[float, float, float]:
        return (statistics.median(self.totals), statistics.median(self.outside),
                statistics.median(self.server))


def host_costs(n: int, m: int, steps: int, unmaskers: tuple[str, ...] = ("host",), *,
               maskers: tuple[str, ...] = ("device",), turns: int = 1,
               ) -> dict[tuple[str, str], tuple[float, float, float]]:
    """Median ms of (a step, its part outside the maskers, the server's unmasking) per
    (masker, unmasker) pair.

    One session per pair, each warmed up by one step; then `turns` times each session runs
    `steps` steps in turn, so a noisy machine slows every pair alike.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sessions = {(mk, um): _TimedSession(n, m, um, mk, device)
                for mk in maskers for um in unmaskers}
    rng = np.random.default_rng(0)
    inputs = {c: torch.from_numpy(rng.normal(0, 0.1, m).astype(np.float32)).to(device)
              for c in range(n)}
    for timed in sessions.values():
        timed.step(inputs, record=False)
    for _ in range(turns):
        for timed in sessions.values():
            for _ in range(steps):
                timed.step(inputs)
    return {name: timed.medians() for name, timed in sessions.items()}


def host_cost(n: int, m: int, steps: int, *, unmasker: str = "host",
              masker: str = "device") -> tuple[float, float, float]:
    """Median ms of (a step, its part outside the maskers, the server's unmasking)."""
    return host_costs(n, m, steps, (unmasker,), maskers=(masker,))[masker, unmasker]


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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.session_host_cost",
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
