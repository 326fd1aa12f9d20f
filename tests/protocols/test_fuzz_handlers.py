"""Every decoder and every client and server handler, fed hostile messages: only ProtocolError.

A recorded honest SecAgg session (6 clients, one silent before its upload, the active threat
model) gives a client and a server in each of their stages and the honest message of each stage.
Each case takes a fresh copy of one party, builds a hostile message from an honest one
(tests/protocols/hostile.py: absurd values in a valid encoding, sometimes broken
bytes) and checks that the party answers with a well-formed message, nothing, or a
ProtocolError. The cases are seeded: the same ones every run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from protocols.codec import FixedPointCodec
from protocols.graph import complete_graph
from protocols.limits import OfferLimits
from protocols.paillier import messages as paillier
from protocols.secagg.client import SecAggClient
from protocols.secagg.messages import MESSAGE_TYPES, decode_message
from protocols.secagg.server import SecAggServer
from protocols.session import StepOutcome

from .hostile import Hostile, Tally

N, M, T, SILENT = 6, 8, 3, 5  # client SILENT never uploads, so the pair-seed round runs
# a hostile offer the client accepts builds its graph: small limits keep every accepted one cheap
FUZZ_LIMITS = OfferLimits(max_clients=1_000, max_degree=999, max_vector_length=2**16)
CASES = {"secagg decoders": 8_000, "paillier decoders": 2_000, "client": 6_000,
         "server": 4_000}


@dataclass
class Recording:
    """Snapshots of client 0 and of the server before each stage, with that stage's input."""

    clients: dict[str, Callable[[], SecAggClient]]  # stage -> a fresh client in that stage
    client_requests: dict[str, bytes]  # stage -> the honest request client 0 got in it
    server_states: dict[str, tuple[SecAggServer, dict[int, bytes]]]  # stage -> (server, replies)
    requests: list[bytes]  # every honest request of client 0
    replies: list[bytes]  # every honest reply of client 0


def _provider(cid: int) -> Callable[[int], np.ndarray]:
    return lambda step: np.full(M, 0.01 * (cid + 1), dtype=np.float32)


def _record() -> Recording:
    codec = FixedPointCodec.for_clients(N, clip=1.0)
    server = SecAggServer(graph=complete_graph(N), threshold=T, codec=codec, vector_length=M)
    clients = {c: SecAggClient(_provider(c), limits=FUZZ_LIMITS) for c in range(N)}
    offers = server.open_session()

    def advertised() -> SecAggClient:
        client = SecAggClient(_provider(0), limits=FUZZ_LIMITS)
        client.handle(offers[0])
        return client

    client_states: dict[str, Callable[[], SecAggClient]] = {
        "offer": lambda: SecAggClient(_provider(0), limits=FUZZ_LIMITS),
        "roster": advertised,  # it holds a private key: built afresh, not copied
    }
    client_requests: dict[str, bytes] = {}
    server_states: dict[str, tuple[SecAggServer, dict[int, bytes]]] = {}
    requests, replies = [], []

    def deliver(stage: str, batch: dict[int, bytes], *, skip: frozenset[int] = frozenset()):
        if stage not in client_states:
            snapshot = copy.deepcopy(clients[0])
            client_states[stage] = lambda: copy.deepcopy(snapshot)
        client_requests[stage] = batch[0]
        requests.append(batch[0])
        answers = {}
        for cid, data in batch.items():
            if cid not in skip:
                reply = clients[cid].handle(data)
                if reply is not None:
                    answers[cid] = reply
        if 0 in answers:
            replies.append(answers[0])
        return answers

    def collect(stage: str, answers: dict[int, bytes]):
        server_states[stage] = (copy.deepcopy(server), dict(answers))
        return server.receive(answers)

    rosters = collect("keys", deliver("offer", offers))
    deliver("roster", rosters)
    uploads = deliver("step", server.open_step(), skip=frozenset({SILENT}))
    drops = collect("inputs", uploads)
    confirms = collect("pairwise", deliver("drop", drops))
    shares = collect("consistency", deliver("consistency", confirms))
    outcome = collect("shares", deliver("share", shares))
    assert isinstance(outcome, StepOutcome) and outcome.included == frozenset(range(N - 1))
    return Recording(client_states, client_requests, server_states, requests, replies)


RECORDING = _record()


def _templates() -> list[object]:
    return [decode_message(d) for d in RECORDING.requests + RECORDING.replies]


def _check_reply(reply: object) -> None:
    """A handler's answer: nothing, or bytes that decode to a protocol message."""
    if reply is not None:
        assert isinstance(reply, bytes)
        decode_message(reply)


