"""Packed Paillier aggregation: clients encrypt and tag, a server relays, a key holder decrypts.

Front door of the Paillier path: `PaillierSession` (SecAggSession's surface, many steps over one
key) and `paillier_sum` (one call, a protocols.session.SecureSumResult). The server never holds
the private key; the key holder multiplies client-tagged uploads itself and decrypts only their
product, so it learns each step's sum of at least its quorum. See docs/paillier.md.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import IntegrityError, ParameterError, ProtocolError, TooFewSurvivorsError
from ..inputs import check_count, check_step_inputs, check_vectors, without_departed
from ..limits import OfferLimits
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


# the stages at which a Paillier client sends something: its key at setup, then its uploads
_REPLIES = (Stage.ADVERTISE, Stage.UPLOAD)
_ORDER = {stage: index for index, stage in enumerate(Stage)}


def _paillier_faults(faults: FaultPlan | None, n_clients: int) -> FaultPlan:
    """`faults` checked against n clients; tampering only where a Paillier client replies."""
    plan = (faults or FaultPlan()).check(n_clients)
    for step, client, stage in sorted(plan.tamper):
        if stage not in _REPLIES:
            raise ParameterError(f"FaultPlan.tamper stage: a Paillier client sends nothing at "
                                 f"{stage.value!r} (only its key at advertise and its uploads), "
                                 f"got ({step}, {client}, {stage.value!r})")
    return plan


class PaillierSession:
    """A multi-step packed-Paillier session with SecAggSession's surface.

    One key holder, one server and n clients in process, talking in bytes. The key holder
    decrypts only its own product of at least `quorum` client-tagged uploads (`threshold`
    reports it; 1 by default, and what distributed DP noise is sized for), and `degree` is 0
    (clients share no pairwise keys). A client that misses a step may send in the next; one
    that `faults` silences stays silent (docs/protocol.md, "Dropouts and limits").
    `key_bits` is ignored when `keypair` (from generate_keypair) is given.
    `noise(client, step, length)` returns int64 noise in fixed-point units, |noise| <=
    noise_bound, added to the client's encoding before packing. `limits` (OfferLimits) is the
    largest session the clients join; the session refuses to open beyond it.
    """

    protocol = "paillier"
    degree = 0

    def __init__(self, n_clients: int, vector_length: int, *, clip: float,
                 key_bits: int = DEFAULT_KEY_BITS, scale_bits: int | None = None,
                 ring_bits: int = 32, rounding: str = "stochastic",
                 rounding_seed: bytes | None = None, noise: Noise | None = None,
                 noise_bound: int = 0, workers: int | None = None, keypair: Keypair | None = None,
                 guard_bits: int = 1, unsafe_small_keys: bool = False, quorum: int = 1,
                 faults: FaultPlan | None = None, limits: OfferLimits | None = None) -> None:
        n_clients = check_count("secure aggregation's number of clients", n_clients, low=2)
        vector_length = check_count("vector_length", vector_length)
        noise_bound = check_count("noise_bound", noise_bound, low=0)
        if check_count("quorum", quorum) > n_clients:
            raise ParameterError(f"quorum must be at most the {n_clients} clients, got {quorum}")
        # what every client would refuse is refused here, before a key is drawn
        limits = limits or OfferLimits()
        limits.check_clients(n_clients)
        limits.check_vector_length(vector_length)
        if keypair is None:
            limits.check_key_bits(key_bits)
        self.faults = _paillier_faults(faults, n_clients)
        self._silent_from = self.faults.silent_from()
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
                                         unsafe_small_keys=unsafe_small_keys, quorum=quorum)
            offers = {cid: self.server.offer(cid) for cid in range(n_clients)}
        self.traffic.server_seconds += clock.seconds
        self.encryptor = ParallelEncryptor(workers)
        self.clients: dict[int, PaillierClient] = {}
        self._enrolled: set[int] = set()
        for cid, offer in offers.items():
            if self._silent(cid, 0, Stage.ADVERTISE):
                continue  # it never reads its offer nor sends its key
            seed = None if rounding_seed is None else derive_key(
                rounding_seed, session_id=b"rounding", purpose="client-rounding", context=(cid,))
            self.traffic.bytes_down[cid] += len(offer)
            with _Clock() as clock:
                self.clients[cid] = PaillierClient(cid, offer, rounding_seed=seed, noise=noise,
                                                   encryptor=self.encryptor, limits=limits,
                                                   unsafe_small_keys=unsafe_small_keys)
                enrollment = self.clients[cid].enrollment()
            self.traffic.client_seconds[cid] += clock.seconds
            # relayed by the server; the key holder trusts it is the client's real key
            self.traffic.bytes_up[cid] += len(enrollment)
            if self._arrives(0, cid, Stage.ADVERTISE):
                self._enroll(cid, enrollment)
        if len(self.active) < quorum:
            raise TooFewSurvivorsError(needed=quorum, remaining=len(self.active),
                                       context="Paillier key setup")

    def _silent(self, client: int, step: int, stage: Stage) -> bool:
        """Whether the fault plan has silenced `client` by `stage` of `step`."""
        point = self._silent_from.get(client)
        return point is not None and point <= (step, _ORDER[stage])

    def _arrives(self, step: int, client: int, stage: Stage) -> bool:
        """Whether a reply the client sent reaches its reader: a tampered one fails the
        channel's authentication and is discarded, as in the SecAgg network."""
        if (step, client, stage) in self.faults.tamper:
            self.refusals.append((step, client, IntegrityError(
                "message failed channel authentication (tampered)")))
            return False
        return True

    def _enroll(self, cid: int, enrollment: bytes) -> None:
        with _Clock() as clock:
            try:
                self.key_holder.enroll(enrollment)
                self._enrolled.add(cid)
            except ProtocolError as error:  # the key holder refuses it: the client is not in
                self.refusals.append((0, cid, error))
        self.traffic.key_holder_seconds += clock.seconds
        self.traffic.key_holder_bytes_in += len(enrollment)

    @property
    def active(self) -> frozenset[int]:
        """Clients that may send in the next step: every enrolled client the fault plan has not
        silenced in a step that has begun."""
        begun = self.server.last_step
        return frozenset(c for c in self._enrolled
                         if c not in self._silent_from or self._silent_from[c][0] > begun)

    def error_bound(self, n_summed: int) -> float:
        """Worst-case per-coordinate decode error of a sum of n_summed inputs."""
        return self.codec.error_bound(n_summed)

    @property
    def layout(self) -> SlotLayout:
        """The slot layout every client packs with."""
        return self.server.layout

    def step(self, inputs: Mapping[int, np.ndarray], *,
             drop_after_upload: Iterable[int] = ()) -> StepOutcome:
        """Sum one vector per active client in `inputs`; the others are absent from this step.

        Clients in `drop_after_upload` still count: Paillier needs nothing from them afterwards,
        and they may send again next step. A client the fault plan silences before its upload,
        or whose upload is late or tampered with, is not in the sum; a silenced one never comes
        back, and its input and `drop_after_upload` entry are ignored. The outcome's `dropped`
        are the clients active when the call began that are not in the sum.
        """
        inputs, drop_after_upload = without_departed(inputs, drop_after_upload,
                                                     n_clients=self.n_clients, active=self.active)
        check_step_inputs(inputs, drop_after_upload, active=self.active,
                          length=self.vector_length, floats_only=True)
        before = self.active
        t = self.traffic
        with _Clock() as clock:
            request = self.server.open_step()
        t.server_seconds += clock.seconds
        step = self.server.last_step
        uploads = {}
        for cid in sorted(inputs):
            if self._silent(cid, step, Stage.UPLOAD):
                continue
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
            if (step, cid) in self.faults.late or not self._arrives(step, cid, Stage.UPLOAD):
                del uploads[cid]  # after the deadline, or discarded by the channel
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
        return dataclasses.replace(outcome, dropped=before - outcome.included)

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
                 workers: int | None = None, unsafe_small_keys: bool = False, quorum: int = 1
                 ) -> SecureSumResult:
    """Sum n client vectors under packed Paillier; returns a protocols.session.SecureSumResult.

    `dropouts` are Dropouts, or ints naming clients that never upload (Dropout(c, 1, "upload"));
    `dropout_rate` drops each client at `dropout_stage` of the first step (or of the key setup).
    The session plays them as docs/protocol.md's "Dropouts and limits" says: a client silent
    before its upload is not in the sum, one silent after it is; a client named twice falls
    silent at the earliest; a malformed one is refused with a ParameterError. `clip` defaults to
    the largest absolute input (a deployment declares it up front).
    """
    stacked = check_vectors(vectors)
    n, m = stacked.shape
    clip = float(clip if clip is not None else max(float(np.abs(stacked).max()), 1e-12))
    named = [d if isinstance(d, Dropout) else Dropout(d, 1, Stage.UPLOAD) for d in dropouts]
    plan = FaultPlan.for_clients(n, named, rate=dropout_rate, stage=dropout_stage, seed=seed)
    with PaillierSession(n, m, clip=clip, key_bits=key_bits, keypair=keypair,
                         ring_bits=ring_bits, scale_bits=scale_bits, rounding=rounding,
                         workers=workers, unsafe_small_keys=unsafe_small_keys, quorum=quorum,
                         faults=plan) as session:
        outcome = session.step({c: stacked[c] for c in range(n)})
    t = session.traffic
    included = tuple(sorted(outcome.included))
    return SecureSumResult(
        outcome.total, included, tuple(c for c in range(n) if c not in outcome.included),
        t.bytes_up, t.bytes_down, t.client_seconds, t.server_seconds,
        session.codec.error_bound(len(included)), "paillier", session.threshold, session.degree,
    )
