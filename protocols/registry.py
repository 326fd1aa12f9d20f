"""Every aggregator behind one session interface: "plain" | "secagg" | "secagg+" | "paillier".

`open_session` is what an application calls; differential privacy wraps any of them
(`protocols.private`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .api import PROTOCOLS, SecAggSession, default_threshold, plan_parameters
from .codec import FixedPointCodec
from .errors import ParameterError, TooFewSurvivorsError
from .inputs import check_count, check_step_inputs
from .network import Traffic
from .secagg.client import Masker, RingNoise
from .secagg.server import StepOutcome, Unmasker

if TYPE_CHECKING:
    from .dp import DPSpec

__all__ = ["AggregationSession", "PlainSession", "open_session"]

PLAIN_NOISE_SCALE_BITS = 24  # local noise in the clear is drawn on a 2^-24 grid


class AggregationSession(Protocol):
    """What every aggregator offers: one `step` per summed vector, and what it cost."""

    n_clients: int
    vector_length: int

    def step(self, inputs: Mapping[int, np.ndarray], *,
             drop_after_upload: Iterable[int] = ()) -> StepOutcome: ...

    @property
    def traffic(self) -> Traffic: ...

    def error_bound(self, n_summed: int) -> float: ...


class PlainSession:
    """The unprotected baseline: float32 vectors sent in the clear and added by the server.

    With `noise` (local DP in the clear) each client puts its vector on a 2^-24 grid and adds its
    own noise before sending it as float64; the server then sees each noisy vector, which is all
    that mode promises.
    """

    def __init__(self, n_clients: int, vector_length: int, *,
                 noise: RingNoise | None = None) -> None:
        n_clients = check_count("aggregation's number of clients", n_clients, low=2)
        vector_length = check_count("vector_length", vector_length)
        self.n_clients, self.vector_length, self.noise = n_clients, vector_length, noise
        self.protocol, self.threshold, self.degree = "plain", 1, n_clients - 1
        self.traffic = Traffic.zeros(n_clients)
        self.active = frozenset(range(n_clients))
        self._step = 0

    def error_bound(self, n_summed: int) -> float:
        """0: the server adds exactly the float32 vectors it received (no codec in between)."""
        return 0.0

    def step(self, inputs: Mapping[int, np.ndarray], *,
             drop_after_upload: Iterable[int] = ()) -> StepOutcome:
        """Sum what arrived; a client that uploaded before dropping still counts."""
        drop_after_upload = check_step_inputs(inputs, drop_after_upload, active=self.active,
                                              length=self.vector_length)
        self._step += 1
        members = sorted(inputs)
        if not members:
            raise TooFewSurvivorsError(needed=1, remaining=0, context=f"step {self._step}")
        with np.errstate(over="ignore"):  # refused just below
            sent = np.stack([np.asarray(inputs[c], dtype=np.float32).reshape(-1)
                             for c in members])
        if not np.isfinite(sent).all():  # finite, but past float32's range: inf on the wire
            raise ParameterError("an input holds values beyond float32's range (|x| > 3.4e38)")
        width = 4
        if self.noise is not None:
            sent, width = self._noised(sent), 8
        for c in members:
            self.traffic.bytes_up[c] += width * self.vector_length
        start = time.perf_counter()
        total = sent.sum(axis=0, dtype=np.float64)
        self.traffic.server_seconds += time.perf_counter() - start
        dropped = frozenset(self.active - set(members))
        self.active = frozenset(members) - set(drop_after_upload)
        return StepOutcome(self._step, total, np.empty(0, np.uint32), frozenset(members), dropped)

    def _noised(self, sent: np.ndarray) -> np.ndarray:
        """Each client rounds to the 2^-f grid, then adds its own integer noise (float64 out).

        Lattice noise on an off-lattice value would leak the value's fractional part, so the
        value is put on the noise's grid first.
        """
        assert self.noise is not None
        f = PLAIN_NOISE_SCALE_BITS
        units = np.rint(np.ldexp(sent.astype(np.float64), f))
        for row in units:
            row += self.noise.sample(row.size, f)
        return np.ldexp(units, -f)


def open_session(protocol: str, n_clients: int, vector_length: int, *, clip: float,
                 ring_bits: int = 32, expected_dropout: float = 0.1,
                 rounding_seed: bytes | None = None, noise: RingNoise | None = None,
                 key_bits: int = 3072, keypair: object | None = None,
                 threshold: int | None = None, degree: int | None = None,
                 dp: DPSpec | None = None, prg: str = "aes-256-ctr",
                 maskers: Mapping[int, Masker] | None = None,
                 unmasker: Unmasker | None = None,
                 threat_model: str = "active") -> AggregationSession:
    """A fresh session of `protocol` for `n_clients` vectors of `vector_length` values.

    `maskers` (SecAgg only) builds chosen clients' uploads elsewhere, e.g. on a GPU, and
    `unmasker` the server's unmasked sum (`protocols.api.SecAggSession`); the session's `prg`
    must be one they expand.

    With `dp`, every client's vector is clipped to L2 norm dp.l2_clip (which then is also the
    per-coordinate clip) and every release is noised (`protocols.private`).
    `threat_model` ("active" or "semi-honest") applies to SecAgg and SecAgg+.
    """
    if protocol not in PROTOCOLS:
        raise ParameterError(f"unknown aggregator {protocol!r}; choose one of "
                             f"{', '.join(PROTOCOLS)}")
    if dp is not None:
        return _private_session(protocol, n_clients, vector_length, dp=dp, ring_bits=ring_bits,
                                expected_dropout=expected_dropout, rounding_seed=rounding_seed,
                                key_bits=key_bits, keypair=keypair, threshold=threshold,
                                degree=degree, prg=prg, maskers=maskers, unmasker=unmasker,
                                threat_model=threat_model)
    if (maskers or unmasker) and protocol not in ("secagg", "secagg+"):
        raise ParameterError(f"maskers and unmaskers handle pairwise-mask uploads; {protocol!r} "
                             "has none")
    if protocol == "plain":
        return PlainSession(n_clients, vector_length, noise=noise)
    if protocol == "paillier":
        return _paillier_session(n_clients, vector_length, clip=clip, ring_bits=ring_bits,
                                 key_bits=key_bits, keypair=keypair, rounding_seed=rounding_seed,
                                 noise=noise, quorum=1 if threshold is None else threshold)
    return SecAggSession(n_clients, vector_length, clip=clip, protocol=protocol,
                         ring_bits=ring_bits, expected_dropout=max(expected_dropout, 0.05),
                         rounding_seed=rounding_seed, noise=noise, threshold=threshold,
                         degree=degree, prg=prg, maskers=maskers, unmasker=unmasker,
                         threat_model=threat_model)


def _paillier_session(n_clients: int, vector_length: int, *, clip: float, ring_bits: int,
                      key_bits: int, keypair: object | None, rounding_seed: bytes | None,
                      noise: RingNoise | None, quorum: int) -> AggregationSession:
    """A Paillier session whose key holder decrypts sums of at least `quorum` uploads;
    RingNoise becomes its per-client noise hook at the session's scale."""
    from .paillier import PaillierSession  # phe is optional: import only when asked for

    if noise is None:
        return PaillierSession(n_clients, vector_length, clip=clip, key_bits=key_bits,
                               ring_bits=ring_bits, keypair=keypair, rounding_seed=rounding_seed,
                               quorum=quorum)
    scale_bits = release_scale_bits("paillier", n_clients, clip=clip, ring_bits=ring_bits,
                                    headroom=noise.headroom)
    assert scale_bits is not None
    # ceil(clip 2^f) + floor(headroom 2^f) <= ceil((clip + headroom) 2^f): the codec's budget
    bound = math.floor(math.ldexp(noise.headroom, scale_bits))

    def hook(client: int, step: int, length: int) -> np.ndarray:
        return noise.sample(length, scale_bits)

    return PaillierSession(n_clients, vector_length, clip=clip, key_bits=key_bits,
                           ring_bits=ring_bits, keypair=keypair, rounding_seed=rounding_seed,
                           scale_bits=scale_bits, noise=hook, noise_bound=bound, quorum=quorum)


