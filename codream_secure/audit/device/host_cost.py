"""Host time of one SecAgg session step outside the clients' maskers, per (masker, unmasker).

`benchmarks/session_host_cost.py` is the command line; docs/gpu.md reads its numbers.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

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
