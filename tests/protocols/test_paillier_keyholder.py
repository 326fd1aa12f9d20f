"""The Paillier key holder decrypts only its own product of tagged uploads: the attacks a server
can try, each refused with a typed error, and controls showing they work without the checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from protocols.errors import (
    IntegrityError,
    MalformedMessageError,
    ReplayError,
    StageError,
    TooFewSurvivorsError,
)
from protocols.paillier.messages import Ciphertexts, ClientKey, UploadBundle
from protocols.paillier.packing import pack, unpack_sum
from protocols.paillier.roles import (
    PaillierKeyHolder,
    raw_decrypt,
    raw_encrypt,
    raw_multiply,
    upload_tag,
)
from protocols.paillier.session import PaillierSession, generate_keypair

N, M = 3, 40  # a 512-bit key holds 15 slots per plaintext: 3 ciphertexts per upload


@pytest.fixture(scope="module")
def keypair512():
    return generate_keypair(512, unsafe_small_keys=True)


@pytest.fixture
def session(keypair512):
    with PaillierSession(N, M, clip=1.0, keypair=keypair512, workers=1, rounding="nearest",
                         unsafe_small_keys=True) as s:
        yield s


def _inputs(seed: int = 0) -> np.ndarray:
    """Distinct client vectors on a 1/16 grid: exact in fixed point, so comparisons are exact."""
    return np.random.default_rng(seed).integers(-16, 17, (N, M)) / 16


def _uploads(s: PaillierSession, x: np.ndarray) -> dict[int, Ciphertexts]:
    """Every client's genuine, tagged upload for a newly opened step."""
    request = s.server.open_step()
    return {c: Ciphertexts.decode(s.clients[c].upload(request, x[c]), Ciphertexts.UPLOAD)
            for c in range(N)}


def _bundle(s: PaillierSession, uploads, step: int | None = None) -> bytes:
    """What a malicious server sends the key holder: any uploads it likes, framed correctly."""
    return UploadBundle(s.key_holder.session_id, s.server.last_step if step is None else step,
                        tuple(uploads)).encode()


def _values(s: PaillierSession, plaintexts, n_summed: int = 1) -> np.ndarray:
    """Unpack plaintexts of one upload's length into floats."""
    sums = unpack_sum(s.layout, plaintexts, length=M, n_summed=n_summed)
    return sums / 2**s.codec.scale_bits


def _honest_sum(s: PaillierSession, uploads: dict[int, Ciphertexts]) -> np.ndarray:
    outcome = s.server.finish(s.key_holder.decrypt(
        s.server.forward({c: u.encode() for c, u in uploads.items()})))
    return outcome.total


def test_an_honest_bundle_decrypts_to_the_exact_sum(session):
    x = _inputs()
    assert session.layout.plaintexts_for(M) == N  # the splice below needs one ciphertext each
    np.testing.assert_array_equal(_honest_sum(session, _uploads(session, x)), x.sum(0))


def test_the_concatenation_attack_is_refused(session, keypair512):
    """The server hands over every client's ciphertexts as one 'aggregate': refused by count."""
    x, s = _inputs(1), session
    uploads = _uploads(s, x)
    everyone = sum((u.values for u in uploads.values()), ())
    concatenated = dataclasses.replace(uploads[0], values=everyone)
    with pytest.raises(MalformedMessageError, match=f"must hold {N} ciphertexts"):
        s.key_holder.decrypt(_bundle(s, [concatenated]))
    # control: the raw decryption it wraps returns each client's vector alone
    plain = raw_decrypt(keypair512[1], everyone)
    for c in range(N):
        np.testing.assert_array_equal(_values(s, plain[c * N : (c + 1) * N]), x[c])
    # the refusal decrypted nothing and spent nothing: the honest sum of this step follows
    np.testing.assert_array_equal(_honest_sum(s, uploads), x.sum(0))


