"""Every Paillier handler (client, server, key holder), fed hostile messages: only ProtocolError.

A recorded honest packed-Paillier session (6 clients under the 256-bit known-answer key, quorum
2, client 5 absent from step 2) gives each role just before each of its handlers, and the
honest message that handler read. Each case takes a fresh copy of the role, builds a hostile
message from an honest one (tests/protocols/hostile.py: absurd client counts, slot counts, key
sizes and vector lengths in a valid encoding, ciphertext lists of the wrong length, ciphertexts
0 or >= N^2, repeated or unknown clients, replays from step 1, cut and oversized bodies) and
checks that the role answers with a well-formed message, nothing, a sum, or a ProtocolError.
The cases are seeded: the same ones every run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from protocols.codec import FixedPointCodec
from protocols.limits import OfferLimits
from protocols.paillier.messages import (
    Ciphertexts,
    ClientKey,
    Offer,
    PublicKeyMessage,
    StepRequest,
    UploadBundle,
)
from protocols.paillier.roles import PaillierClient, PaillierKeyHolder, PaillierServer
from protocols.session import StepOutcome

from .conftest import known_answer_keypair
from .hostile import Hostile, Tally

N, M, QUORUM, ABSENT = 6, 8, 2, 5  # client ABSENT sends nothing at step 2
# an offer the client accepts is encrypted for: small limits keep every accepted one cheap
FUZZ_LIMITS = OfferLimits(max_clients=1_000, max_vector_length=2**16, max_key_bits=1024)
CASES = {"client": 2_000, "server": 1_800, "key holder": 1_400}
KEYPAIR = known_answer_keypair()
CODEC = FixedPointCodec.for_clients(N, clip=1.0)
X = np.random.default_rng(0).uniform(-1, 1, (3, N, M))


def _client(cid: int, offer: bytes) -> PaillierClient:
    return PaillierClient(cid, offer, unsafe_small_keys=True, limits=FUZZ_LIMITS)


def _server(announcement: bytes) -> PaillierServer:
    return PaillierServer(announcement, n_clients=N, vector_length=M, codec=CODEC,
                          unsafe_small_keys=True, quorum=QUORUM)


@dataclass
class Step:
    """One recorded step: the request, every upload, the bundle and the decrypted sum."""

    request: bytes
    uploads: dict[int, bytes]
    bundle: bytes
    plaintexts: bytes


@dataclass
class Recording:
    """Setup messages, two steps, and each role just before a handler of step 2."""

    announcement: bytes
    offer: bytes  # client 0's
    enrollment: bytes  # client 0's
    steps: tuple[Step, Step]
    snapshots: dict[str, Any]  # handler -> the role about to run it

    def fresh(self, handler: str) -> Any:
        return copy.deepcopy(self.snapshots[handler])


def _record() -> Recording:
    holder = PaillierKeyHolder(KEYPAIR, n_clients=N, vector_length=M, codec=CODEC,
                               unsafe_small_keys=True, quorum=QUORUM)
    announcement = holder.announce()
    server = _server(announcement)
    offers = {c: server.offer(c) for c in range(N)}
    clients = {c: _client(c, offers[c]) for c in range(N)}
    snapshots: dict[str, Any] = {}
    for c in sorted(clients, reverse=True):  # client 0 enrolls last
        if c == 0:
            snapshots["enroll"] = copy.deepcopy(holder)
        holder.enroll(clients[c].enrollment())
    steps = []
    for step, present in ((1, range(N)), (2, [c for c in range(N) if c != ABSENT])):
        if step == 2:
            snapshots["upload"] = copy.deepcopy(clients[0])
        request = server.open_step()
        uploads = {c: clients[c].upload(request, X[step, c]) for c in present}
        if step == 2:
            snapshots["forward"], snapshots["decrypt"] = copy.deepcopy((server, holder))
        bundle = server.forward(uploads)
        if step == 2:
            snapshots["finish"] = copy.deepcopy(server)
        plaintexts = holder.decrypt(bundle)
        assert server.finish(plaintexts).included == frozenset(present)
        steps.append(Step(request, uploads, bundle, plaintexts))
    return Recording(announcement, offers[0], clients[0].enrollment(), (steps[0], steps[1]),
                     snapshots)


RECORDING = _record()
FIRST, SECOND = RECORDING.steps


def _hostile(seed: int) -> Hostile:
    return Hostile(seed, n=N, m=M, step=2, modulus=KEYPAIR[0].n)


def _upload(data: bytes) -> Ciphertexts:
    return Ciphertexts.decode(data, Ciphertexts.UPLOAD)


def _plaintexts(data: bytes) -> Ciphertexts:
    return Ciphertexts.decode(data, Ciphertexts.PLAINTEXT)


def _message(hostile: Hostile, template: object) -> bytes:
    return hostile.oversize(hostile.message(template))


def _fuzz_client(tally: Tally) -> None:
    hostile = _hostile(11)
    for i in range(CASES["client"]):
        if i % 2 == 0:  # a hostile offer: the client is built from it
            data = _message(hostile, Offer.decode(RECORDING.offer))

            def case(data: bytes = data) -> None:
                client = _client(0, data)
                ClientKey.decode(client.enrollment())
                m = client.offer.vector_length
                if m <= 64:  # packs and encrypts under whatever layout it accepted
                    request = StepRequest(client.offer.session_id, 1).encode()
                    _upload(client.upload(request, np.full(m, 0.5)))
                    tally.note("an accepted offer encrypted")

            tally.run(f"client offer case {i} ({data[:64].hex()}...)", case)
        else:  # a hostile step request to a client that has uploaded at step 1
            data = _message(hostile, StepRequest.decode(SECOND.request))
            client = RECORDING.fresh("upload")
            tally.run(f"client step case {i} ({data[:64].hex()}...)",
                      lambda client=client, data=data: _upload(client.upload(data, X[2, 0])))


def _hostile_uploads(hostile: Hostile) -> dict[int, bytes]:
    """Step 2's uploads with one to four replaced: hostile, replayed from step 1, or another
    client's; sometimes one more from an id that is not a client's."""
    honest = SECOND.uploads
    uploads = dict(honest)
    for cid in hostile.rng.sample(sorted(uploads), hostile.rng.randint(1, 4)):
        kind = hostile.rng.random()
        if kind < 0.15:
            uploads[cid] = FIRST.uploads[cid]
        elif kind < 0.25:
            uploads[cid] = honest[hostile.rng.choice(sorted(honest))]
        else:
            uploads[cid] = _message(hostile, _upload(honest[cid]))
    if hostile.chance(0.1):
        uploads[hostile.u32(N, N + 1)] = _message(hostile, _upload(honest[0]))
    return uploads


def _fuzz_server(tally: Tally) -> None:
    hostile = _hostile(12)
    for i in range(CASES["server"]):
        handler = ("announcement", "forward", "forward", "finish")[i % 4]
        if handler == "announcement":
            data = _message(hostile, PublicKeyMessage.decode(RECORDING.announcement))

            def case(data: bytes = data) -> None:
                Offer.decode(_server(data).offer(0))
        elif handler == "forward":
            uploads = _hostile_uploads(hostile)

            def case(uploads: dict[int, bytes] = uploads) -> None:
                server = RECORDING.fresh("forward")
                try:
                    assert len(UploadBundle.decode(server.forward(uploads)).uploads) >= QUORUM
                finally:
                    for _, _, error in server.rejections:
                        tally.note(f"rejected: {type(error).__name__}")
        else:
            data = _message(hostile, _plaintexts(SECOND.plaintexts))

            def case(data: bytes = data) -> None:
                outcome = RECORDING.fresh("finish").finish(data)
                assert isinstance(outcome, StepOutcome) and np.isfinite(outcome.total).all()

        tally.run(f"server case {i} ({handler})", case)


def _bundle_template(hostile: Hostile) -> UploadBundle:
    """Step 2's bundle, step 1's (a replay), or step 2's with one upload from step 1."""
    honest = UploadBundle.decode(SECOND.bundle)
    pick = hostile.rng.random()
    if pick < 0.15:
        return UploadBundle.decode(FIRST.bundle)
    if pick < 0.3:
        uploads = list(honest.uploads)
        at = hostile.rng.randrange(len(uploads))
        uploads[at] = _upload(FIRST.uploads[uploads[at].sender])
        return UploadBundle(honest.session_id, honest.step, tuple(uploads))
    return honest


