"""In-process router between a server and its clients: bytes, time, dropouts, lateness, tampering.

Links model an authenticated channel (TLS in a deployment) with AES-256-GCM: a tampered
message fails verification and is discarded, so tampering can cost a client its place in a step
but never silently changes a sum.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import IntegrityError, ProtocolError
from .secagg.client import SecAggClient
from .secagg.server import SecAggServer
from .session import Dropout, FaultPlan, Stage, StepOutcome, Traffic, stage_index
from .transport import Delivery, Missed, run_setup, run_step

_NONCE_BYTES, _TAG_BYTES = 12, 16  # AES-256-GCM framing of each link message


@dataclass(frozen=True)
class _Frame:
    """What crosses a link: nonce, payload and tag, kept apart so a megabyte upload is not
    copied into one buffer and out again in process; `bytes(frame)` is the wire form."""

    nonce: bytes
    payload: bytes
    tag: bytes

    def __bytes__(self) -> bytes:
        return b"".join((self.nonce, self.payload, self.tag))

    @classmethod
    def from_wire(cls, data: bytes) -> _Frame:
        if len(data) < _NONCE_BYTES + _TAG_BYTES:
            raise IntegrityError("frame shorter than its nonce and tag")
        view = memoryview(data)
        return cls(bytes(view[:_NONCE_BYTES]), bytes(view[_NONCE_BYTES:-_TAG_BYTES]),
                   bytes(view[-_TAG_BYTES:]))


class _Link:
    """One authenticated client <-> server channel: AES-256-GCM over each frame.

    The payload is authenticated as associated data (GMAC; no encryption: the simulation needs
    no confidentiality on its wire, and masked uploads are uniform anyway) under a fresh random
    96-bit nonce per frame (the AEAD of TLS 1.3's TLS_AES_256_GCM_SHA384). Random nonces are
    safe for 2^32 frames per link key (NIST SP 800-38D), far more than any session sends. GMAC
    ran at 33 GB/s against Poly1305's 12.5 on our CPU (VAES, VPCLMULQDQ) over a 3 MiB upload.
    """

    def __init__(self) -> None:
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))

    def seal(self, payload: bytes) -> _Frame:
        nonce = os.urandom(_NONCE_BYTES)
        return _Frame(nonce, payload, self._aead.encrypt(nonce, b"", payload))

    def open(self, frame: _Frame | bytes) -> bytes:
        """The authenticated payload of a frame (or of its wire form)."""
        if not isinstance(frame, _Frame):
            frame = _Frame.from_wire(frame)
        if len(frame.nonce) != _NONCE_BYTES or len(frame.tag) != _TAG_BYTES:
            raise IntegrityError("frame with a malformed nonce or tag")
        try:
            self._aead.decrypt(frame.nonce, frame.tag, frame.payload)
        except InvalidTag:
            raise IntegrityError("message failed channel authentication (tampered)") from None
        return frame.payload


def _tampered(frame: _Frame) -> _Frame:
    flipped = bytearray(bytes(frame))
    flipped[len(flipped) // 2] ^= 0x01
    return _Frame.from_wire(bytes(flipped))


class InProcessNetwork:
    """Runs a SecAgg session between in-process parties, with faults injected on the wire.

    A transport (protocols.transport) for the drivers `run_setup` and `run_step`. A client
    falls silent at the earliest point any dropout names for it, and once the network has
    withheld one message from it, it is in `silenced` and stays silent for the session.
    `missed` lists every request that got no usable reply, with the reason.
    """

    def __init__(self, server: SecAggServer, clients: Mapping[int, SecAggClient], *,
                 faults: FaultPlan | None = None) -> None:
        self.server, self.clients = server, dict(clients)
        self.faults = (faults or FaultPlan()).check(server.graph.n)
        self.traffic = Traffic.zeros(server.graph.n)
        self.refusals: list[tuple[int, int, ProtocolError]] = []  # (step, client, error)
        self.late_arrivals: list[tuple[int, int, bytes]] = []  # what the server saw too late
        self.missed: list[Missed] = []
        self.silenced: set[int] = set()
        self._links = {cid: _Link() for cid in self.clients}
        self._silent_from = self.faults.silent_from()
        self._leaving: dict[int, tuple[int, int]] = {}
        self._exchange_seconds = 0.0

    def add_dropouts(self, dropouts: Iterable[Dropout]) -> None:
        """Schedule more dropouts (for sessions whose failures are decided step by step)."""
        added = FaultPlan(list(dropouts)).check(self.server.graph.n).dropouts
        self.faults.dropouts.extend(added)
        self._silent_from = self.faults.silent_from()

    def leave_after_upload(self, clients: Iterable[int], step: int) -> None:
        """`clients` upload at `step`, then fall silent before its share round.

        Each call replaces the last one's clients. Unlike a dropout, this moves with a retried
        step: a client never withheld a message uploads in the retry too (one in `silenced`
        stays silent whatever this says).
        """
        self._leaving = {c: Dropout(c, step, Stage.SHARES).point for c in clients}

    def _silent(self, cid: int, step: int, stage: Stage) -> bool:
        if cid in self.silenced:
            return True
        points = [p for p in (self._silent_from.get(cid), self._leaving.get(cid)) if p]
        if points and (step, stage_index(stage)) >= min(points):
            self.silenced.add(cid)
            return True
        return False

    @contextmanager
    def _server_clock(self) -> Iterator[None]:
        """Time the drivers' calls into the server: all but what the exchanges took."""
        start, exchanged = time.perf_counter(), self._exchange_seconds
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.traffic.server_seconds += elapsed - (self._exchange_seconds - exchanged)

    def exchange(self, requests: Mapping[int, bytes], *, step: int, stage: Stage) -> Delivery:
        """Deliver requests, collect the replies that arrive before the deadline."""
        start = time.perf_counter()
        try:
            replies: dict[int, bytes] = {}
            missed: list[Missed] = []
            for cid, payload in requests.items():
                reply = self._deliver(cid, payload, step, stage)
                if isinstance(reply, Missed):
                    missed.append(reply)
                else:
                    replies[cid] = reply
            return Delivery(replies, tuple(missed))
        finally:
            self._exchange_seconds += time.perf_counter() - start

    def _deliver(self, cid: int, payload: bytes, step: int, stage: Stage) -> bytes | Missed:
        """One request to one client: its authenticated reply (b"" if none is due), or why
        none came."""
        if cid not in self.clients:
            return Missed(step, stage, cid, "no such client")
        if self._silent(cid, step, stage):
            return Missed(step, stage, cid, "no reply before the deadline (dropped out)")
        self.traffic.bytes_down[cid] += len(payload)
        start = time.perf_counter()
        try:
            reply = self.clients[cid].handle(payload)
        except ProtocolError as error:
            self.refusals.append((step, cid, error))
            return Missed(step, stage, cid, f"error reply: {error}")
        finally:
            self.traffic.client_seconds[cid] += time.perf_counter() - start
        if reply is None:
            return b""
        self.traffic.bytes_up[cid] += len(reply)
        frame = self._links[cid].seal(reply)
        if (step, cid, stage) in self.faults.tamper:
            frame = _tampered(frame)
        if stage is Stage.UPLOAD and (step, cid) in self.faults.late:
            self.late_arrivals.append((step, cid, reply))
            return Missed(step, stage, cid, "no reply before the deadline (arrived late)")
        try:
            return self._links[cid].open(frame)
        except IntegrityError as error:
            self.refusals.append((step, cid, error))
            return Missed(step, stage, cid, f"unauthenticated reply: {error}")

    def setup(self) -> None:
        """Offer the session and run the key advertisement."""
        with self._server_clock():
            run_setup(self.server, self, missed=self.missed)

    def step(self) -> StepOutcome:
        """Run one aggregation step to its outcome (or its TooFewSurvivorsError or
        ConsistencyAbortError)."""
        with self._server_clock():
            outcome, _ = run_step(self.server, self, missed=self.missed)
        return outcome
