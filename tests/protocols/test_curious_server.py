"""A test plays the curious server: every request that could expose an input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.errors import PolicyViolationError, ReplayError, StageError, TooFewSurvivorsError
from protocols.primitives import prg, shamir
from protocols.secagg import keys
from protocols.secagg.messages import (
    DropRequest,
    MaskedInput,
    PairwiseReveal,
    ShareRequest,
    ShareReveal,
    StepRequest,
)
from protocols.session import Dropout, FaultPlan, Stage

from .conftest import confirm, make_session


def _upload_all(server, clients):
    """Open a step and collect every client's masked input by hand."""
    requests = server.open_step()
    return {c: MaskedInput.decode(clients[c].handle(r)) for c, r in requests.items()}


def _share_request(server, inputs, holder, survivors, step, tokens=None):
    envelopes = {p: inputs[p].envelopes[holder] for p in survivors if p != holder}
    chosen = {p: t for (p, h), t in (tokens or {}).items() if h == holder and p in survivors}
    return ShareRequest(server.session_id, step, frozenset(survivors), envelopes,
                        chosen).encode()


def test_pair_seeds_then_shares_of_the_same_client_is_refused(session5):
    server, clients, *_ = session5
    inputs = _upload_all(server, clients)
    reveal = clients[0].handle(DropRequest(server.session_id, 1, frozenset({2})).encode())
    assert set(PairwiseReveal.decode(reveal).seeds) == {2}
    with pytest.raises(PolicyViolationError, match="already revealed"):
        clients[0].handle(_share_request(server, inputs, 0, {0, 1, 2, 3}, 1))


def test_shares_then_pair_seeds_of_the_same_client_is_refused(session5):
    server, clients, *_ = session5
    inputs = _upload_all(server, clients)
    tokens = confirm(server.session_id, clients, 1, range(5))
    clients[1].handle(_share_request(server, inputs, 1, {0, 1, 2, 3, 4}, 1, tokens))
    with pytest.raises(PolicyViolationError, match="self-mask shares were revealed"):
        clients[1].handle(DropRequest(server.session_id, 1, frozenset({2})).encode())


def test_inconsistent_survivor_sets_are_refused(session5):
    server, clients, *_ = session5
    inputs = _upload_all(server, clients)
    sid = server.session_id
    clients[0].handle(DropRequest(sid, 1, frozenset({4})).encode())
    with pytest.raises(PolicyViolationError, match="only grow"):
        clients[0].handle(DropRequest(sid, 1, frozenset({3})).encode())
    with pytest.raises(PolicyViolationError, match="own dropout"):
        clients[1].handle(DropRequest(sid, 1, frozenset({1})).encode())
    with pytest.raises(PolicyViolationError, match="not active"):
        clients[1].handle(DropRequest(sid, 1, frozenset({7})).encode())
    with pytest.raises(TooFewSurvivorsError):
        clients[2].handle(DropRequest(sid, 1, frozenset({0, 1})).encode())
    with pytest.raises(PolicyViolationError, match="lists as dropped"):
        clients[2].handle(_share_request(server, inputs, 2, {0, 1, 3}, 1))
    with pytest.raises(TooFewSurvivorsError):
        clients[2].handle(_share_request(server, inputs, 2, {1, 2}, 1))


def test_dropped_client_cannot_be_brought_back(session5):
    server, clients, network, *_ = session5
    network.add_dropouts([Dropout(4, 1, Stage.UPLOAD)])
    assert network.step().dropped == {4}
    with pytest.raises(PolicyViolationError, match="may only shrink"):
        clients[0].handle(StepRequest(server.session_id, 2, frozenset({1, 2, 3, 4})).encode())


def test_replayed_and_skipped_steps_are_refused(session5):
    server, clients, network, *_ = session5
    network.step()
    old = StepRequest(server.session_id, 1, frozenset({1, 2, 3, 4})).encode()
    with pytest.raises(ReplayError):
        clients[0].handle(old)
    with pytest.raises(StageError, match="skips ahead"):
        clients[0].handle(StepRequest(server.session_id, 5, frozenset({1, 2, 3, 4})).encode())
    inputs = _upload_all(server, clients)
    tokens = confirm(server.session_id, clients, 2, range(5))
    request = _share_request(server, inputs, 0, {0, 1, 2, 3, 4}, 2, tokens)
    clients[0].handle(request)
    with pytest.raises(ReplayError):
        clients[0].handle(request)
    with pytest.raises(ReplayError):
        clients[0].handle(DropRequest(server.session_id, 1, frozenset({3})).encode())


