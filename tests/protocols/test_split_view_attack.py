"""A test plays the split-view server against real clients: unmasking one input at one step.

At step 1 the server tells victim u that a set D of its holders dropped (u reveals its pair
seeds with D), tells u's other holders that u dropped (they reveal theirs with u), and asks
the holders in D for shares of u's self-mask seed, listing u as a survivor. Colluding holders
hand over everything they know. Without the consistency round this unmasks u with
max(0, 2t - d) colluders (d = u's holders); with it, t - 1 colluders get nothing.

Every party is a real SecAggClient with a real key setup, n = 1000 included (the setup of
1000 clients takes a few seconds here, so nobody is simulated).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from protocols.codec import FixedPointCodec
from protocols.errors import ProtocolError
from protocols.network import InProcessNetwork
from protocols.plan import mask_graph
from protocols.primitives import envelope, shamir
from protocols.secagg import keys
from protocols.secagg.client import SecAggClient
from protocols.secagg.messages import (
    ConsistencyReply,
    ConsistencyRequest,
    DropRequest,
    MaskedInput,
    PairwiseReveal,
    ShareRequest,
    ShareReveal,
)
from protocols.secagg.server import SecAggServer, host_unmask

M = 64


class Loot:
    """What the attacking server ends up holding about the victim's step-1 upload."""

    def __init__(self, upload: MaskedInput) -> None:
        self.upload = upload
        self.pair_seeds: dict[int, bytes] = {}  # holder -> s_uw of step 1
        self.shares: dict[int, bytes] = {}  # share id (holder + 1) -> share of u's self seed
        self.refusals: list[ProtocolError] = []


def _session(n: int, threat_model: str):
    graph, threshold = mask_graph(n, sparse=True)
    codec = FixedPointCodec.for_clients(n, clip=1.0, rounding="stochastic")
    values = np.random.default_rng(n).uniform(-1, 1, (n, M))
    server = SecAggServer(graph=graph, threshold=threshold, codec=codec, vector_length=M,
                          threat_model=threat_model)
    clients = {c: SecAggClient(lambda step, c=c: values[c], threat_model="semi-honest")
               for c in range(n)}
    InProcessNetwork(server, clients).setup()
    return server, clients, values


def _ask(client, message, loot: Loot):
    try:
        return client.handle(message.encode())
    except ProtocolError as error:
        loot.refusals.append(error)
        return None


def split_view_attack(server: SecAggServer, clients, victim: int) -> Loot:
    """Play the attacking server for step 1 with forged, split-view requests."""
    sid, t = server.session_id, server.threshold
    holders = sorted(server.graph.neighbours(victim))
    told_dropped = set(holders[: len(holders) - t])  # D: exactly t holders remain for u
    told_victim_dropped = set(holders) - told_dropped
    # an honest upload by everyone
    uploads = {c: MaskedInput.decode(clients[c].handle(r)) for c, r in server.open_step().items()}
    loot = Loot(uploads[victim])
    # the split view: u hears that D dropped, the rest of its holders hear that u dropped
    reveal = _ask(clients[victim], DropRequest(sid, 1, frozenset(told_dropped)), loot)
    loot.pair_seeds.update(PairwiseReveal.decode(reveal).seeds)
    for w in sorted(told_victim_dropped):
        reveal = _ask(clients[w], DropRequest(sid, 1, frozenset({victim})), loot)
        if reveal is not None:
            loot.pair_seeds[w] = PairwiseReveal.decode(reveal).seeds[victim]
    # the consistency round (active model), each client shown the view it was given
    tokens: dict[tuple[int, int], bytes] = {}
    if server.threat_model == "active":
        for c in sorted(clients):
            view = (told_dropped if c == victim else
                    {victim} if c in told_victim_dropped else set())
            reply = _ask(clients[c], ConsistencyRequest(sid, 1, frozenset(view)), loot)
            if reply is not None:
                msg = ConsistencyReply.decode(reply)
                tokens.update({(c, h): token for h, token in msg.tokens.items()})
    # every holder is asked for u's share with u listed as a survivor; the server forwards
    # u's token for that holder if it has one, else any token u issued (a forgery attempt)
    spare = next((tok for (o, _), tok in tokens.items() if o == victim), None)
    for w in holders:
        peers = server.graph.neighbours(w)
        token_set = {p: tokens[(p, w)] for p in peers if (p, w) in tokens}
        if victim not in token_set and spare is not None:
            token_set[victim] = spare
        request = ShareRequest(sid, 1, frozenset(peers | {w}),
                               {p: uploads[p].envelopes[w] for p in peers}, token_set)
        reply = _ask(clients[w], request, loot)
        if reply is not None and victim in (shares := ShareReveal.decode(reply).shares):
            loot.shares[w + 1] = shares[victim]
    return loot


