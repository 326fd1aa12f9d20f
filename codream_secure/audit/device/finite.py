"""When a dream round refuses a non-finite client gradient: every step, or once at its end.

Every step (`deferred=False`) costs one device synchronisation per step: the host waits for
the gradients, so no host work of the next step overlaps them. Deferred, each step records one
flag per client on the device and zeroes the client's non-finite values before they are masked
or summed; the round's end reads all flags with one synchronisation and refuses the whole round,
naming the first client and step. Zeroing keeps every upload a valid input (a masked NaN
encoding would be a known constant the server could subtract from the sum); the refusal keeps
a sum built on a zeroed gradient from ever being the round's result.
"""

from __future__ import annotations

import torch

from codream_secure.dreams import NonFiniteGradientError


def require_finite(grads: list[torch.Tensor]) -> None:
    """One device sync for all clients: refuse a NaN/inf gradient before anything is sent."""
    if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        raise NonFiniteGradientError("a client's dream gradient holds NaN or inf")


class FiniteCheck:
    """Refuses non-finite client gradients at every step (one sync each) or at the round's end."""

    def __init__(self, *, deferred: bool) -> None:
        self.deferred = deferred
        self._flags: list[tuple[int, torch.Tensor]] = []

    def screen(self, grads: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """Deferred: record each client's flag and zero its non-finite values (no sync)."""
        if not self.deferred:
            return grads
        self._flags.append((step, torch.stack([torch.isfinite(g).all() for g in grads])))
        return [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]

    def gate(self, grads: list[torch.Tensor]) -> None:
        """Every step: the one sync that refuses a non-finite gradient before a send."""
        if not self.deferred:
            require_finite(grads)

    def finish(self) -> None:
        """Deferred: one sync over the round's flags; refuse the round if any was non-finite."""
        flags, self._flags = self._flags, []
        if not flags:
            return
        finite = torch.stack([f for _, f in flags]).cpu()
        if bool(finite.all()):
            return
        row, client = (int(i) for i in (~finite).nonzero()[0])
        raise NonFiniteGradientError(
            f"client {client}'s dream gradient held NaN or inf at step {flags[row][0]}; the "
            "round is refused (from that step on, its sums had those values zeroed)")