def test_a_spliced_upload_of_the_right_size_is_refused_by_its_tag(session, keypair512):
    """Ciphertext i taken from client i, labelled client 0: the count fits, the tag does not."""
    x, s = _inputs(2), session
    uploads = _uploads(s, x)
    spliced = dataclasses.replace(uploads[0], values=tuple(uploads[c].values[c]
                                                           for c in range(N)))
    with pytest.raises(IntegrityError, match="client 0's upload fails its tag"):
        s.key_holder.decrypt(_bundle(s, [spliced]))
    plain = raw_decrypt(keypair512[1], spliced.values)  # control: slots of three clients
    slots = s.layout.slots
    for c in range(N):
        block = _values(s, [0] * c + [plain[c]] + [0] * (N - 1 - c))  # others' slots hold 0: -V
        within = slice(c * slots, min((c + 1) * slots, M))
        np.testing.assert_array_equal(block[within], x[c][within])


def test_forged_uploads_that_isolate_one_client_are_refused(session, keypair512):
    """The server encrypts zeros for the other members (it knows N): their tags fail."""
    x, s = _inputs(3), session
    uploads = _uploads(s, x)
    n = keypair512[0].n
    zeros = pack(s.layout, np.zeros(M, np.int64))
    forged = [dataclasses.replace(uploads[c], values=tuple(raw_encrypt(n, p, 7 + c)
                                                           for p in zeros), tag=bytes(32))
              for c in (1, 2)]
    with pytest.raises(IntegrityError, match="client 1's upload fails its tag"):
        s.key_holder.decrypt(_bundle(s, [uploads[0], *forged]))
    # control: without the tag check the 'sum' of three is client 0's vector
    product = raw_multiply(n, [uploads[0].values, *(f.values for f in forged)])
    np.testing.assert_array_equal(_values(s, raw_decrypt(keypair512[1], product), N), x[0])
    # an altered genuine upload (plaintext + 1, by multiplying in Enc(1)) fails too
    bumped = list(uploads[1].values)
    bumped[0] = bumped[0] * raw_encrypt(n, 1, 5) % n**2
    altered = dataclasses.replace(uploads[1], values=tuple(bumped))
    with pytest.raises(IntegrityError, match="client 1's upload fails its tag"):
        s.key_holder.decrypt(_bundle(s, [uploads[0], altered, uploads[2]]))
    np.testing.assert_array_equal(_honest_sum(s, uploads), x.sum(0))


def test_uploads_replayed_from_another_step_or_session_are_refused(session, keypair512):
    s = session
    old = _uploads(s, _inputs(4))
    _honest_sum(s, old)
    x = _inputs(5)
    new = _uploads(s, x)  # step 2
    with pytest.raises(ReplayError, match="client 0's upload is of another session or step"):
        s.key_holder.decrypt(_bundle(s, [old[0], new[1], new[2]]))
    relabelled = dataclasses.replace(old[0], step=2)  # the tag binds step 1
    with pytest.raises(IntegrityError, match="client 0's upload fails its tag"):
        s.key_holder.decrypt(_bundle(s, [relabelled, new[1], new[2]]))
    with PaillierSession(N, M, clip=1.0, keypair=keypair512, workers=1, rounding="nearest",
                         unsafe_small_keys=True) as other:  # same key, another session
        other.server.open_step()
        theirs = _uploads(other, x)  # its step 2
    assert theirs[0].step == 2 and theirs[0].session_id != s.key_holder.session_id
    with pytest.raises(ReplayError, match="another session"):
        s.key_holder.decrypt(_bundle(s, [theirs[0], new[1], new[2]]))
    moved = dataclasses.replace(theirs[0], session_id=s.key_holder.session_id)  # tag binds theirs
    with pytest.raises(IntegrityError, match="client 0's upload fails its tag"):
        s.key_holder.decrypt(_bundle(s, [moved, new[1], new[2]]))
    with pytest.raises(StageError, match="another session"):
        s.key_holder.decrypt(UploadBundle(other.key_holder.session_id, 2,
                                          (theirs[0],)).encode())
    np.testing.assert_array_equal(_honest_sum(s, new), x.sum(0))