def _fuzz_secagg_decoders(tally: Tally) -> None:
    hostile = Hostile(1, n=N, m=M)
    templates = _templates()
    for i in range(CASES["secagg decoders"]):
        data = hostile.message(hostile.rng.choice(templates))
        cls = MESSAGE_TYPES.get(data[5]) if len(data) > 5 else None

        def case(data: bytes = data, cls: type | None = cls) -> None:
            message = decode_message(data)
            assert message.encode() == data  # one canonical encoding
            assert cls is not None
            again = cls.decode(data, max_length=M) if cls.__name__ == "MaskedInput" \
                else cls.decode(data)
            assert again.encode() == data

        tally.run(f"secagg decoder case {i} ({data[:64].hex()}...)", case)


def _paillier_templates() -> list[tuple[Callable[[bytes], object], object]]:
    sid, key = bytes(range(16)), bytes(range(32))
    upload = paillier.Ciphertexts(sid, 2, paillier.Ciphertexts.UPLOAD, frozenset({3}), 4,
                                  (5, 7), bytes(32))
    plain = paillier.Ciphertexts(sid, 2, paillier.Ciphertexts.PLAINTEXT, frozenset({1, 3}), 4,
                                 (9,))
    return [
        (paillier.PublicKeyMessage.decode, paillier.PublicKeyMessage(sid, 2**61 - 1, key)),
        (paillier.Offer.decode, paillier.Offer(sid, 1, 4, 16, 1.0, 20, 32, "stochastic", 0, 2,
                                               2**61 - 1, key)),
        (paillier.StepRequest.decode, paillier.StepRequest(sid, 3)),
        (paillier.ClientKey.decode, paillier.ClientKey(sid, 1, key)),
        (lambda d: paillier.Ciphertexts.decode(d, paillier.Ciphertexts.UPLOAD), upload),
        (lambda d: paillier.Ciphertexts.decode(d, paillier.Ciphertexts.PLAINTEXT), plain),
        (paillier.UploadBundle.decode, paillier.UploadBundle(sid, 2, (upload,))),
    ]


def _fuzz_paillier_decoders(tally: Tally) -> None:
    hostile = Hostile(2, n=N, m=M)
    templates = _paillier_templates()
    for i in range(CASES["paillier decoders"]):
        decode, template = hostile.rng.choice(templates)
        data = hostile.message(template)
        if hostile.chance(0.3):  # absurd widths, counts and steps in their fixed fields
            raw = bytearray(data)
            at = hostile.rng.randrange(22, max(len(raw) - 4, 23))
            raw[at : at + 4] = hostile.u32(0, 1, 2048, 2049).to_bytes(4, "little")
            data = bytes(raw)
        tally.run(f"paillier decoder case {i} ({data[:64].hex()}...)",
                  lambda decode=decode, data=data: decode(data))


def _fuzz_client(tally: Tally) -> None:
    hostile = Hostile(3, n=N, m=M)
    templates = _templates()
    stages = sorted(RECORDING.clients)
    for i in range(CASES["client"]):
        stage = stages[i % len(stages)]
        client = RECORDING.clients[stage]()
        # mostly the message this stage expects, sometimes any other
        honest = RECORDING.client_requests[stage]
        template = decode_message(honest) if hostile.chance(0.7) else hostile.rng.choice(
            templates)
        data = hostile.message(template)

        def case(client: SecAggClient = client, data: bytes = data) -> None:
            _check_reply(client.handle(data))

        tally.run(f"client case {i} in stage {stage} ({data[:64].hex()}...)", case)


def _fuzz_server(tally: Tally) -> None:
    hostile = Hostile(4, n=N, m=M)
    templates = _templates()
    stages = sorted(RECORDING.server_states)
    for i in range(CASES["server"]):
        stage = stages[i % len(stages)]
        snapshot, honest = RECORDING.server_states[stage]
        server = copy.deepcopy(snapshot)
        replies = dict(honest)
        for cid in hostile.rng.sample(sorted(replies), hostile.rng.randint(1, 2)):
            template = decode_message(replies[cid]) if hostile.chance(0.8) \
                else hostile.rng.choice(templates)
            replies[cid] = hostile.message(template)

        def case(server: SecAggServer = server, replies: dict[int, bytes] = replies) -> None:
            result = server.receive(replies)
            if isinstance(result, dict):
                for request in result.values():
                    _check_reply(request)
            else:
                assert isinstance(result, StepOutcome)

        tally.run(f"server case {i} in stage {stage}", case)


@pytest.mark.parametrize(("target", "fuzz", "endings"), [
    ("secagg decoders", _fuzz_secagg_decoders, 2),  # decoded, or MalformedMessageError
    ("paillier decoders", _fuzz_paillier_decoders, 2),
    ("client", _fuzz_client, 5),
    ("server", _fuzz_server, 3),
])
def test_hostile_messages_end_in_an_answer_or_a_protocol_error(target, fuzz, endings):
    tally = Tally()
    fuzz(tally)
    assert tally.total == CASES[target]
    # the cases reach past the first check: some are answered, and the refusals vary
    assert tally.ends["answered"] > 0, tally.ends
    assert len(tally.ends) >= endings, tally.ends


def test_the_fuzz_runs_at_least_ten_thousand_cases():
    assert sum(CASES.values()) >= 10_000
