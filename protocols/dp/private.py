"""Differential privacy around any aggregator: clip every client's vector, noise every release.

`central`: the server adds N(0, (zC)^2) to the decoded sum (it sees the un-noised sum first).
`distributed`: each client adds integer noise before masking (protocols.dp.DistributedNoise),
sized for the fewest contributions the server can ever unmask, so no party sees an un-noised sum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from ..codec import FixedPointCodec
from ..inputs import check_step_inputs, without_departed
from ..plan import PLAIN_NOISE_SCALE_BITS
from ..session import AggregationSession, StepOutcome, Traffic
from .mechanisms import (
    DPSpec,
    accounting_noise_multiplier,
    add_central_noise,
    check_contributors,
    clip_l2,
)

__all__ = ["PrivateSession"]


class PrivateSession:
    """An aggregation session whose every released sum satisfies client-level DP."""

    def __init__(self, inner: AggregationSession, spec: DPSpec) -> None:
        self.inner, self.spec = inner, spec
        self.n_clients, self.vector_length = inner.n_clients, inner.vector_length
        self.clipped = 0  # client vectors scaled down to the L2 clip so far
        self.releases = 0

    @property
    def accounting_noise_multiplier(self) -> float:
        """The Gaussian multiplier an accountant must be told for one release of this session."""
        codec = getattr(self.inner, "codec", None)
        if codec is not None:
            grid: int | None = codec.scale_bits
        else:  # plain: values are rounded to a grid only when clients add lattice noise
            grid = PLAIN_NOISE_SCALE_BITS if self.spec.mode == "distributed" else None
        return accounting_noise_multiplier(self.spec, dim=self.vector_length, scale_bits=grid)

    @property
    def traffic(self) -> Traffic:
        return self.inner.traffic

    @property
    def codec(self) -> FixedPointCodec | None:
        codec: FixedPointCodec | None = getattr(self.inner, "codec", None)
        return codec

    @property
    def threshold(self) -> int:
        return self.inner.threshold

    @property
    def degree(self) -> int:
        return self.inner.degree

    @property
    def active(self) -> frozenset[int]:
        return self.inner.active

    def close(self) -> None:
        self.inner.close()

    def error_bound(self, n_summed: int) -> float:
        """Decode error of the un-noised sum (the noise itself is the point, not an error)."""
        return self.inner.error_bound(n_summed)

    def step(self, inputs: Mapping[int, np.ndarray], *,
             drop_after_upload: Iterable[int] = ()) -> StepOutcome:
        """Clip each input to L2 norm C (the client's job), sum, then noise (central mode).

        Clients that left the session earlier stay out (protocols.inputs.without_departed).
        """
        inputs, drop_after_upload = without_departed(inputs, drop_after_upload,
                                                     n_clients=self.n_clients,
                                                     active=self.inner.active)
        drop_after_upload = check_step_inputs(inputs, drop_after_upload,
                                              active=self.inner.active, length=self.vector_length)
        clipped = {}
        for client, vector in inputs.items():
            clipped[client], scaled = clip_l2(np.asarray(vector, dtype=np.float64),
                                              self.spec.l2_clip)
            self.clipped += scaled
        outcome = self.inner.step(clipped, drop_after_upload=drop_after_upload)
        check_contributors(self.spec, len(outcome.included))
        self.releases += 1
        if self.spec.mode == "central":
            outcome = dataclasses.replace(outcome, total=add_central_noise(outcome.total,
                                                                           self.spec))
        return outcome
