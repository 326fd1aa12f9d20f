"""One malicious client gets itself excluded: never the step or the session for everyone."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.codec import FixedPointCodec
from protocols.errors import (
    IntegrityError,
    MalformedMessageError,
    ParameterError,
    PolicyViolationError,
    ReplayError,
    TooFewSurvivorsError,
)
from protocols.graph import complete_graph
from protocols.network import InProcessNetwork
from protocols.primitives import envelope, kdf, shamir
from protocols.secagg import keys
from protocols.secagg.client import SecAggClient
from protocols.secagg.messages import (
    DropRequest,
    KeyAdvertisement,
    MaskedInput,
    PairwiseReveal,
    Roster,
    ShareRequest,
    ShareReveal,
)
from protocols.secagg.server import SecAggServer
from protocols.wire import MAX_VECTOR

from .conftest import Inputs, confirm, make_session

P25519 = 2**255 - 19
# u-coordinates of the points of order 1, 2, 4 and 8 on Curve25519 and its twist
LOW_ORDER_U = [
    0, 1, P25519 - 1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
]
NON_CANONICAL_U = [P25519, P25519 + 1, 2**255 - 1, 2**256 - 1]  # also low order: 0, 1, 18, 18
SEALED = shamir.FIELD_256.element_bytes + envelope.TAG_BYTES
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Tamper = Callable[[SecAggClient, object], object]


class Tampering(SecAggClient):
    """A client whose replies of one message type pass through `tamper` before they leave."""

    def __init__(self, provider, message: type, tamper: Tamper) -> None:
        super().__init__(provider)
        self._message, self._tamper = message, tamper

    def handle(self, data: bytes) -> bytes | None:
        reply = super().handle(data)
        if reply is not None and reply[5] == self._message.TYPE:
            return self._tamper(self, self._message.decode(reply)).encode()
        return reply


def session_with(evil: int, message: type, tamper: Tamper, *, n: int = 6, threshold: int = 3,
                 m: int = 8, seed: int = 0):
    """A server and n clients on the complete graph; client `evil` tampers with one reply."""
    codec = FixedPointCodec.for_clients(n, clip=1.0, rounding="nearest")
    inputs = Inputs(n, m, 2, seed=seed)
    server = SecAggServer(graph=complete_graph(n), threshold=threshold, codec=codec,
                          vector_length=m)
    clients = {c: Tampering(inputs.provider(c), message, tamper) if c == evil
               else SecAggClient(inputs.provider(c)) for c in range(n)}
    return server, InProcessNetwork(server, clients), inputs, codec


def assert_exact_sum(outcome, inputs, codec) -> None:
    expected = np.zeros(outcome.ring_total.size, dtype=codec.dtype)
    for c in sorted(outcome.included):
        expected = codec.add(expected, codec.encode(inputs.values[outcome.step, c]))
    np.testing.assert_array_equal(outcome.ring_total, expected)


def rejected(server) -> list[tuple[int, int, type]]:
    return [(step, cid, type(error)) for step, cid, error in server.rejections]


def key_bytes(u: int) -> bytes:
    return u.to_bytes(32, "little")


def with_ignored_bit(public_key: bytes) -> bytes:
    """The same X25519 point: RFC 7748 ignores bit 255 of a u-coordinate."""
    return public_key[:31] + bytes([public_key[31] | 0x80])


# -- (a) low-order and non-canonical public keys ---------------------------------------------------

@pytest.mark.parametrize("u", LOW_ORDER_U + NON_CANONICAL_U)
def test_check_public_key_refuses_low_order_and_non_canonical_points(u):
    with pytest.raises(IntegrityError):
        keys.check_public_key(key_bytes(u))


def test_the_low_order_list_is_what_x25519_itself_refuses():
    # known answers: cryptography's exchange with each listed point gives the all-zero secret
    assert frozenset(LOW_ORDER_U) == keys.LOW_ORDER_U
    for u in LOW_ORDER_U:
        with pytest.raises(IntegrityError, match="all-zero"):
            kdf.agree(X25519PrivateKey.generate(), key_bytes(u))


@SLOW
@given(st.integers(0, P25519 - 1))
def test_a_canonical_key_passes_exactly_when_x25519_accepts_it(u):
    try:
        kdf.agree(X25519PrivateKey.generate(), key_bytes(u))
        refused = False
    except IntegrityError:
        refused = True
    if refused:
        with pytest.raises(IntegrityError, match="low order"):
            keys.check_public_key(key_bytes(u))
    else:
        keys.check_public_key(key_bytes(u))


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33), "x" * 32])
def test_check_public_key_refuses_a_wrong_size(bad):
    with pytest.raises(MalformedMessageError, match="32 raw bytes"):
        keys.check_public_key(bad)


def test_check_public_key_accepts_fresh_keys():
    for _ in range(20):
        keys.check_public_key(kdf.generate_keypair()[1])


@pytest.mark.parametrize("u", [*LOW_ORDER_U, P25519])
@pytest.mark.parametrize("evil", [0, 5])
def test_a_low_order_key_excludes_only_its_sender(u, evil):
    def advertise(client, msg):
        return KeyAdvertisement(msg.session_id, msg.client_id, key_bytes(u))

    server, network, inputs, codec = session_with(evil, KeyAdvertisement, advertise)
    network.setup()
    assert network.refusals == []
    assert rejected(server) == [(0, evil, IntegrityError)]
    assert server.active == frozenset(range(6)) - {evil}
    outcome = network.step()
    assert outcome.included == server.active
    assert_exact_sum(outcome, inputs, codec)


def _setup_by_hand(n: int = 5, threshold: int = 3):
    """A server and honest clients with the session offered; returns their advertisements."""
    server = SecAggServer(graph=complete_graph(n), threshold=threshold,
                          codec=FixedPointCodec.for_clients(n, clip=1.0), vector_length=4)
    clients = {c: SecAggClient(lambda step: np.zeros(4)) for c in range(n)}
    adverts = {c: clients[c].handle(offer) for c, offer in server.open_session().items()}
    return server, clients, adverts


def test_a_copied_key_with_its_ignored_bit_set_is_refused():
    server, clients, adverts = _setup_by_hand()
    copied = with_ignored_bit(KeyAdvertisement.decode(adverts[1]).public_key)
    adverts[4] = KeyAdvertisement(server.session_id, 4, copied).encode()
    server.receive(adverts)
    assert rejected(server) == [(0, 4, IntegrityError)]
    assert 4 not in server.active


def test_an_honest_client_refuses_a_roster_with_a_non_canonical_key():
    server, clients, adverts = _setup_by_hand(4, 2)
    adverts = {c: KeyAdvertisement.decode(a) for c, a in adverts.items()}
    roster = {peer: adverts[peer].public_key for peer in (1, 2, 3)}
    roster[3] = with_ignored_bit(roster[3])
    with pytest.raises(IntegrityError, match="canonical"):
        clients[0].handle(Roster(server.session_id, 0, roster).encode())


def test_an_honest_client_refuses_a_roster_with_a_low_order_key():
    # the client checks only the encoding itself; its key agreement refuses the point
    server, clients, adverts = _setup_by_hand(4, 2)
    adverts = {c: KeyAdvertisement.decode(a) for c, a in adverts.items()}
    roster = {peer: adverts[peer].public_key for peer in (1, 2, 3)}
    roster[3] = key_bytes(1)
    with pytest.raises(IntegrityError, match="low-order"):
        clients[0].handle(Roster(server.session_id, 0, roster).encode())


# -- (b) malformed shares in a ShareReveal ------------------------------------------------------

def _shares_of(value: bytes) -> Tamper:
    def reveal(client, msg):
        return ShareReveal(msg.session_id, msg.client_id, msg.step,
                           dict.fromkeys(msg.shares, value), len(value))
    return reveal


def _shortened(client, msg):
    return ShareReveal(msg.session_id, msg.client_id, msg.step,
                       {o: s[1:] for o, s in msg.shares.items()}, 32)


@pytest.mark.parametrize("tamper", [
    _shortened, _shares_of(shamir.FIELD_256.prime.to_bytes(33, "big")),
    _shares_of(b"\xff" * 33), _shares_of(bytes(34)),
], ids=["32-bytes", "p", "all-ones", "34-bytes"])
def test_a_malformed_share_excludes_only_its_holder(tamper):
    server, network, inputs, codec = session_with(2, ShareReveal, tamper)
    network.setup()
    outcome = network.step()
    assert rejected(server) == [(1, 2, MalformedMessageError)]
    assert outcome.included == frozenset(range(6))  # 2 uploaded: it is in the sum
    assert_exact_sum(outcome, inputs, codec)


@SLOW
@given(n=st.integers(4, 9), data=st.data())
def test_shares_off_the_field_never_stop_the_step(n, data):
    threshold = data.draw(st.integers(1, n - 2), label="threshold")
    evil = data.draw(st.integers(0, n - 1), label="evil")
    y = data.draw(st.integers(shamir.FIELD_256.prime, 2**264 - 1), label="share")
    tamper = _shares_of(y.to_bytes(33, "big"))
    server, network, inputs, codec = session_with(evil, ShareReveal, tamper, n=n,
                                                  threshold=threshold)
    network.setup()
    outcome = network.step()
    assert rejected(server) == [(1, evil, MalformedMessageError)]
    assert_exact_sum(outcome, inputs, codec)


def test_excluding_a_holder_keeps_the_threshold_check():
    server, network, *_ = session_with(0, ShareReveal, _shortened, n=3, threshold=2)
    network.setup()
    with pytest.raises(TooFewSurvivorsError, match="share holders of client 1"):
        network.step()
    assert rejected(server) == [(1, 0, MalformedMessageError)]


def test_a_holder_may_leave_out_an_owner():
    def leave_out_one(client, msg):
        return ShareReveal(msg.session_id, msg.client_id, msg.step,
                           {o: s for o, s in msg.shares.items() if o != 4}, msg.share_bytes)

    server, network, inputs, codec = session_with(2, ShareReveal, leave_out_one)
    network.setup()
    outcome = network.step()
    assert rejected(server) == []
    assert outcome.included == frozenset(range(6))
    assert_exact_sum(outcome, inputs, codec)


def test_a_share_of_a_non_neighbour_is_still_refused():
    def add_own(client, msg):  # in place of a neighbour's: the reply keeps its length
        shares = {o: s for o, s in msg.shares.items() if o != max(msg.shares)}
        return ShareReveal(msg.session_id, msg.client_id, msg.step,
                           {**shares, msg.client_id: bytes(33)}, msg.share_bytes)

    server, network, inputs, codec = session_with(2, ShareReveal, add_own)
    network.setup()
    assert_exact_sum(network.step(), inputs, codec)
    assert rejected(server) == [(1, 2, IntegrityError)]


# -- (c) malformed and forged envelopes ------------------------------------------------------------

def _envelopes(replace: Callable[[SecAggClient, MaskedInput, int, bytes], bytes]) -> Tamper:
    def upload(client, msg):
        sealed = {h: replace(client, msg, h, e) for h, e in msg.envelopes.items()}
        return MaskedInput(msg.session_id, msg.client_id, msg.step, msg.vector.copy(), sealed)
    return upload


@SLOW
@given(n=st.integers(4, 9), data=st.data())
def test_an_envelope_of_the_wrong_size_excludes_only_its_sender(n, data):
    threshold = data.draw(st.integers(1, n - 2), label="threshold")
    evil = data.draw(st.integers(0, n - 1), label="evil")
    holder = data.draw(st.sampled_from(sorted(set(range(n)) - {evil})), label="holder")
    size = data.draw(st.integers(0, 200).filter(lambda s: s != SEALED), label="size")
    tamper = _envelopes(lambda c, m, h, e: os.urandom(size) if h == holder else e)
    server, network, inputs, codec = session_with(evil, MaskedInput, tamper, n=n,
                                                  threshold=threshold)
    network.setup()
    outcome = network.step()
    assert network.refusals == []
    # a longer envelope makes the whole upload longer than the session allows: refused unread
    error = IntegrityError if size < SEALED else MalformedMessageError
    assert rejected(server) == [(1, evil, error)]
    assert outcome.dropped == {evil}
    assert_exact_sum(outcome, inputs, codec)


def test_empty_and_random_envelopes_exclude_only_their_sender():
    tamper = _envelopes(lambda c, m, h, e: b"" if h == 0 else os.urandom(SEALED + 1))
    server, network, inputs, codec = session_with(5, MaskedInput, tamper, n=10, threshold=5)
    network.setup()
    outcome = network.step()
    assert outcome.included == frozenset(range(10)) - {5}
    assert_exact_sum(outcome, inputs, codec)


@SLOW
@given(n=st.integers(4, 9), data=st.data())
def test_forged_envelopes_cost_only_the_forgers_share(n, data):
    threshold = data.draw(st.integers(1, n - 2), label="threshold")
    evil = data.draw(st.integers(0, n - 1), label="evil")
    holders = sorted(set(range(n)) - {evil})
    # at most n - 1 - t forged, so t holders can still open the evil client's envelope
    forged = data.draw(st.sets(st.sampled_from(holders), min_size=1,
                               max_size=n - 1 - threshold), label="forged")
    tamper = _envelopes(lambda c, m, h, e: os.urandom(SEALED) if h in forged else e)
    server, network, inputs, codec = session_with(evil, MaskedInput, tamper, n=n,
                                                  threshold=threshold)
    network.setup()
    outcome = network.step()
    assert network.refusals == [] and rejected(server) == []
    assert outcome.included == frozenset(range(n))
    assert_exact_sum(outcome, inputs, codec)


def _sealed(plaintext: bytes) -> Callable[[SecAggClient, MaskedInput, int, bytes], bytes]:
    """An envelope the evil client seals properly, around a plaintext that is not a share."""
    def replace(client, msg, holder, sealed):
        if holder != 0:
            return sealed
        aad = keys.envelope_aad(session_id=msg.session_id, step=msg.step,
                                sender=msg.client_id, receiver=holder)
        return envelope.seal(client._seal_keys[holder], plaintext,
                             nonce=keys.envelope_nonce(msg.step), associated_data=aad)
    return replace


@pytest.mark.parametrize("plaintext", [
    bytes(32), b"\xff" * 33, shamir.FIELD_256.prime.to_bytes(33, "big"),
], ids=["32-bytes", "all-ones", "p"])
def test_a_validly_sealed_non_share_is_skipped_by_its_holder(plaintext):
    # the length differs for the 32-byte one: the server refuses it before any holder sees it
    server, network, inputs, codec = session_with(3, MaskedInput, _envelopes(_sealed(plaintext)))
    network.setup()
    outcome = network.step()
    assert network.refusals == []
    assert_exact_sum(outcome, inputs, codec)
    if len(plaintext) == 33:
        assert rejected(server) == [] and outcome.included == frozenset(range(6))


def test_forged_envelopes_to_too_many_holders_fail_the_step_not_the_holders():
    """What is left: the server cannot tell a forger from a lying holder, so it cannot drop it."""
    tamper = _envelopes(lambda c, m, h, e: os.urandom(SEALED) if h < 3 else e)
    server, network, *_ = session_with(5, MaskedInput, tamper, n=6, threshold=3)
    network.setup()
    with pytest.raises(TooFewSurvivorsError, match="share holders of client 5"):
        network.step()
    assert network.refusals == []


# -- (c) the holder's side: skipping a forged envelope reveals nothing new ------------------

def _uploads(server, clients, *, confirmed=True) -> dict[int, MaskedInput]:
    """Every client's upload at step 1, then (if `confirmed`) the consistency round with
    nobody dropped."""
    uploads = {c: MaskedInput.decode(clients[c].handle(r))
               for c, r in server.open_step().items()}
    server.tokens = confirm(server.session_id, clients, 1, uploads if confirmed else ())
    return uploads


def _share_request(server, uploads, holder, survivors, forged=()):
    sealed = {p: os.urandom(SEALED) if p in forged else uploads[p].envelopes[holder]
              for p in survivors if p != holder}
    tokens = {p: server.tokens[(p, holder)] for p in survivors
              if p != holder and (p, holder) in server.tokens}
    return ShareRequest(server.session_id, 1, frozenset(survivors), sealed, tokens).encode()


def test_a_skipped_envelope_still_blocks_pair_seeds_and_a_second_try(session5):
    server, clients, *_ = session5
    uploads = _uploads(server, clients)
    reveal = ShareReveal.decode(
        clients[0].handle(_share_request(server, uploads, 0, range(5), forged={2})))
    assert set(reveal.shares) == {1, 3, 4}
    with pytest.raises(PolicyViolationError, match="self-mask shares were revealed"):
        clients[0].handle(DropRequest(server.session_id, 1, frozenset({2})).encode())
    with pytest.raises(ReplayError):
        clients[0].handle(_share_request(server, uploads, 0, range(5)))


def test_never_both_is_checked_before_any_envelope_is_opened(session5):
    server, clients, *_ = session5
    uploads = _uploads(server, clients, confirmed=False)
    seeds = clients[0].handle(DropRequest(server.session_id, 1, frozenset({2})).encode())
    assert set(PairwiseReveal.decode(seeds).seeds) == {2}
    with pytest.raises(PolicyViolationError, match="already revealed"):
        clients[0].handle(_share_request(server, uploads, 0, range(5), forged={2}))


@given(forged=st.sets(st.sampled_from([1, 2, 3, 4])))
@settings(max_examples=16, deadline=None)
def test_a_holder_reveals_exactly_the_shares_that_open_or_refuses(forged):
    server, clients, network, *_ = make_session(5, 4, threshold=3)
    network.setup()
    uploads = _uploads(server, clients)
    request = _share_request(server, uploads, 0, range(5), forged=forged)
    if 4 - len(forged) < 3:
        with pytest.raises(IntegrityError, match="fewer than the threshold"):
            clients[0].handle(request)
        assert not clients[0]._step.shares_revealed
        return
    reveal = ShareReveal.decode(clients[0].handle(request))
    assert set(reveal.shares) == {1, 2, 3, 4} - forged
    for share in reveal.shares.values():
        shamir.check_share(share)


# -- (d) the server's vector length ---------------------------------------------------------

@pytest.mark.parametrize("bad", [-1, 0, 2.5, True, False, "3", None, MAX_VECTOR + 1])
def test_a_bad_vector_length_is_a_parameter_error(bad):
    with pytest.raises(ParameterError, match="vector_length"):
        SecAggServer(graph=complete_graph(3), threshold=1,
                     codec=FixedPointCodec.for_clients(3, clip=1.0), vector_length=bad)


def test_a_numpy_vector_length_is_taken_as_an_int():
    server = SecAggServer(graph=complete_graph(3), threshold=1,
                          codec=FixedPointCodec.for_clients(3, clip=1.0),
                          vector_length=np.int64(7))
    assert server.vector_length == 7 and type(server.vector_length) is int
