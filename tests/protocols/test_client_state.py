"""A client saved to bytes and restored before every message runs the protocol unchanged: the
same sums, the same refusals (never-both, replays), and hostile state bytes raise StateError."""

from __future__ import annotations

import dataclasses
import random
import re
import struct
import tracemalloc
from collections import Counter

import numpy as np
import pytest

from protocols.codec import FixedPointCodec
from protocols.errors import (
    ConsistencyAbortError,
    PolicyViolationError,
    ProtocolError,
    ReplayError,
    StateError,
)
from protocols.graph import complete_graph, harary_graph
from protocols.limits import OfferLimits
from protocols.secagg.client import ClientStage, SecAggClient
from protocols.secagg.client_state import STATE_VERSION, SavedClient
from protocols.secagg.messages import (
    ConsistencyReply,
    ConsistencyRequest,
    DropRequest,
    MaskedInput,
    PairwiseReveal,
    ShareRequest,
    ShareReveal,
    StepRequest,
)
from protocols.secagg.server import SecAggServer
from protocols.session import Stage
from protocols.transport import run_setup, run_step

from .conftest import Inputs
from .transports import DirectTransport, Restoring

N, M, STEPS = 12, 24, 5
# dropouts at every stage of the session, the key setup included (client -> first silence)
SILENT = {11: (0, Stage.ADVERTISE), 10: (0, Stage.ROSTER), 9: (1, Stage.UPLOAD),
          8: (1, Stage.PAIRWISE), 7: (2, Stage.SHARES), 6: (3, Stage.CONSISTENCY)}
GRAPHS = {"secagg": (complete_graph(N), 4), "secagg+": (harary_graph(N, 8, seed=b"g" * 32), 3)}


def _session(graph_name: str, threat_model: str, *, restoring: bool):
    """Every step's outcome of one session with the dropouts of SILENT."""
    graph, threshold = GRAPHS[graph_name]
    inputs = Inputs(N, M, STEPS, seed=3)
    codec = FixedPointCodec.for_clients(N, clip=1.0, rounding="nearest")
    server = SecAggServer(graph=graph, threshold=threshold, codec=codec, vector_length=M,
                          threat_model=threat_model)
    make = Restoring if restoring else SecAggClient
    clients = {c: make(inputs.provider(c), threat_model=threat_model) for c in range(N)}
    transport = DirectTransport(clients, silent=SILENT)
    run_setup(server, transport)
    outcomes = []
    while server.last_step < STEPS - 1:
        try:
            outcomes.append(run_step(server, transport)[0])
        except ConsistencyAbortError:
            server.abandon_step()
    return outcomes, inputs, codec, clients


@pytest.mark.parametrize("threat_model", ["active", "semi-honest"])
@pytest.mark.parametrize("graph_name", sorted(GRAPHS))
def test_clients_restored_before_every_message_sum_exactly_the_survivors(graph_name,
                                                                        threat_model):
    outcomes, inputs, codec, clients = _session(graph_name, threat_model, restoring=True)
    reference, *_ = _session(graph_name, threat_model, restoring=False)
    assert len(outcomes) >= 3 and all(clients[c].restores > 5 for c in range(6))
    assert {c for o in outcomes for c in o.dropped} >= {9, 8}
    for outcome, twin in zip(outcomes, reference, strict=True):
        exact = inputs.values[outcome.step, sorted(outcome.included)].astype(np.float64)
        assert np.max(np.abs(outcome.total - exact.sum(axis=0))) <= codec.error_bound(
            len(outcome.included))
        # nearest rounding: the ring sum does not depend on masks, so it is bit-identical
        assert (outcome.step, outcome.included) == (twin.step, twin.included)
        assert np.array_equal(outcome.ring_total, twin.ring_total)
    if threat_model == "active":  # the consistency round of step 3 was aborted and rerun
        assert 3 not in {o.step for o in outcomes}


# -- never-both and replays, by a curious server, against restored clients ---------------------


def _uploaded(n: int = 5, threshold: int = 3):
    """A server and restorable clients after step 1's uploads (nobody dropped yet)."""
    inputs = Inputs(n, M, 3, seed=1)
    codec = FixedPointCodec.for_clients(n, clip=1.0, rounding="nearest")
    server = SecAggServer(graph=complete_graph(n), threshold=threshold, codec=codec,
                          vector_length=M)
    clients = {c: Restoring(inputs.provider(c)) for c in range(n)}
    run_setup(server, DirectTransport(clients))
    uploads = {c: MaskedInput.decode(clients[c].handle(r))
               for c, r in server.open_step().items()}
    return server, clients, uploads