def _fuzz_key_holder(tally: Tally) -> None:
    hostile = _hostile(13)
    for i in range(CASES["key holder"]):
        if i % 3 == 0:  # a hostile client key, with every other client enrolled
            handler, data = "enroll", _message(hostile, ClientKey.decode(RECORDING.enrollment))

            def case(data: bytes = data) -> None:
                assert RECORDING.fresh("enroll").enroll(data) is None
        else:  # a hostile bundle after step 1 was decrypted
            handler, data = "decrypt", _message(hostile, _bundle_template(hostile))

            def case(data: bytes = data) -> None:
                assert len(_plaintexts(RECORDING.fresh("decrypt").decrypt(data)).members) >= QUORUM

        tally.run(f"key holder case {i} ({handler}, {data[:64].hex()}...)", case)


@pytest.mark.parametrize(("target", "fuzz", "endings"), [
    ("client", _fuzz_client, 6),
    ("server", _fuzz_server, 5),
    ("key holder", _fuzz_key_holder, 5),
])
def test_hostile_messages_to_paillier_roles_end_in_an_answer_or_a_protocol_error(
        target, fuzz, endings):
    tally = Tally()
    fuzz(tally)
    assert tally.total == CASES[target]
    # the cases reach past the first check: some are answered, and the refusals vary
    assert tally.ends["answered"] > 0, tally.ends
    assert len(tally.ends) >= endings, tally.ends
    if target == "client":
        assert tally.notes["an accepted offer encrypted"] > 0, tally.notes
    if target == "server":  # a bad upload excludes its sender, for several reasons
        assert len(tally.notes) >= 3, tally.notes


def test_the_paillier_fuzz_runs_at_least_five_thousand_cases():
    assert sum(CASES.values()) >= 5_000