def with_colluders(server: SecAggServer, clients, victim: int, loot: Loot,
                   colluders: set[int]) -> Loot:
    """The loot once colluding holders hand over their pair seed with u and their share."""
    loot = copy.deepcopy(loot)
    sid = server.session_id
    for w in colluders:
        spy = clients[w]
        loot.pair_seeds[w] = keys.pair_step_seed(spy._pair_keys[victim], session_id=sid, step=1)
        loot.shares[w + 1] = envelope.open_envelope(
            spy._open_keys[victim], loot.upload.envelopes[w], nonce=keys.envelope_nonce(1),
            associated_data=keys.envelope_aad(session_id=sid, step=1, sender=victim,
                                              receiver=w))
    return loot


def best_unmasking(server: SecAggServer, victim: int, loot: Loot) -> np.ndarray:
    """The server's unmask math applied to the victim alone, with every mask it can rebuild."""
    signed = [(seed, -keys.pair_sign(victim, w)) for w, seed in sorted(loot.pair_seeds.items())]
    if len(loot.shares) >= server.threshold:
        signed.append((shamir.combine(loot.shares, threshold=server.threshold), -1))
    ring = host_unmask([loot.upload.vector], signed, server.codec)
    return server.codec.decode_sum(ring, n_summed=1)


def _colluders(server, victim: int, count: int) -> set[int]:
    """The most useful colluders: holders that heard u dropped (they hold s_uw and a share)."""
    holders = sorted(server.graph.neighbours(victim))
    keep = holders[len(holders) - server.threshold:] + holders[: len(holders) - server.threshold]
    return set(keep[:count])


CASES = [pytest.param(10, (9, 5), id="n10-complete"),
         pytest.param(100, (18, 6), id="n100-secagg+"),
         pytest.param(1000, (38, 19), id="n1000-secagg+")]


@pytest.mark.parametrize(("n", "degree_threshold"), CASES)
def test_the_split_view_unmasks_a_semi_honest_session_with_2t_minus_d_colluders(
        n, degree_threshold):
    """Control: the same attack code recovers the input when the round is off."""
    server, clients, values = _session(n, "semi-honest")
    assert (server.graph.degree, server.threshold) == degree_threshold
    d, t = degree_threshold
    victim = 7
    loot = split_view_attack(server, clients, victim)
    # each holder in D passed its own never-both check and gave u's share
    assert len(loot.shares) == d - t and len(loot.refusals) == t
    loot = with_colluders(server, clients, victim, loot,
                          _colluders(server, victim, max(0, 2 * t - d)))
    assert len(loot.pair_seeds) == d and len(loot.shares) >= t
    quantum = 2.0 ** -server.codec.scale_bits
    assert np.abs(best_unmasking(server, victim, loot) - values[victim]).max() <= quantum


@pytest.mark.parametrize(("n", "degree_threshold"), CASES)
def test_the_split_view_learns_nothing_under_the_active_model(n, degree_threshold):
    server, clients, values = _session(n, "active")
    d, t = degree_threshold
    victim = 7
    honest_loot = split_view_attack(server, clients, victim)
    # the holders told that u dropped refused u's share (never both); those in D withheld it
    # (u issued them no token), so only colluders' shares are left
    assert len(honest_loot.refusals) == t and not honest_loot.shares
    for count in (0, t - 1):
        loot = with_colluders(server, clients, victim, honest_loot,
                              _colluders(server, victim, count))
        assert len(loot.shares) == count < t
        error = np.abs(best_unmasking(server, victim, loot) - values[victim])
        # the self mask is still on: a uniform ring element, decoded far from the input
        assert error.max() > 0.5 and np.median(error) > 0.1