def test_a_restored_client_refuses_shares_of_a_peer_whose_pair_seed_it_revealed():
    server, clients, uploads = _uploaded()
    sid, holder, victim, survivors = server.session_id, 0, 2, (1, 2, 3)
    after_upload = clients[holder].state
    tokens = {o: ConsistencyReply.decode(clients[o].handle(
        ConsistencyRequest(sid, 1, frozenset()).encode())).tokens[holder] for o in survivors}
    request = ShareRequest(sid, 1, frozenset({holder, *survivors}),
                           {p: uploads[p].envelopes[holder] for p in survivors}, tokens).encode()
    # the curious server: the victim's pair seed first, then its self-mask share
    reveal = clients[holder].handle(DropRequest(sid, 1, frozenset({victim})).encode())
    assert set(PairwiseReveal.decode(reveal).seeds) == {victim}
    clients[holder].handle(ConsistencyRequest(sid, 1, frozenset({victim})).encode())
    revealed = clients[holder].state
    with pytest.raises(PolicyViolationError, match="already revealed"):
        clients[holder].handle(request)
    # control: the same request to the same client, had it not revealed that pair seed
    clients[holder].state = after_upload
    clients[holder].handle(ConsistencyRequest(sid, 1, frozenset()).encode())
    assert set(ShareReveal.decode(clients[holder].handle(request)).shares) == set(survivors)
    # the defence travels in the state: one that forgot the reveal answers the attack
    saved = SavedClient.decode(revealed, OfferLimits())
    saved.step.pair_revealed.clear()
    clients[holder].state = saved.encode()
    assert victim in ShareReveal.decode(clients[holder].handle(request)).shares


def test_a_restored_client_refuses_replayed_and_finished_steps():
    inputs = Inputs(5, M, 3, seed=1)
    server = SecAggServer(graph=complete_graph(5), threshold=3, vector_length=M,
                          codec=FixedPointCodec.for_clients(5, clip=1.0))
    clients = {c: Restoring(inputs.provider(c)) for c in range(5)}
    transport = DirectTransport(clients)
    run_setup(server, transport)
    run_step(server, transport)
    run_step(server, transport)
    sid, others = server.session_id, frozenset({1, 2, 3, 4})
    for old in (StepRequest(sid, 2, others), StepRequest(sid, 1, others),
                ConsistencyRequest(sid, 2, frozenset()), DropRequest(sid, 1, frozenset({3}))):
        with pytest.raises(ReplayError):
            clients[0].handle(old.encode())
    clients[0].handle(server.open_step()[0])  # control: the next step is taken
    with pytest.raises(ReplayError):
        clients[0].handle(DropRequest(sid, 2, frozenset({3})).encode())


# -- hostile state bytes -------------------------------------------------------------------------

FUZZ_LIMITS = OfferLimits(max_clients=1_000, max_degree=999, max_vector_length=2**16)
CASES = 3_000
PEAK_BYTES = 1 << 20  # what restoring one hostile state may allocate at most


class Recording(Restoring):
    """A restoring client that keeps (state, message) before every message it handles."""

    def __init__(self, *args, **options) -> None:
        super().__init__(*args, **options)
        self.seen: list[tuple[bytes, bytes]] = []

    def handle(self, payload: bytes) -> bytes | None:
        self.seen.append((self.state, payload))
        return super().handle(payload)


def _honest_states() -> list[tuple[bytes, bytes]]:
    """Client 0's state before each message of two steps (a pair-seed round in the first),
    under both threat models, with and without a rounding seed."""
    cases = []
    for threat_model, seed in (("active", None), ("semi-honest", b"r" * 32)):
        inputs = Inputs(6, 8, 3, seed=2)
        server = SecAggServer(graph=complete_graph(6), threshold=3, vector_length=8,
                              codec=FixedPointCodec.for_clients(6, clip=1.0),
                              threat_model=threat_model)
        clients = {c: Recording(inputs.provider(c), threat_model=threat_model,
                                rounding_seed=seed, limits=FUZZ_LIMITS) for c in range(6)}
        transport = DirectTransport(clients, silent={5: (1, Stage.UPLOAD)})
        run_setup(server, transport)
        run_step(server, transport)
        run_step(server, transport)
        cases += [*clients[0].seen, (clients[0].state, server.open_step()[0])]
    return cases


