"""Packed Paillier path: exact ring sums, known answers, key policy, strict decoders, roles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from phe.paillier import PaillierPrivateKey, PaillierPublicKey

from protocols.api import SecAggSession
from protocols.codec import FixedPointCodec
from protocols.errors import (
    IntegrityError,
    MalformedMessageError,
    OverflowBudgetError,
    ParameterError,
    ProtocolError,
    ReplayError,
    TooFewSurvivorsError,
)
from protocols.paillier.packing import SlotLayout, pack, unpack_sum
from protocols.paillier.roles import (
    PaillierClient,
    PaillierKeyHolder,
    PaillierServer,
    ParallelEncryptor,
    raw_encrypt,
    raw_multiply,
    upload_key,
    upload_tag,
)
from protocols.paillier.session import (
    PaillierSession,
    generate_keypair,
    paillier_sum,
    unsafe_keypair_from_primes,
)
from protocols.session import Dropout, SecureSumResult, Stage

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "paillier_packed.json").read_text())


@pytest.fixture(scope="module")
def keypair512():
    return generate_keypair(512, unsafe_small_keys=True)


def _session(n, m, keypair, **kw) -> PaillierSession:
    kw.setdefault("clip", 1.0)
    return PaillierSession(n, m, keypair=keypair, workers=1, unsafe_small_keys=True, **kw)


def _ring_sum(codec: FixedPointCodec, rows: list[np.ndarray]) -> np.ndarray:
    return codec.sum([codec.encode(r) for r in rows])


# ---- exact sums ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_sum_equals_the_plaintext_ring_sum_exactly(keypair512, seed):
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(2, 9)), int(rng.integers(1, 200))
    x = rng.uniform(-1.5, 1.5, (n, m))  # some beyond the clip: they are clipped alike
    x[0, : min(m, 2)] = [1.0, -1.0][: min(m, 2)]  # the boundary values +-clip
    with _session(n, m, keypair512, rounding="nearest") as s:
        present = sorted(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False).tolist())
        outcome = s.step({c: x[c] for c in present})
        expected = _ring_sum(s.codec, [x[c] for c in present])
        np.testing.assert_array_equal(outcome.ring_total, expected)
        np.testing.assert_array_equal(outcome.total,
                                      s.codec.decode_sum(expected, n_summed=len(present)))
        assert outcome.included == frozenset(present)
        assert outcome.dropped == frozenset(range(n)) - frozenset(present)


@pytest.mark.parametrize("ring_bits", [16, 48, 63, 64])
def test_all_clients_at_plus_and_minus_clip(keypair512, ring_bits):
    n, m = 6, 90
    with _session(n, m, keypair512, clip=0.75, ring_bits=ring_bits, rounding="nearest") as s:
        for sign in (1.0, -1.0):
            out = s.step({c: np.full(m, sign * 0.75) for c in range(n)})
            q = math.ceil(0.75 * 2**s.codec.scale_bits)
            assert out.total.tolist() == [sign * n * q / 2**s.codec.scale_bits] * m
            np.testing.assert_array_equal(
                out.ring_total, _ring_sum(s.codec, [np.full(m, sign * 0.75)] * n))


def test_same_encodings_as_secagg_with_nearest_rounding(keypair512):
    """Both paths encode alike: identical ring sums (SecAgg's stochastic rounding is keyed by
    a client secret, so only nearest rounding is comparable across sessions)."""
    n, m = 4, 33
    x = np.random.default_rng(5).uniform(-1, 1, (n, m)).astype(np.float32)
    secagg = SecAggSession(n, m, clip=1.0, protocol="secagg", rounding="nearest")
    with _session(n, m, keypair512, rounding="nearest") as s:
        for _ in range(2):
            ours = s.step({c: x[c] for c in range(n)})
            theirs = secagg.step({c: x[c] for c in range(n)})
            np.testing.assert_array_equal(ours.ring_total, theirs.ring_total)
            x = -x


def test_dropouts_and_late_dropouts_over_several_steps(keypair512):
    n, m = 5, 40
    x = np.random.default_rng(1).uniform(-1, 1, (n, m))
    with _session(n, m, keypair512) as s:
        setup = s.traffic.bytes_up.copy()  # each client's key, relayed to the key holder
        first = s.step({c: x[c] for c in (0, 1, 3)}, drop_after_upload=[1])
        assert first.included == {0, 1, 3} and first.dropped == {2, 4} and first.step == 1
        second = s.step({c: x[c] for c in range(n)})  # Paillier keeps no state: all may return
        assert second.included == frozenset(range(n)) and second.step == 2
        assert s.active == frozenset(range(n)) and s.threshold == 1 and s.degree == 0
        assert np.abs(second.total - x.sum(0)).max() <= s.codec.error_bound(n)
        up = s.traffic.bytes_up - setup
        assert up[2] == up[0] // 2 and up[2] > 0  # one upload against two
        with pytest.raises(TooFewSurvivorsError):
            s.step({})
        with pytest.raises(ParameterError):
            s.step({7: x[0]})


def test_noise_hook_is_added_exactly_and_bounded(keypair512):
    n, m, bound = 3, 50, 1000

    def noise(cid, step, length):
        return np.random.default_rng([cid, step]).integers(-bound, bound + 1, length)

    x = np.random.default_rng(2).uniform(-1, 1, (n, m))
    with _session(n, m, keypair512, noise=noise, noise_bound=bound, rounding="nearest") as s:
        plain = _session(n, m, keypair512, rounding="nearest", scale_bits=s.codec.scale_bits)
        assert s.layout.value_bound == math.ceil(2**s.codec.scale_bits) + bound
        out = s.step({c: x[c] for c in range(n)})
        ref = plain.step({c: x[c] for c in range(n)})
        added = sum(noise(c, 1, m) for c in range(n))
        diff = (out.ring_total - ref.ring_total).view(np.int32)  # mod 2^32, read signed
        assert diff.tolist() == added.tolist()
        np.testing.assert_array_equal(out.total - ref.total, added / 2**s.codec.scale_bits)
    with _session(n, m, keypair512, noise=lambda c, t, k: np.full(k, bound + 1),
                  noise_bound=bound) as s:
        with pytest.raises(TooFewSurvivorsError):  # every client refuses to exceed the bound
            s.step({0: x[0], 1: x[1]})
        assert [type(e) for _, _, e in s.refusals] == [OverflowBudgetError] * 2


def test_noise_that_cannot_fit_the_ring_is_refused_up_front(keypair512):
    with pytest.raises(OverflowBudgetError):
        _session(4, 8, keypair512, scale_bits=28, noise_bound=2**28)
    s = _session(4, 8, keypair512, noise_bound=2**20)  # scale_bits chosen to leave room
    assert 4 * (2**s.codec.scale_bits + 1 + 2**20) <= 2**31 - 1


def test_paillier_sum_returns_a_secure_sum_result(keypair512):
    x = np.random.default_rng(3).uniform(-2, 2, (4, 70))
    result = paillier_sum(x, clip=2.0, keypair=keypair512, unsafe_small_keys=True, workers=1,
                          dropouts=[Dropout(1, 1, Stage.UPLOAD), Dropout(2, 1, Stage.SHARES)])
    assert isinstance(result, SecureSumResult) and result.protocol == "paillier"
    assert result.included == (0, 2, 3) and result.dropped == (1,)
    assert np.abs(result.total - x[[0, 2, 3]].sum(0)).max() <= result.error_bound
    # client 1 sent only its setup key, the others also their upload
    from protocols.paillier.messages import ClientKey

    setup = len(ClientKey(b"\0" * 16, 1, b"\0" * 32).encode())
    assert result.bytes_up[1] == setup and result.bytes_up[0] > setup


# ---- known answers ------------------------------------------------------------------------------

def test_regression_vectors():
    v = VECTORS
    p, q, n = int(v["p"], 16), int(v["q"], 16), int(v["n"], 16)
    public, private = unsafe_keypair_from_primes(p, q)
    assert public.n == n
    codec = FixedPointCodec(clip=v["clip"], scale_bits=v["scale_bits"], ring_bits=v["ring_bits"],
                            rounding="nearest")
    layout = SlotLayout.for_modulus(n, value_bound=v["value_bound"], max_summands=v["n_clients"],
                                    guard_bits=v["guard_bits"])
    assert (layout.slot_bits, layout.slots) == (v["slot_bits"], v["slots"])
    for client in v["clients"]:
        ring = codec.encode(np.array(client["inputs"]))
        encoded = ring.astype(np.int64)
        encoded[encoded >= 2**15] -= 2**16
        assert encoded.tolist() == client["encoded"]
        plaintexts = pack(layout, encoded)
        assert [hex(x) for x in plaintexts] == client["plaintexts"]
        for m, r, c in zip(plaintexts, client["r"], client["ciphertexts"], strict=True):
            assert raw_encrypt(n, m, int(r, 16)) == int(c, 16)
            assert public.raw_encrypt(m, r_value=int(r, 16)) == int(c, 16)  # phe agrees
    assert [hex(private.raw_decrypt(int(a, 16))) for a in v["aggregate"]] == v["decrypted"]
    sums = unpack_sum(layout, [int(d, 16) for d in v["decrypted"]], length=v["vector_length"],
                      n_summed=v["n_clients"])
    assert sums.tolist() == v["sums"]


def test_roles_reproduce_the_vector_aggregate():
    """Server and key holder, fed the vector uploads as tagged bytes, return the vector sums."""
    from protocols.paillier.messages import Ciphertexts, ClientKey
    from protocols.primitives.kdf import agree
    from protocols.primitives.kdf import generate_keypair as x25519_keypair

    v = VECTORS
    keypair = unsafe_keypair_from_primes(int(v["p"], 16), int(v["q"], 16))
    codec = FixedPointCodec(clip=v["clip"], scale_bits=v["scale_bits"], ring_bits=v["ring_bits"],
                            rounding="nearest")
    params = dict(n_clients=v["n_clients"], vector_length=v["vector_length"], codec=codec,
                  guard_bits=v["guard_bits"], unsafe_small_keys=True)
    holder = PaillierKeyHolder(keypair, **params)
    server = PaillierServer(holder.announce(), **params)
    server.open_step()
    width = -(-2 * keypair[0].n.bit_length() // 8)
    uploads = {}
    for cid, client in enumerate(v["clients"]):
        private, public = x25519_keypair()
        holder.enroll(ClientKey(holder.session_id, cid, public).encode())
        key = upload_key(agree(private, holder.auth_key), session_id=holder.session_id,
                         client_id=cid, client_key=public, holder_key=holder.auth_key)
        values = tuple(int(c, 16) for c in client["ciphertexts"])
        tag = upload_tag(key, session_id=holder.session_id, step=1, client_id=cid, width=width,
                         values=values)
        uploads[cid] = Ciphertexts(server.session_id, 1, Ciphertexts.UPLOAD, frozenset({cid}),
                                   width, values, tag).encode()
    clients = [[int(c, 16) for c in client["ciphertexts"]] for client in v["clients"]]
    assert [hex(c) for c in raw_multiply(keypair[0].n, clients)] == v["aggregate"]
    outcome = server.finish(holder.decrypt(server.forward(uploads)))
    assert (outcome.total * 2 ** v["scale_bits"]).tolist() == v["sums"]


# ---- key policy, roles, decoders ----------------------------------------------------------------

@pytest.mark.parametrize("bits", [512, 1024, 2047])
def test_keys_below_2048_bits_are_refused_on_the_safe_path(keypair512, bits):
    with pytest.raises(ParameterError):
        generate_keypair(bits)
    with pytest.raises(ParameterError):
        PaillierSession(3, 4, clip=1.0, key_bits=bits)
    with pytest.raises(ParameterError):
        PaillierSession(3, 4, clip=1.0, keypair=keypair512)
    codec = FixedPointCodec.for_clients(3, clip=1.0)
    with pytest.raises(ParameterError):
        PaillierKeyHolder(keypair512, n_clients=3, vector_length=4, codec=codec)
    holder = PaillierKeyHolder(keypair512, n_clients=3, vector_length=4, codec=codec,
                               unsafe_small_keys=True)
    with pytest.raises(ParameterError):
        PaillierServer(holder.announce(), n_clients=3, vector_length=4,
                       codec=FixedPointCodec.for_clients(3, clip=1.0))
    server = PaillierServer(holder.announce(), n_clients=3, vector_length=4,
                            codec=FixedPointCodec.for_clients(3, clip=1.0), unsafe_small_keys=True)
    with pytest.raises(ParameterError):  # an honest client refuses a weak key it is offered
        PaillierClient(0, server.offer(0))


def _objects(root, seen=None):
    """Every object reachable from root through attributes and containers."""
    seen = set() if seen is None else seen
    if id(root) in seen:
        return
    seen.add(id(root))
    yield root
    children = []
    if isinstance(root, dict):
        children = [*root.keys(), *root.values()]
    elif isinstance(root, (list, tuple, set, frozenset)):
        children = list(root)
    elif hasattr(root, "__dict__"):
        children = list(vars(root).values())
    for child in children:
        yield from _objects(child, seen)


def test_server_never_holds_the_private_key(keypair512):
    public, private = keypair512
    with _session(3, 20, keypair512) as s:
        s.step({c: np.zeros(20) for c in range(3)})
        reachable = list(_objects(s.server))
        assert not any(isinstance(o, PaillierPrivateKey) for o in reachable)
        assert not any(isinstance(o, PaillierPublicKey) for o in reachable)  # it has only N
        ints = {int(o) for o in reachable if isinstance(o, int) and not isinstance(o, bool)}
        assert public.n in ints
        assert not ints & {private.p, private.q, private.hp, private.hq}
        assert not any(1 < i < public.n and public.n % i == 0 for i in ints)
        # clients hold no private key either; only the key holder does
        assert not any(isinstance(o, PaillierPrivateKey) for o in _objects(s.clients))
        assert any(isinstance(o, PaillierPrivateKey) for o in _objects(s.key_holder))


def test_replays_are_refused(keypair512):
    with _session(2, 10, keypair512) as s:
        request = s.server.open_step()
        upload = s.clients[0].upload(request, np.zeros(10))
        with pytest.raises(ReplayError):
            s.clients[0].upload(request, np.zeros(10))
        bundle = s.server.forward({0: upload})
        s.key_holder.decrypt(bundle)
        with pytest.raises(ReplayError):  # the key holder decrypts each step once
            s.key_holder.decrypt(bundle)


def test_a_forged_upload_is_rejected_and_excluded(keypair512):
    with _session(3, 10, keypair512) as s:
        request = s.server.open_step()
        good = {c: s.clients[c].upload(request, np.ones(10)) for c in range(3)}
        uploads = {0: good[0], 1: good[2], 2: good[2][:-1]}  # 1 replays 2's bytes, 2 truncated
        outcome = s.server.finish(s.key_holder.decrypt(s.server.forward(uploads)))
        assert outcome.included == {0}
        assert [type(e) for _, _, e in s.server.rejections] == [IntegrityError,
                                                                MalformedMessageError]


def _messages(keypair) -> dict[str, tuple[bytes, callable]]:
    """Each genuine message with its decoder and the role that consumes it."""
    from protocols.paillier.messages import (
        Ciphertexts,
        ClientKey,
        Offer,
        PublicKeyMessage,
        StepRequest,
        UploadBundle,
    )

    s = _session(2, 30, keypair)
    request = s.server.open_step()
    upload = s.clients[0].upload(request, np.ones(30))
    bundle = s.server.forward({0: upload, 1: s.clients[1].upload(request, np.ones(30))})
    plain = s.key_holder.decrypt(bundle)
    codec = s.codec

    def holder():
        return PaillierKeyHolder(keypair, n_clients=2, vector_length=30, codec=codec,
                                 unsafe_small_keys=True)

    def serve(b):
        return PaillierServer(b, n_clients=2, vector_length=30, codec=codec,
                              unsafe_small_keys=True)

    return {
        "key": (s.key_holder.announce(), PublicKeyMessage.decode, serve),
        "offer": (s.server.offer(1), Offer.decode,
                  lambda b: PaillierClient(1, b, unsafe_small_keys=True)),
        "request": (request, StepRequest.decode,
                    lambda b: _session(2, 30, keypair).clients[0].upload(b, np.ones(30))),
        "client key": (s.clients[1].enrollment(), ClientKey.decode, lambda b: holder().enroll(b)),
        "upload": (upload, lambda b: Ciphertexts.decode(b, Ciphertexts.UPLOAD),
                   lambda b: s.server.forward({0: b})),
        "bundle": (bundle, UploadBundle.decode, lambda b: holder().decrypt(b)),
        "plain": (plain, lambda b: Ciphertexts.decode(b, Ciphertexts.PLAINTEXT),
                  lambda b: s.server.finish(b)),
    }


def test_malformed_messages_raise_protocol_errors_only(keypair512):
    """Decoders and the roles behind them: random truncations, bit flips and garbage."""
    rng = np.random.default_rng(11)
    for name, (data, decode, consume) in _messages(keypair512).items():
        decode(data)  # the genuine message decodes
        mutants = [data[:cut] for cut in (0, 5, 6, 7, len(data) // 2, len(data) - 1)]
        mutants += [data + b"\x00", b"\x00" * len(data), "text", None]
        for _ in range(30):
            flipped = bytearray(data)
            flipped[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
            mutants.append(bytes(flipped))
        for _ in range(8):
            mutants.append(rng.bytes(int(rng.integers(0, 2 * len(data)))))
        for fn in (decode, consume):
            for mutant in mutants:
                try:
                    fn(mutant)
                except ProtocolError:
                    pass
                except Exception as error:
                    pytest.fail(f"{name}: {type(error).__name__} on malformed bytes: {error}")


def test_roles_refuse_malformed_bytes_with_protocol_errors(keypair512):
    msgs = _messages(keypair512)
    s = _session(2, 30, keypair512)
    request = s.server.open_step()
    for bad in (b"", msgs["upload"][0][:-3], msgs["bundle"][0], msgs["request"][0]):
        with pytest.raises(ProtocolError):
            s.clients[0].upload(bad, np.ones(30))
    for bad in (b"", msgs["bundle"][0], msgs["upload"][0]):
        with pytest.raises(ProtocolError):
            s.key_holder.decrypt(bad)  # another session's uploads, or not a bundle
    with pytest.raises(ProtocolError):
        s.key_holder.enroll(msgs["client key"][0])  # a key for another session
    s.server.forward({0: s.clients[0].upload(request, np.ones(30))})
    for bad in (b"", msgs["plain"][0]):
        with pytest.raises(ProtocolError):
            s.server.finish(bad)


def test_parallel_encryption_decrypts_correctly(keypair512):
    public, private = keypair512
    encryptor = ParallelEncryptor(2, min_ciphertexts=2, min_key_bits=0)
    try:
        plaintexts = list(range(1000, 1013))
        ciphertexts = encryptor.encrypt(public.n, plaintexts)
        assert [private.raw_decrypt(c) for c in ciphertexts] == plaintexts
        assert len(set(ciphertexts)) == len(ciphertexts)
        again = encryptor.encrypt(public.n, plaintexts)  # fresh r: new ciphertexts
        assert not set(again) & set(ciphertexts)
    finally:
        encryptor.close()


@pytest.mark.slow
def test_2048_bit_session_end_to_end():
    keypair = generate_keypair(2048)
    n, m = 3, 1000
    x = np.random.default_rng(9).uniform(-1, 1, (n, m))
    with PaillierSession(n, m, clip=1.0, keypair=keypair, workers=1) as s:
        assert s.layout.slots >= 50  # the packing gain the benchmark relies on
        out = s.step({c: x[c] for c in range(n)})
        assert np.abs(out.total - x.sum(0)).max() <= s.codec.error_bound(n)
        assert s.traffic.bytes_up[0] < 10 * m  # < 10 bytes per value (vs 512 unpacked)