def release_scale_bits(protocol: str, n_clients: int, *, clip: float, ring_bits: int = 32,
                       headroom: float = 0.0) -> int | None:
    """The fixed-point precision a session of `protocol` encodes at (None: float, no grid)."""
    if protocol == "plain":
        return PLAIN_NOISE_SCALE_BITS if headroom > 0 else None
    return FixedPointCodec.for_clients(n_clients, clip=clip, ring_bits=ring_bits,
                                       headroom=headroom).scale_bits


def release_threshold(protocol: str, n_clients: int, *, threshold: int | None = None,
                      expected_dropout: float = 0.1, degree: int | None = None) -> int:
    """The share threshold (SecAgg) or decryption quorum (Paillier) a session will use."""
    if protocol in ("secagg", "secagg+"):
        return plan_parameters(n_clients, protocol=protocol, threshold=threshold,
                               degree=degree, expected_dropout=max(expected_dropout, 0.05))[1]
    return default_threshold(n_clients) if threshold is None else threshold


def _private_session(protocol: str, n_clients: int, vector_length: int, *, dp: DPSpec,
                     threshold: int | None, degree: int | None,
                     **options) -> AggregationSession:
    from .dp import DistributedNoise
    from .private import PrivateSession, min_contributors

    t = release_threshold(protocol, n_clients, threshold=threshold, degree=degree,
                          expected_dropout=options["expected_dropout"])
    noise = None
    if dp.mode == "distributed":
        floor = min_contributors(protocol, threshold=t, n_clients=n_clients)
        if dp.min_contributors is None or dp.min_contributors > floor:
            raise ParameterError(
                f"distributed noise sized for {dp.min_contributors} contributors, but a "
                f"{protocol} release of {n_clients} clients (threshold {t}) can hold as few as "
                f"{floor}: set min_contributors <= {floor}")
        noise = DistributedNoise(dp)
    inner = open_session(protocol, n_clients, vector_length, clip=dp.l2_clip, noise=noise,
                         threshold=t if protocol != "plain" else None, degree=degree, **options)
    return PrivateSession(inner, dp)