def _mutate(rng: random.Random, data: bytes) -> bytes:
    raw = bytearray(data)
    kind = rng.randrange(7)
    at = rng.randrange(len(raw))
    if kind == 0:
        del raw[at:]  # truncated
    elif kind == 1:
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif kind == 2 and at + 4 <= len(raw):  # a count or length field blown up
        raw[at:at + 4] = struct.pack("<I", rng.choice([2**32 - 1, 2**31, 2**20, 2**16, 999]))
    elif kind == 3:  # another state version, or another protocol version
        raw[rng.choice([4, 6])] = rng.choice([0, 2, 3, 255])
    elif kind == 4:  # oversized
        raw += rng.randbytes(rng.choice([1, 4, 32, 1 << 20]))
    elif kind == 5:  # a segment left out or repeated
        end = rng.randrange(at, len(raw) + 1)
        raw[at:end] = raw[at:end] * rng.choice([0, 2])
    else:
        raw[at] = rng.getrandbits(8)
    return bytes(raw)


def test_hostile_state_bytes_restore_a_client_or_raise_state_error():
    rng = random.Random(20240611)
    cases = _honest_states()
    stages = {SavedClient.decode(s, FUZZ_LIMITS).stage for s, _ in cases}
    assert stages == set(ClientStage)
    ends, reasons = Counter(), Counter()
    peaks = []
    tracemalloc.start()
    try:
        for i in range(CASES):
            state, message = cases[i % len(cases)]
            bad = _mutate(rng, state)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            try:
                client = SecAggClient.from_state(bad, lambda step: np.zeros(8), limits=FUZZ_LIMITS)
            except StateError as error:
                ends["refused"] += 1
                reasons[re.sub(r"\d+", "#", str(error))] += 1
                continue
            finally:
                peaks.append(tracemalloc.get_traced_memory()[1] - base)
            ends["restored"] += 1
            try:  # a restored client answers its next message or refuses it, nothing else
                client.handle(message)
            except ProtocolError:
                ends["restored, message refused"] += 1
    finally:
        tracemalloc.stop()
    assert ends["restored"] > CASES // 10 and ends["refused"] > CASES // 2, ends
    assert ends["restored, message refused"] > 0, ends
    assert len(reasons) >= 8, reasons
    assert max(peaks) < PEAK_BYTES, max(peaks)


def test_every_truncation_and_any_trailing_byte_is_refused():
    for state, _ in _honest_states()[::3]:
        for cut in range(len(state)):
            with pytest.raises(StateError):
                SecAggClient.from_state(state[:cut], lambda step: np.zeros(8), limits=FUZZ_LIMITS)
        with pytest.raises(StateError, match="trailing"):
            SecAggClient.from_state(state + b"\0", lambda step: np.zeros(8), limits=FUZZ_LIMITS)


def test_a_state_of_another_version_or_not_bytes_is_refused_by_name():
    state, _ = _honest_states()[3]
    newer = state[:6] + bytes([STATE_VERSION + 1]) + state[7:]
    with pytest.raises(StateError, match=f"version {STATE_VERSION + 1}"):
        SecAggClient.from_state(newer, lambda step: np.zeros(8))
    for not_bytes in (None, "state", 7):
        with pytest.raises(StateError, match="must be bytes"):
            SecAggClient.from_state(not_bytes, lambda step: np.zeros(8))


def test_a_state_whose_offer_exceeds_the_limits_is_refused_before_anything_is_built():
    state, _ = _honest_states()[4]
    saved = SavedClient.decode(state, FUZZ_LIMITS)
    huge = dataclasses.replace(saved, offer=dataclasses.replace(saved.offer, n_clients=2**32 - 1,
                                                                degree=2**32 - 2))
    tracemalloc.start()
    try:
        with pytest.raises(StateError, match="n_clients"):
            SecAggClient.from_state(huge.encode(), lambda step: np.zeros(8))
        assert tracemalloc.get_traced_memory()[1] < PEAK_BYTES
    finally:
        tracemalloc.stop()
    with pytest.raises(StateError, match="max_clients"):
        SecAggClient.from_state(state, lambda step: np.zeros(8),
                                limits=OfferLimits(max_clients=5))


def test_a_state_that_contradicts_its_stage_is_refused():
    state, _ = _honest_states()[-1]  # shares revealed
    saved = SavedClient.decode(state, FUZZ_LIMITS)
    assert saved.stage is ClientStage.SHARES_REVEALED
    saved.step.shares_revealed = False  # would let a replayed drop request reveal pair seeds
    with pytest.raises(StateError, match="inconsistent client state"):
        SecAggClient.from_state(saved.encode(), lambda step: np.zeros(8))
