"""The consistency round: frozen dropped sets, tokens a holder checks, and the retried step."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.api import SecAggSession, secure_sum
from protocols.dp.mechanisms import DPSpec
from protocols.errors import (
    ConsistencyAbortError,
    IntegrityError,
    ParameterError,
    PolicyViolationError,
    ReplayError,
)
from protocols.registry import open_session
from protocols.secagg import keys
from protocols.secagg.client import SecAggClient
from protocols.secagg.messages import (
    ConsistencyReply,
    ConsistencyRequest,
    DropRequest,
    MaskedInput,
    SessionOffer,
    ShareRequest,
    ShareReveal,
)
from protocols.session import Dropout, FaultPlan, Stage
from protocols.wire import message_type

from .conftest import confirm, make_session


def _uploads(server, clients):
    return {c: MaskedInput.decode(clients[c].handle(r)) for c, r in server.open_step().items()}


def _share_request(sid, uploads, holder, survivors, tokens):
    envelopes = {p: uploads[p].envelopes[holder] for p in survivors if p != holder}
    return ShareRequest(sid, 1, frozenset(survivors), envelopes, tokens).encode()


def test_an_active_client_refuses_a_semi_honest_offer_and_a_semi_honest_one_takes_both():
    offer = SessionOffer(bytes(16), 0, 4, 3, 2, bytes(32), 32, 20, 1.0, 8, "nearest",
                         "aes-256-ctr", "semi-honest")
    with pytest.raises(PolicyViolationError, match="requires 'active'"):
        SecAggClient(lambda step: np.zeros(8)).handle(offer.encode())
    SecAggClient(lambda step: np.zeros(8), threat_model="semi-honest").handle(offer.encode())
    with pytest.raises(ParameterError, match="threat_model"):
        SecAggClient(lambda step: np.zeros(8), threat_model="malicious")


def test_the_consistency_request_must_name_the_dropped_set_already_answered(session5):
    server, clients, *_ = session5
    sid = server.session_id
    _uploads(server, clients)
    clients[0].handle(DropRequest(sid, 1, frozenset({4})).encode())
    with pytest.raises(PolicyViolationError, match="answered for"):
        clients[0].handle(ConsistencyRequest(sid, 1, frozenset()).encode())
    reply = ConsistencyReply.decode(
        clients[0].handle(ConsistencyRequest(sid, 1, frozenset({4})).encode()))
    assert set(reply.tokens) == {1, 2, 3}  # never for 4, whose pair seed is out
    with pytest.raises(ReplayError):
        clients[0].handle(ConsistencyRequest(sid, 1, frozenset({4})).encode())
    # frozen: no neighbour may be added to the dropped set of this step any more
    with pytest.raises(PolicyViolationError, match="frozen"):
        clients[0].handle(DropRequest(sid, 1, frozenset({3, 4})).encode())


def test_no_share_without_the_holders_own_consistency_round(session5):
    server, clients, *_ = session5
    uploads = _uploads(server, clients)
    tokens = confirm(server.session_id, clients, 1, [1, 2, 3, 4])
    chosen = {p: tokens[(p, 0)] for p in (1, 2, 3, 4)}
    with pytest.raises(PolicyViolationError, match="before this client's consistency round"):
        clients[0].handle(_share_request(server.session_id, uploads, 0, range(5), chosen))


@pytest.mark.parametrize("forgery", ["missing", "random", "reflected", "other-holder"])
def test_a_share_without_its_owners_valid_token_is_withheld(session5, forgery):
    server, clients, *_ = session5
    sid = server.session_id
    uploads = _uploads(server, clients)
    tokens = confirm(sid, clients, 1, range(5))
    chosen = {p: tokens[(p, 0)] for p in (1, 2, 3, 4)}
    forged = {
        "missing": None,
        "random": bytes(range(32)),
        "reflected": tokens[(0, 2)],  # the holder's own token for 2, sent back as 2's
        "other-holder": tokens[(2, 1)],  # 2's token, but for holder 1
    }[forgery]
    if forged is None:
        del chosen[2]
    else:
        chosen[2] = forged
    reveal = ShareReveal.decode(clients[0].handle(_share_request(sid, uploads, 0, range(5),
                                                                 chosen)))
    assert set(reveal.shares) == {1, 3, 4}


def test_too_many_missing_tokens_make_the_holder_refuse(session5):
    server, clients, *_ = session5
    sid = server.session_id
    uploads = _uploads(server, clients)
    tokens = confirm(sid, clients, 1, range(5))
    chosen = {p: tokens[(p, 0)] for p in (1, 2)}  # 2 shares left, threshold 3
    with pytest.raises(IntegrityError, match="fewer than the threshold"):
        clients[0].handle(_share_request(sid, uploads, 0, range(5), chosen))
    assert not clients[0]._step.shares_revealed


def test_tokens_are_domain_separated_by_pair_order_step_and_session():
    key = bytes(32)
    base = dict(session_id=b"s" * 16, step=3, owner=1, holder=2)
    token = keys.consistency_token(key, **base)
    variants = [dict(base, owner=2, holder=1), dict(base, step=4),
                dict(base, session_id=b"t" * 16)]
    assert all(keys.consistency_token(key, **v) != token for v in variants)
    with pytest.raises(IntegrityError):
        keys.check_consistency_token(key, token, **variants[0])
    keys.check_consistency_token(key, token, **base)


def _message_types(network):
    seen = []
    exchange = network.exchange

    def recording(requests, **where):
        seen.extend(message_type(r) for r in requests.values())
        return exchange(requests, **where)

    network.exchange = recording
    return seen


@pytest.mark.parametrize("threat_model", ["active", "semi-honest"])
def test_the_round_runs_only_under_the_active_model(threat_model):
    server, clients, network, inputs, codec = make_session(5, 16, threshold=3,
                                                           threat_model=threat_model)
    network.setup()
    seen = _message_types(network)
    outcome = network.step()
    assert outcome.included == frozenset(range(5))
    assert (ConsistencyRequest.TYPE in seen) == (threat_model == "active")


def test_a_client_silent_in_the_consistency_round_aborts_the_step():
    faults = FaultPlan(dropouts=[Dropout(3, 1, Stage.CONSISTENCY)])
    server, clients, network, *_ = make_session(5, 16, threshold=3, faults=faults)
    network.setup()
    with pytest.raises(ConsistencyAbortError) as caught:
        network.step()
    assert caught.value.silent == {3} and caught.value.step == 1


def test_the_session_retries_the_step_without_the_silent_client():
    n, m = 6, 32
    rng = np.random.default_rng(2)
    x = {c: rng.uniform(-1, 1, m) for c in range(n)}
    plain = SecAggSession(n, m, clip=1.0, protocol="secagg")
    once = plain.step(x, drop_after_upload=[5])
    faults = FaultPlan(dropouts=[Dropout(2, 1, Stage.CONSISTENCY)])
    session = SecAggSession(n, m, clip=1.0, protocol="secagg", faults=faults)
    outcome = session.step(x, drop_after_upload=[5])
    assert outcome.step == 2 and session.server.last_step == 2
    assert outcome.included == frozenset(range(n)) - {2}  # 5 uploaded before falling silent
    assert outcome.dropped == {2}
    exact = sum(x[c] for c in outcome.included)
    assert np.abs(outcome.total - exact).max() <= session.error_bound(n - 1)
    # both tries are in the traffic: every survivor uploaded its vector a second time
    assert once.included == frozenset(range(n))
    extra = session.traffic.bytes_up - plain.traffic.bytes_up
    assert (extra[[0, 1, 3, 4]] > 4 * m).all()
    nxt = session.step({c: x[c] for c in session.active})
    assert nxt.step == 3 and nxt.included == frozenset(range(n)) - {2, 5}


def test_secure_sum_hides_the_retry():
    x = np.random.default_rng(4).uniform(-1, 1, (5, 20))
    result = secure_sum(x, protocol="secagg", clip=1.0,
                        dropouts=[Dropout(1, 1, Stage.CONSISTENCY)])
    assert result.included == (0, 2, 3, 4) and result.dropped == (1,)
    assert np.abs(result.total - x[[0, 2, 3, 4]].sum(0)).max() <= result.error_bound
    honest = secure_sum(x, protocol="secagg", clip=1.0, threat_model="semi-honest",
                        dropouts=[Dropout(1, 1, Stage.CONSISTENCY)])
    assert honest.included == (0, 1, 2, 3, 4)  # no round to be silent in


@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
def test_the_registry_opens_pairwise_mask_sessions_under_the_threat_model(protocol):
    dp = DPSpec(mode="central", noise_multiplier=1e-9, l2_clip=100.0)
    for model in ("active", "semi-honest"):
        for session in (open_session(protocol, 4, 8, clip=1.0, threat_model=model),
                        open_session(protocol, 4, 8, clip=1.0, dp=dp, threat_model=model).inner):
            assert session.server.threat_model == model
            assert {c._threat_model for c in session.network.clients.values()} == {model}
    with pytest.raises(ParameterError, match="threat_model"):
        open_session(protocol, 4, 8, clip=1.0, threat_model="malicious")


def test_secure_sum_runs_the_round_only_under_active_and_other_aggregators_ignore_it():
    x = np.random.default_rng(0).uniform(-1, 1, (5, 16))
    up = {model: secure_sum(x, protocol="secagg", threat_model=model).bytes_up.sum()
          for model in ("semi-honest", "active")}
    assert up["active"] > up["semi-honest"]  # the consistency replies
    plain = secure_sum(x, protocol="plain", threat_model="semi-honest")
    np.testing.assert_allclose(plain.total, x.sum(0), atol=1e-6)  # the plain sum is float32
    with pytest.raises(ParameterError, match="threat_model"):
        secure_sum(x, protocol="plain", threat_model="malicious")
