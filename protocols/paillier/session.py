"""Packed Paillier aggregation: clients encrypt and tag, a server relays, a key holder decrypts.

Front door of the Paillier path: `PaillierSession` (SecAggSession's surface, many steps over one
key) and `paillier_sum` (one call, a protocols.session.SecureSumResult). The server never holds
the private key; the key holder multiplies client-tagged uploads itself and decrypts only their
product, so it learns each step's sum of at least its quorum. See docs/paillier.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError, ProtocolError
from ..inputs import check_count, check_step_inputs, check_vectors
from ..primitives.kdf import derive_key
from ..session import Dropout, FaultPlan, SecureSumResult, Stage, StepOutcome, Traffic
from .packing import SlotLayout
from .roles import (
    DEFAULT_KEY_BITS,
    MIN_KEY_BITS,
    Keypair,
    Noise,
    PaillierClient,
    PaillierKeyHolder,
    PaillierServer,
    ParallelEncryptor,
    generate_keypair,
    session_codec,
    unsafe_keypair_from_primes,
)

__all__ = [
    "DEFAULT_KEY_BITS", "MIN_KEY_BITS", "PaillierSession", "PaillierTraffic", "generate_keypair",
    "paillier_sum", "unsafe_keypair_from_primes",
]


@dataclass
class PaillierTraffic(Traffic):
    """Traffic, plus the key holder's seconds and bytes (in: client keys and each step's
    uploads; out: its public keys and the sums)."""

    key_holder_seconds: float = 0.0
    key_holder_bytes_in: int = 0
    key_holder_bytes_out: int = 0


class _Clock:
    """Adds the wall time of a block to one counter."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> _Clock:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


