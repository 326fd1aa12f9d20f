"""Packed Paillier as a registry spec; phe loads only when a session or a key is asked for."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, cast

import numpy as np

from ..plan import AggregationPlan, majority_threshold
from ..session import RingNoise
from ..spec import AggregatorSpec, SessionOptions

if TYPE_CHECKING:
    from .roles import Keypair
    from .session import PaillierSession

__all__ = ["PaillierSpec"]


class PaillierSpec(AggregatorSpec):
    """"paillier": clients encrypt and tag uploads, the server relays them, a key holder checks
    the tags, multiplies and decrypts only products of at least `threshold` uploads (1 by
    default; a majority under DP, which its noise is sized for)."""

    name: ClassVar[str] = "paillier"
    key_holder: ClassVar[bool] = True
    network_faults: ClassVar[bool] = True  # the session plays dropouts, lateness, tampering

    def plan(self, n_clients: int, *, threshold: int | None = None, degree: int | None = None,
             expected_dropout: float = 0.1, ring_bits: int = 32,
             private: bool = False) -> AggregationPlan:
        if threshold is None:
            threshold = majority_threshold(n_clients) if private else 1
        return AggregationPlan(self.name, n_clients, threshold=threshold, degree=0,
                               min_contributors=threshold, ring_bits=ring_bits)

    def open(self, plan: AggregationPlan, vector_length: int, *, clip: float,
             noise: RingNoise | None, options: SessionOptions) -> PaillierSession:
        """RingNoise becomes the session's per-client noise hook at the session's scale."""
        from .session import PaillierSession

        keypair = cast("Keypair | None", options.keypair)
        if noise is None:
            return PaillierSession(plan.n_clients, vector_length, clip=clip,
                                   key_bits=options.key_bits, ring_bits=plan.ring_bits,
                                   keypair=keypair, rounding_seed=options.rounding_seed,
                                   quorum=plan.threshold, scale_bits=options.scale_bits,
                                   faults=options.faults)
        scale_bits = plan.scale_bits(clip=clip, headroom=noise.headroom)
        assert scale_bits is not None
        # ceil(clip 2^f) + floor(headroom 2^f) <= ceil((clip + headroom) 2^f): the codec's budget
        bound = math.floor(math.ldexp(noise.headroom, scale_bits))

        def hook(client: int, step: int, length: int) -> np.ndarray:
            return noise.sample(length, scale_bits)

        return PaillierSession(plan.n_clients, vector_length, clip=clip,
                               key_bits=options.key_bits, ring_bits=plan.ring_bits,
                               keypair=keypair, rounding_seed=options.rounding_seed,
                               quorum=plan.threshold, scale_bits=scale_bits, noise=hook,
                               noise_bound=bound, faults=options.faults)

    def generate_keypair(self, key_bits: int) -> object:
        from .roles import generate_keypair

        return generate_keypair(key_bits)