def test_duplicate_and_unknown_members_are_refused(session, keypair512):
    x, s = _inputs(6), session
    uploads = _uploads(s, x)
    for members in ([uploads[0]] * N, [uploads[1], uploads[0]]):
        with pytest.raises(MalformedMessageError, match="one upload per client"):
            s.key_holder.decrypt(_bundle(s, members))
    # control: N copies of one upload make a 'quorum' whose sum is N times that client's vector
    copies = raw_multiply(keypair512[0].n, [uploads[0].values] * N)
    np.testing.assert_array_equal(_values(s, raw_decrypt(keypair512[1], copies), N) / N, x[0])
    stranger = dataclasses.replace(uploads[2], members=frozenset({N}))  # no client N
    with pytest.raises(IntegrityError, match=f"unknown client {N}"):
        s.key_holder.decrypt(_bundle(s, [uploads[0], uploads[1], stranger]))
    # a key holder to which client 2 never enrolled
    holder = PaillierKeyHolder(keypair512, n_clients=N, vector_length=M, codec=s.codec,
                               unsafe_small_keys=True)
    for c in (0, 1):
        holder.enroll(ClientKey(holder.session_id, c, s.clients[c].auth_key).encode())
    with pytest.raises(IntegrityError, match="unknown client 2: no enrolled key"):
        holder.decrypt(UploadBundle(holder.session_id, 1, tuple(
            dataclasses.replace(uploads[c], session_id=holder.session_id) for c in range(N))
        ).encode())
    with pytest.raises(StageError, match="already enrolled"):
        holder.enroll(ClientKey(holder.session_id, 0, s.clients[2].auth_key).encode())
    with pytest.raises(IntegrityError, match=f"unknown client {N}"):
        holder.enroll(ClientKey(holder.session_id, N, s.clients[2].auth_key).encode())
    np.testing.assert_array_equal(_honest_sum(s, uploads), x.sum(0))


def test_a_bundle_below_the_quorum_is_refused(keypair512):
    x = _inputs(7)
    with PaillierSession(N, M, clip=1.0, keypair=keypair512, workers=1, rounding="nearest",
                         unsafe_small_keys=True, quorum=N) as s:
        uploads = _uploads(s, x)
        with pytest.raises(TooFewSurvivorsError, match=f"needs {N}, only {N - 1}"):
            s.key_holder.decrypt(_bundle(s, [uploads[0], uploads[1]]))
        # control: the raw path decrypts the product of two, which with client 1's own input
        # gives client 0's vector to a colluding client 1
        two = raw_multiply(keypair512[0].n, [uploads[0].values, uploads[1].values])
        np.testing.assert_array_equal(_values(s, raw_decrypt(keypair512[1], two), 2) - x[1],
                                      x[0])
        np.testing.assert_array_equal(_honest_sum(s, uploads), x.sum(0))


def test_a_step_is_decrypted_at_most_once(session):
    x, s = _inputs(8), session
    uploads = _uploads(s, x)
    bundle = _bundle(s, uploads.values())
    s.key_holder.decrypt(bundle)
    for again in (bundle, _bundle(s, [uploads[0]]), _bundle(s, [uploads[1], uploads[2]])):
        with pytest.raises(ReplayError, match="step 1 comes after step 1 was decrypted"):
            s.key_holder.decrypt(again)


def test_a_malicious_client_cannot_send_more_than_one_upload_of_ciphertexts(session):
    """A client tags what it likes, but the key holder still counts its ciphertexts."""
    x, s = _inputs(9), session
    uploads = _uploads(s, x)
    client = s.clients[0]
    values = uploads[0].values + uploads[0].values[:1]
    tag = upload_tag(client._upload_key, session_id=uploads[0].session_id, step=1, client_id=0,
                     width=uploads[0].width, values=values)
    longer = dataclasses.replace(uploads[0], values=values, tag=tag)
    # two uploads: the bundle fits the size of N honest ones, so the count check is what refuses
    with pytest.raises(MalformedMessageError, match=f"must hold {N} ciphertexts"):
        s.key_holder.decrypt(_bundle(s, [longer, uploads[1]]))


def test_enrollment_closes_at_the_first_decryption(session):
    s = session
    _honest_sum(s, _uploads(s, _inputs(10)))
    with pytest.raises(StageError, match="at setup"):
        s.key_holder.enroll(s.clients[0].enrollment())