class PaillierSession:
    """A multi-step packed-Paillier session with SecAggSession's surface.

    One key holder, one server and n clients in process, talking in bytes. The key holder
    decrypts only its own product of at least `quorum` client-tagged uploads (`threshold`
    reports it; 1 by default, and what distributed DP noise is sized for), and `degree` is 0
    (clients share no pairwise keys). Every client stays `active`: one that misses a step may
    send in the next. `key_bits` is ignored when `keypair` (from generate_keypair) is given.
    `noise(client, step, length)` returns int64 noise in fixed-point units, |noise| <=
    noise_bound, added to the client's encoding before packing.
    """

    protocol = "paillier"
    degree = 0

    def __init__(self, n_clients: int, vector_length: int, *, clip: float,
                 key_bits: int = DEFAULT_KEY_BITS, scale_bits: int | None = None,
                 ring_bits: int = 32, rounding: str = "stochastic",
                 rounding_seed: bytes | None = None, noise: Noise | None = None,
                 noise_bound: int = 0, workers: int | None = None, keypair: Keypair | None = None,
                 guard_bits: int = 1, unsafe_small_keys: bool = False, quorum: int = 1) -> None:
        n_clients = check_count("secure aggregation's number of clients", n_clients, low=2)
        vector_length = check_count("vector_length", vector_length)
        noise_bound = check_count("noise_bound", noise_bound, low=0)
        if check_count("quorum", quorum) > n_clients:
            raise ParameterError(f"quorum must be at most the {n_clients} clients, got {quorum}")
        self.threshold = quorum
        if noise is not None and not callable(noise):
            raise ParameterError("noise must be None or a callable (client, step, length)")
        self.n_clients, self.vector_length = n_clients, vector_length
        self.codec = session_codec(n_clients, clip=clip, ring_bits=ring_bits,
                                   scale_bits=scale_bits, rounding=rounding,
                                   noise_bound=noise_bound)
        self.traffic = PaillierTraffic.zeros(n_clients)
        self.refusals: list[tuple[int, int, ProtocolError]] = []  # (step, client, error)
        with _Clock() as clock:
            self.key_holder = PaillierKeyHolder(
                keypair, n_clients=n_clients, vector_length=vector_length, codec=self.codec,
                noise_bound=noise_bound, guard_bits=guard_bits, key_bits=key_bits,
                quorum=quorum, unsafe_small_keys=unsafe_small_keys)
            announcement = self.key_holder.announce()
        self.traffic.key_holder_seconds += clock.seconds
        self.traffic.key_holder_bytes_out += len(announcement)
        with _Clock() as clock:
            self.server = PaillierServer(announcement, n_clients=n_clients,
                                         vector_length=vector_length, codec=self.codec,
                                         noise_bound=noise_bound, guard_bits=guard_bits,
                                         unsafe_small_keys=unsafe_small_keys)
            offers = {cid: self.server.offer(cid) for cid in range(n_clients)}
        self.traffic.server_seconds += clock.seconds
        self.encryptor = ParallelEncryptor(workers)
        self.clients: dict[int, PaillierClient] = {}
        for cid, offer in offers.items():
            seed = None if rounding_seed is None else derive_key(
                rounding_seed, session_id=b"rounding", purpose="client-rounding", context=(cid,))
            self.traffic.bytes_down[cid] += len(offer)
            with _Clock() as clock:
                self.clients[cid] = PaillierClient(cid, offer, rounding_seed=seed, noise=noise,
                                                   encryptor=self.encryptor,
                                                   unsafe_small_keys=unsafe_small_keys)
                enrollment = self.clients[cid].enrollment()
            self.traffic.client_seconds[cid] += clock.seconds
            # relayed by the server; the key holder trusts it is the client's real key
            self.traffic.bytes_up[cid] += len(enrollment)
            with _Clock() as clock:
                self.key_holder.enroll(enrollment)
            self.traffic.key_holder_seconds += clock.seconds
            self.traffic.key_holder_bytes_in += len(enrollment)

    @property
    def active(self) -> frozenset[int]:
        """Clients that may send in the next step: all of them."""
        return frozenset(range(self.n_clients))

    def error_bound(self, n_summed: int) -> float:
        """Worst-case per-coordinate decode error of a sum of n_summed inputs."""
        return self.codec.error_bound(n_summed)

    @property
    def layout(self) -> SlotLayout:
        """The slot layout every client packs with."""
        return self.server.layout

    def step(self, inputs: Mapping[int, np.ndarray], *,
             drop_after_upload: Iterable[int] = ()) -> StepOutcome:
        """Sum one vector per client in `inputs`; the others are dropped from this step.

        Clients in `drop_after_upload` still count: Paillier needs nothing from them afterwards.
        """
        check_step_inputs(inputs, drop_after_upload, active=self.active,
                          length=self.vector_length, floats_only=True)
        t = self.traffic
        with _Clock() as clock:
            request = self.server.open_step()
        t.server_seconds += clock.seconds
        uploads = {}
        for cid in sorted(inputs):
            t.bytes_down[cid] += len(request)
            try:
                with _Clock() as clock:
                    uploads[cid] = self.clients[cid].upload(request, inputs[cid])
            except ProtocolError as error:  # the client refuses; it is absent from the sum
                self.refusals.append((self.server.last_step, cid, error))
                continue
            finally:
                t.client_seconds[cid] += clock.seconds
            t.bytes_up[cid] += len(uploads[cid])
        with _Clock() as clock:
            bundle = self.server.forward(uploads)
        t.server_seconds += clock.seconds
        with _Clock() as clock:
            plaintexts = self.key_holder.decrypt(bundle)
        t.key_holder_seconds += clock.seconds
        t.key_holder_bytes_in += len(bundle)
        t.key_holder_bytes_out += len(plaintexts)
        with _Clock() as clock:
            outcome = self.server.finish(plaintexts)
        t.server_seconds += clock.seconds
        return outcome

    def close(self) -> None:
        """Stop the encryption worker processes."""
        self.encryptor.close()

    def __enter__(self) -> PaillierSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def paillier_sum(vectors: Sequence[np.ndarray] | np.ndarray, *, clip: float | None = None,
                 key_bits: int = DEFAULT_KEY_BITS, keypair: Keypair | None = None,
                 dropouts: Iterable[Dropout | int] = (), dropout_rate: float = 0.0,
                 dropout_stage: Stage | str = Stage.SHARES, seed: int = 0, ring_bits: int = 32,
                 scale_bits: int | None = None, rounding: str = "stochastic",
                 workers: int | None = None, unsafe_small_keys: bool = False
                 ) -> SecureSumResult:
    """Sum n client vectors under packed Paillier; returns a protocols.session.SecureSumResult.

    `dropouts` name clients (ints, or Dropouts at a step <= 1 and stage advertise/upload) that
    never send; later dropouts change nothing, since uploads are all Paillier needs. `clip`
    defaults to the largest absolute input (a deployment declares it up front).
    """
    stacked = check_vectors(vectors)
    n, m = stacked.shape
    clip = float(clip if clip is not None else max(float(np.abs(stacked).max()), 1e-12))
    plan = FaultPlan.random(n, rate=dropout_rate, stage=dropout_stage, seed=seed)
    gone = {d if isinstance(d, int) else d.client for d in [*plan.dropouts, *dropouts]
            if isinstance(d, int) or d.step == 0 or (d.step == 1 and Stage(d.stage) in
                                                     (Stage.ADVERTISE, Stage.UPLOAD))}
    with PaillierSession(n, m, clip=clip, key_bits=key_bits, keypair=keypair,
                         ring_bits=ring_bits, scale_bits=scale_bits, rounding=rounding,
                         workers=workers, unsafe_small_keys=unsafe_small_keys) as session:
        outcome = session.step({c: stacked[c] for c in range(n) if c not in gone})
    t = session.traffic
    return SecureSumResult(
        outcome.total, tuple(sorted(outcome.included)), tuple(sorted(outcome.dropped)),
        t.bytes_up, t.bytes_down, t.client_seconds, t.server_seconds,
        session.codec.error_bound(len(outcome.included)), "paillier", session.threshold,
        session.degree,
    )