class ServerView:
    """Everything the server received, decoded: what a curious server has to work with."""

    def __init__(self, server, network) -> None:
        self.replies: list[bytes] = []
        self.network = network
        receive = server.receive

        def recording(replies):
            self.replies.extend(replies.values())
            return receive(replies)

        server.receive = recording

    def masked_inputs(self, client: int) -> dict[int, MaskedInput]:
        found = [MaskedInput.decode(d) for d in self.replies if d[5] == MaskedInput.TYPE]
        found += [MaskedInput.decode(d) for _, _, d in self.network.late_arrivals]
        return {m.step: m for m in found if m.client_id == client}

    def pair_seeds(self) -> dict[tuple[int, int, int], bytes]:
        """(step, revealer, peer) -> every per-step pair seed any client revealed."""
        reveals = [PairwiseReveal.decode(d) for d in self.replies if d[5] == PairwiseReveal.TYPE]
        return {(r.step, r.client_id, peer): seed
                for r in reveals for peer, seed in r.seeds.items()}

    def self_seeds(self, server) -> dict[tuple[int, int], bytes]:
        """(step, owner) -> self-mask seed, rebuilt from every share the server collected."""
        shares: dict[tuple[int, int], dict[int, bytes]] = {}
        for data in self.replies:
            if data[5] == ShareReveal.TYPE:
                reveal = ShareReveal.decode(data)
                for owner, share in reveal.shares.items():
                    shares.setdefault((reveal.step, owner), {})[reveal.client_id + 1] = share
        return {key: shamir.combine(found, threshold=server.threshold)
                for key, found in shares.items() if len(found) >= server.threshold}


def _best_unmasking(masked: MaskedInput, client: int, view: ServerView, server,
                    extra_pair_seeds: dict | None = None) -> np.ndarray:
    """Strip every mask the server can compute for this client and step."""
    residual = masked.vector.copy()
    self_seed = view.self_seeds(server).get((masked.step, client))
    if self_seed is not None:
        residual -= prg.uniform_ring(self_seed, residual.size, ring_bits=32)
    known = {**view.pair_seeds(), **(extra_pair_seeds or {})}
    for (step, revealer, peer), seed in known.items():
        if step == masked.step and peer == client:
            mask = prg.uniform_ring(seed, residual.size, ring_bits=32)
            if keys.pair_sign(client, revealer) > 0:
                residual -= mask
            else:
                residual += mask
    return residual


def _looks_masked(residual: np.ndarray, truth: np.ndarray) -> bool:
    """Uncorrelated with the true encoding and far from it: nothing was unmasked."""
    r = np.corrcoef(residual.view(np.int32).astype(float), truth.view(np.int32).astype(float))[0, 1]
    return abs(r) < 4.5 / np.sqrt(residual.size) and not np.array_equal(residual, truth)


def test_late_arrival_cannot_be_unmasked_at_that_step_or_any_other():
    n, late = 5, 3
    server, clients, network, inputs, codec = make_session(
        n, 4096, threshold=2, steps=3, faults=FaultPlan(late={(1, late)}))
    view = ServerView(server, network)
    network.setup()
    outcomes = [network.step() for _ in range(3)]
    assert late in outcomes[0].dropped and late not in outcomes[1].included
    masked = view.masked_inputs(late)[1]  # it did arrive, after the deadline
    assert any(step == 1 and peer == late for step, _, peer in view.pair_seeds())
    assert (1, late) not in view.self_seeds(server)  # ... so its self mask never was
    # The curious server now forwards the late envelopes and asks for the self-mask shares.
    for holder in (0, 1, 2, 4):
        request = ShareRequest(server.session_id, 1, frozenset({holder, late}),
                               {late: masked.envelopes[holder]}).encode()
        with pytest.raises((PolicyViolationError, ReplayError, TooFewSurvivorsError)):
            clients[holder].handle(request)
    truth = codec.encode(inputs.values[1, late])
    assert _looks_masked(_best_unmasking(masked, late, view, server), truth)


def test_dropout_at_a_later_step_does_not_expose_earlier_steps():
    """design.md's trap: a client survives step 1 (self mask revealed), then drops at step 2."""
    n, victim = 5, 2
    server, clients, network, inputs, codec = make_session(n, 4096, threshold=2, steps=2)
    view = ServerView(server, network)
    network.setup()
    assert victim in network.step().included
    network.add_dropouts([Dropout(victim, 2, Stage.PAIRWISE)])
    network.add_dropouts([Dropout(0, 2, Stage.UPLOAD)])  # forces a pair-seed round at step 2
    second = network.step()
    assert victim in second.dropped
    assert (1, victim) in view.self_seeds(server)  # step 1's self mask is known to the server
    for step, masked in view.masked_inputs(victim).items():
        truth = codec.encode(inputs.values[step, victim])
        assert _looks_masked(_best_unmasking(masked, victim, view, server), truth)


def test_the_attack_recovers_the_input_once_every_mask_is_known():
    """Control: the same unmasking does recover an input when all its masks are known,
    so the two tests above would catch a protocol that revealed too much."""
    server, clients, network, inputs, codec = make_session(3, 4096, threshold=1, steps=1)
    view = ServerView(server, network)
    network.setup()
    network.step()
    masked = view.masked_inputs(0)[1]
    truth = codec.encode(inputs.values[1, 0])
    assert (1, 0) in view.self_seeds(server)  # a survivor's self mask is always reconstructed
    assert _looks_masked(_best_unmasking(masked, 0, view, server), truth)
    leaked = {  # what the server would have if the pair seeds of client 0 leaked as well
        (1, peer, 0): keys.pair_step_seed(clients[0]._pair_keys[peer],
                                          session_id=server.session_id, step=1)
        for peer in (1, 2)
    }
    recovered = _best_unmasking(masked, 0, view, server, extra_pair_seeds=leaked)
    np.testing.assert_array_equal(recovered, truth)
