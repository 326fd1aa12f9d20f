"""The transport-agnostic drivers: who answers is up to the transport, the sum covers exactly
the survivors, and everyone who sent nothing usable is reported with the stage it missed."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.codec import FixedPointCodec
from protocols.errors import ConsistencyAbortError, ProtocolError, StageError, TooFewSurvivorsError
from protocols.graph import complete_graph
from protocols.network import InProcessNetwork
from protocols.secagg.client import SecAggClient
from protocols.secagg.messages import (
    ConsistencyRequest,
    DropRequest,
    MaskedInput,
    Roster,
    SessionOffer,
    ShareRequest,
    StepRequest,
)
from protocols.secagg.server import SecAggServer
from protocols.session import Dropout, FaultPlan, Stage, StepOutcome
from protocols.transport import run_setup, run_step, stage_of_request

from .conftest import Inputs
from .transports import DirectTransport

N, M, T = 6, 16, 3
VICTIM, ABSENT = 2, 5  # ABSENT never uploads at step 1, so a pair-seed round always runs


def _parties(threat_model: str = "active", n: int = N):
    codec = FixedPointCodec.for_clients(n, clip=1.0, rounding="nearest")
    inputs = Inputs(n, M, steps=3, seed=7)
    server = SecAggServer(graph=complete_graph(n), threshold=T, codec=codec, vector_length=M,
                          threat_model=threat_model)
    clients = {c: SecAggClient(inputs.provider(c), threat_model=threat_model) for c in range(n)}
    return server, clients, inputs, codec


def _run_step(server, transport, missed):
    """One step; a step aborted in the consistency round is abandoned and run again."""
    try:
        return run_step(server, transport, missed=missed)[0]
    except ConsistencyAbortError:
        server.abandon_step()
        return run_step(server, transport, missed=missed)[0]


def _check_sum(outcome: StepOutcome, inputs: Inputs, codec: FixedPointCodec) -> None:
    exact = inputs.values[outcome.step, sorted(outcome.included)].astype(np.float64).sum(axis=0)
    assert np.max(np.abs(outcome.total - exact)) <= codec.error_bound(len(outcome.included))


def _expected_in_sum(stage: Stage, threat_model: str) -> set[int]:
    everyone = set(range(N)) - {ABSENT}
    if stage is Stage.SHARES or (stage is Stage.CONSISTENCY and threat_model == "semi-honest"):
        return everyone  # its upload is in; its self mask comes from the others' shares
    return everyone - {VICTIM}


@pytest.mark.parametrize("threat_model", ["active", "semi-honest"])
@pytest.mark.parametrize("stage", list(Stage))
def test_a_missing_reply_at_any_stage_is_a_dropout_of_that_stage(stage, threat_model):
    server, clients, inputs, codec = _parties(threat_model)
    step = 0 if stage in (Stage.ADVERTISE, Stage.ROSTER) else 1
    transport = DirectTransport(clients, silent={VICTIM: (step, stage), ABSENT: (1, Stage.UPLOAD)})
    missed = []
    assert run_setup(server, transport, missed=missed) == missed
    assert (VICTIM in server.active) == (stage is not Stage.ADVERTISE)
    outcome = _run_step(server, transport, missed)
    assert outcome.included == _expected_in_sum(stage, threat_model)
    _check_sum(outcome, inputs, codec)
    seen = {(m.step, m.stage, m.client) for m in missed}
    assert (1, Stage.UPLOAD, ABSENT) in seen
    asked = threat_model == "active" or stage is not Stage.CONSISTENCY
    assert ((step, stage, VICTIM) in seen) == asked
    if stage is Stage.ROSTER:  # it never got its keys: the transport found it silent at step 1
        assert (1, Stage.UPLOAD, VICTIM) in seen


def test_without_faults_nobody_is_missed_and_rosters_need_no_reply():
    server, clients, inputs, codec = _parties()
    transport = DirectTransport(clients)
    assert run_setup(server, transport) == []
    outcome, missed = run_step(server, transport)
    assert missed == [] and outcome.included == set(range(N))
    _check_sum(outcome, inputs, codec)
    assert transport.stages == [(0, Stage.ADVERTISE), (0, Stage.ROSTER), (1, Stage.UPLOAD),
                                (1, Stage.CONSISTENCY), (1, Stage.SHARES)]


@pytest.mark.parametrize("stage", [Stage.ADVERTISE, Stage.UPLOAD, Stage.PAIRWISE])
def test_an_undecodable_reply_is_rejected_and_its_sender_dropped(stage):
    server, clients, inputs, codec = _parties()
    step = 0 if stage is Stage.ADVERTISE else 1
    garbage = MaskedInput(b"x" * 16, VICTIM, step, np.zeros(1, np.uint32), {}).encode()[:-3]
    transport = DirectTransport(clients, silent={ABSENT: (1, Stage.UPLOAD)},
                                replace={(step, stage, VICTIM): garbage})
    missed = run_setup(server, transport)
    outcome, step_missed = run_step(server, transport)
    missed += step_missed
    assert outcome.included == set(range(N)) - {ABSENT, VICTIM}
    _check_sum(outcome, inputs, codec)
    rejected = [m for m in missed if m.client == VICTIM]
    assert [(m.step, m.stage) for m in rejected] == [(step, stage)]
    assert rejected[0].reason.startswith("rejected by the server: ")
    assert [c for _, c, _ in server.rejections] == [VICTIM]


def test_an_empty_reply_where_one_is_due_counts_as_missed():
    server, clients, inputs, codec = _parties()
    transport = DirectTransport(clients, replace={(1, Stage.UPLOAD, VICTIM): b""})
    run_setup(server, transport)
    outcome, missed = run_step(server, transport)
    assert outcome.included == set(range(N)) - {VICTIM}
    _check_sum(outcome, inputs, codec)
    assert [(m.step, m.stage, m.client) for m in missed] == [(1, Stage.UPLOAD, VICTIM)]
    assert "empty reply" in missed[0].reason
    assert server.rejections == []  # the server never saw an empty reply


def test_too_many_missing_replies_raise_and_what_was_missed_is_kept():
    server, clients, *_ = _parties()
    silent = {c: (1, Stage.UPLOAD) for c in (1, 3, 4, 5)}  # 2 uploads left, t = 3
    transport = DirectTransport(clients, silent=silent)
    run_setup(server, transport)
    missed = []
    with pytest.raises(TooFewSurvivorsError):
        run_step(server, transport, missed=missed)
    assert {(m.stage, m.client) for m in missed} == {(Stage.UPLOAD, c) for c in silent}


def test_too_many_missing_key_advertisements_raise():
    server, clients, *_ = _parties()
    transport = DirectTransport(clients, silent={c: (0, Stage.ADVERTISE) for c in (0, 1, 2, 3)})
    with pytest.raises(TooFewSurvivorsError):
        run_setup(server, transport)


def test_every_server_request_has_its_stage_and_anything_else_is_refused():
    sid, ids = b"s" * 16, frozenset({1, 2})
    requests = [
        (SessionOffer(sid, 0, 3, 2, 1, bytes(32), 32, 16, 1.0, 4), Stage.ADVERTISE),
        (Roster(sid, 0, {}), Stage.ROSTER), (StepRequest(sid, 1, ids), Stage.UPLOAD),
        (DropRequest(sid, 1, ids), Stage.PAIRWISE),
        (ConsistencyRequest(sid, 1, ids), Stage.CONSISTENCY),
        (ShareRequest(sid, 1, ids, {}), Stage.SHARES),
    ]
    assert [stage_of_request(m.encode()) for m, _ in requests] == [s for _, s in requests]
    assert {s for _, s in requests} == set(Stage)
    reply = MaskedInput(sid, 0, 1, np.zeros(2, np.uint32), {}).encode()
    for bad in (reply, b"", b"CDSA", b"nonsense bytes", reply[:4] + b"\x01\x42"):
        with pytest.raises(ProtocolError):
            stage_of_request(bad)


def test_a_batch_mixing_stages_is_refused_before_anything_is_sent():
    class Refusing:
        def exchange(self, requests, *, step, stage):
            raise AssertionError("nothing may be sent")

    server, *_ = _parties()
    mixed = {0: StepRequest(server.session_id, 1, frozenset({1})).encode(),
             1: DropRequest(server.session_id, 1, frozenset({0})).encode()}
    server.open_step = lambda: mixed
    with pytest.raises(StageError, match="one stage"):
        run_step(server, Refusing())


def test_the_in_process_network_reports_who_missed_what_and_why():
    faults = FaultPlan(dropouts=[Dropout(5, 0, Stage.ADVERTISE), Dropout(4, 1, Stage.SHARES)],
                       late={(1, 3)}, tamper={(1, 1, Stage.UPLOAD)})
    server, clients, inputs, codec = _parties(n=8)
    network = InProcessNetwork(server, clients, faults=faults)
    network.setup()
    outcome = network.step()
    assert outcome.included == {0, 2, 4, 6, 7}
    _check_sum(outcome, inputs, codec)
    found = {(m.step, m.stage, m.client): m.reason for m in network.missed}
    assert set(found) == {(0, Stage.ADVERTISE, 5), (1, Stage.UPLOAD, 3), (1, Stage.UPLOAD, 1),
                          (1, Stage.SHARES, 4)}
    assert "late" in found[(1, Stage.UPLOAD, 3)]
    assert "authentication" in found[(1, Stage.UPLOAD, 1)]
