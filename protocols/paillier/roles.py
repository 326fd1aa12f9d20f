"""The three Paillier roles (client, server, key holder), their keys and their arithmetic.

Roles exchange bytes only (protocols.paillier.messages). The server holds the public key and
never the private key. The key holder decrypts only products it computes itself, of uploads each
tagged by its client under a key the two agreed at setup (X25519 + HKDF), so a server cannot make
it decrypt anything but a step's sum over at least its quorum of clients. It does receive every
upload: it is trusted to run these checks (docs/paillier.md).
Values are the session's fixed-point integers (one precision, no per-value exponents), packed
many per plaintext (protocols.paillier.packing). Keys come from `phe`; the arithmetic uses
gmpy2.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import multiprocessing
import os
import secrets
import struct
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction
from typing import cast

import numpy as np
from phe.paillier import PaillierPrivateKey, PaillierPublicKey, generate_paillier_keypair

from ..codec import FixedPointCodec, Rounding
from ..errors import (
    IntegrityError,
    MalformedMessageError,
    OverflowBudgetError,
    ParameterError,
    ProtocolError,
    ReplayError,
    StageError,
    TooFewSurvivorsError,
)
from ..inputs import check_count
from ..limits import MAX_KEY_BITS, OfferLimits
from ..primitives.kdf import DOMAIN, agree, derive_key, encode_info
from ..primitives.kdf import generate_keypair as generate_auth_keypair
from ..session import StepOutcome
from .limits import (
    check_offer,
    client_sizes,
    key_holder_sizes,
    offer_sizes,
    residue_width,
    sum_sizes,
    upload_sizes,
)
from .messages import (
    SESSION_ID_BYTES,
    Ciphertexts,
    ClientKey,
    Offer,
    PublicKeyMessage,
    StepRequest,
    UploadBundle,
)
from .packing import SlotLayout, pack, unpack_sum

try:
    from gmpy2 import mpz as _big
    from gmpy2 import powmod as _powmod
except ImportError:  # pragma: no cover - gmpy2 is a dependency; plain ints if it will not load
    _big, _powmod = int, pow

__all__ = [
    "DEFAULT_KEY_BITS", "MIN_KEY_BITS", "PaillierClient", "PaillierKeyHolder", "PaillierServer",
    "ParallelEncryptor", "check_key_bits", "generate_keypair", "raw_decrypt", "raw_encrypt",
    "raw_multiply", "session_codec", "session_layout", "unsafe_keypair_from_primes", "upload_key",
    "upload_tag",
]

MIN_KEY_BITS, DEFAULT_KEY_BITS = 2048, 3072
UNSAFE_MIN_KEY_BITS = 64  # below this not even one slot fits; only tests go under 2048
Keypair = tuple[PaillierPublicKey, PaillierPrivateKey]
Noise = Callable[[int, int, int], np.ndarray]


# ---- keys and raw arithmetic ------------------------------------------------------------------

def check_key_bits(bits: int, *, unsafe_small_keys: bool = False) -> None:
    """Refuse moduli under 2048 bits (under 64 with unsafe_small_keys, for tests only) and
    over MAX_KEY_BITS (8192: no message carries their ciphertexts)."""
    floor = UNSAFE_MIN_KEY_BITS if unsafe_small_keys else MIN_KEY_BITS
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < floor:
        raise ParameterError(
            f"Paillier keys must have at least {MIN_KEY_BITS} bits, got {bits!r}"
            + ("" if unsafe_small_keys else " (tests may pass unsafe_small_keys=True)")
        )
    if bits > MAX_KEY_BITS:
        raise ParameterError(f"Paillier keys must have at most {MAX_KEY_BITS} bits (what a "
                             f"message carries), got {bits}")


def generate_keypair(key_bits: int = DEFAULT_KEY_BITS, *,
                     unsafe_small_keys: bool = False) -> Keypair:
    """A fresh Paillier keypair with a key_bits-bit modulus (up to seconds at 3072 bits)."""
    check_key_bits(key_bits, unsafe_small_keys=unsafe_small_keys)
    if key_bits % 2:  # phe draws primes of key_bits // 2 bits until N has key_bits: never
        raise ParameterError(f"Paillier key_bits must be even, got {key_bits}")
    return cast(Keypair, generate_paillier_keypair(n_length=key_bits))  # phe is untyped


def unsafe_keypair_from_primes(p: int, q: int) -> Keypair:
    """The keypair of N = p q for fixed primes: regression vectors and tests only."""
    public = PaillierPublicKey(p * q)
    return public, PaillierPrivateKey(public, p, q)


def raw_encrypt(modulus: int, plaintext: int, r: int) -> int:
    """(1 + N m) r^N mod N^2: textbook Paillier with g = N + 1 and an explicit r."""
    n = _big(modulus)
    nsq = n * n
    return int((1 + n * plaintext) * _powmod(_big(r), n, nsq) % nsq)


def raw_multiply(modulus: int, uploads: Sequence[Sequence[int]]) -> list[int]:
    """Coordinate-wise product of ciphertext lists mod N^2 (adds the plaintexts); no checks."""
    nsq = _big(modulus) ** 2
    products = [_big(c) for c in uploads[0]]
    for values in uploads[1:]:
        products = [p * c % nsq for p, c in zip(products, values, strict=True)]
    return [int(p) for p in products]


def raw_decrypt(private: PaillierPrivateKey, ciphertexts: Sequence[int]) -> list[int]:
    """Plaintexts of any ciphertexts, with no session, quorum or tag check: the unchecked step
    that PaillierKeyHolder.decrypt wraps. Call it directly in tests and audits only."""
    return [private.raw_decrypt(c) for c in ciphertexts]


def _encrypt_chunk(modulus: int, plaintexts: Sequence[int]) -> list[int]:
    # a fresh uniform r in [1, N) per ciphertext; gcd(r, N) > 1 has probability about
    # (p + q) / N, below 2^-1000 at 2048 bits
    return [raw_encrypt(modulus, m, secrets.randbelow(modulus - 1) + 1) for m in plaintexts]


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class ParallelEncryptor:
    """Encrypts plaintext lists, over a process pool when the job is large enough to pay for it."""

    def __init__(self, workers: int | None = None, *, min_ciphertexts: int = 8,
                 min_key_bits: int = 1024) -> None:
        self.workers = available_cores() if workers is None else int(workers)
        if self.workers < 1:
            raise ParameterError(f"workers must be >= 1, got {workers!r}")
        self.min_ciphertexts, self.min_key_bits = min_ciphertexts, min_key_bits
        self._pool: ProcessPoolExecutor | None = None

    def encrypt(self, modulus: int, plaintexts: Sequence[int]) -> list[int]:
        """One fresh-r ciphertext per plaintext, in order."""
        small = (len(plaintexts) < max(self.min_ciphertexts, 2)
                 or modulus.bit_length() < self.min_key_bits)
        if self.workers == 1 or small:
            return _encrypt_chunk(modulus, plaintexts)
        if self._pool is None:
            # forkserver: workers never inherit the parent's threads or its secrets
            context = multiprocessing.get_context("forkserver")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context)
            weakref.finalize(self, self._pool.shutdown)
        size = -(-len(plaintexts) // self.workers)
        chunks = [list(plaintexts[i : i + size]) for i in range(0, len(plaintexts), size)]
        try:
            parts = list(self._pool.map(_encrypt_chunk, [modulus] * len(chunks), chunks))
        except BrokenProcessPool:
            # e.g. a __main__ the workers cannot re-import (stdin, some notebooks): go serial
            warnings.warn("Paillier encryption workers failed to start; encrypting in one "
                          "process", RuntimeWarning, stacklevel=2)
            self.close()
            self.workers = 1
            return _encrypt_chunk(modulus, plaintexts)
        return [c for part in parts for c in part]

    def close(self) -> None:
        """Stop the worker processes (a later encrypt starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


# ---- parameters shared by all roles ------------------------------------------------------------

def _ring_fits(n: int, clip: float, scale_bits: int, ring_bits: int, noise_bound: int) -> bool:
    per_client = math.ceil(Fraction(clip) * (1 << scale_bits)) + 1 + noise_bound
    return n * per_client <= (1 << (ring_bits - 1)) - 1


def session_codec(n_clients: int, *, clip: float, ring_bits: int = 32,
                  scale_bits: int | None = None, rounding: str = "stochastic",
                  noise_bound: int = 0) -> FixedPointCodec:
    """The session's one precision: the ring must hold n clipped inputs plus n noise bounds.

    The ring is the one SecAgg uses, so the two paths decode alike and `ring_total` matches;
    it is not the Paillier plaintext space (slots are sized separately, see SlotLayout).
    """
    mode = cast(Rounding, rounding)  # FixedPointCodec rejects any other string
    codec = FixedPointCodec.for_clients(n_clients, clip=clip, ring_bits=ring_bits,
                                        scale_bits=scale_bits, rounding=mode)
    f = codec.scale_bits
    while scale_bits is None and f > 0 and not _ring_fits(n_clients, clip, f, ring_bits,
                                                          noise_bound):
        f -= 1
    if not _ring_fits(n_clients, codec.clip, f, ring_bits, noise_bound):
        raise OverflowBudgetError(
            f"{n_clients} clients' inputs (clip={clip}, scale_bits={f}) plus noise of up to "
            f"{noise_bound} units each can exceed the {ring_bits}-bit ring; lower scale_bits or "
            "noise_bound"
        )
    return FixedPointCodec(clip=codec.clip, scale_bits=f, ring_bits=ring_bits, rounding=mode)


def session_layout(codec: FixedPointCodec, n_clients: int, modulus: int, *, noise_bound: int,
                   guard_bits: int = 1) -> SlotLayout:
    """Slots for values |q + e| <= ceil(clip 2^f) + noise_bound, summed over n clients."""
    if not _ring_fits(n_clients, codec.clip, codec.scale_bits, codec.ring_bits, noise_bound):
        raise OverflowBudgetError("the ring cannot hold n inputs plus their noise")
    bound = math.ceil(Fraction(codec.clip) * (1 << codec.scale_bits)) + noise_bound
    return SlotLayout.for_modulus(modulus, value_bound=bound, max_summands=n_clients,
                                  guard_bits=guard_bits)


def _check_residues(values: Sequence[int], bound: int) -> None:
    if any(not 0 < v < bound for v in values):
        raise MalformedMessageError("a ciphertext lies outside (0, N^2)")


# ---- upload authentication ----------------------------------------------------------------------

def upload_key(shared_secret: bytes, *, session_id: bytes, client_id: int, client_key: bytes,
               holder_key: bytes) -> bytes:
    """The key a client and the key holder tag that client's uploads with, from their X25519
    secret; bound to the session, the client and both public keys."""
    return derive_key(shared_secret, session_id=session_id, purpose="paillier-upload-tag-key",
                      context=(client_id, client_key, holder_key))


def upload_tag(key: bytes, *, session_id: bytes, step: int, client_id: int, width: int,
               values: Sequence[int]) -> bytes:
    """HMAC-SHA256 over (session, step, client, SHA-256 of the fixed-width ciphertexts)."""
    digest = hashlib.sha256(struct.pack(">II", width, len(values)))
    for v in values:
        digest.update(int(v).to_bytes(width, "big"))
    info = encode_info(DOMAIN, "paillier-upload-tag", session_id, step, client_id,
                       digest.digest())
    return hmac.new(key, info, hashlib.sha256).digest()


# ---- roles ------------------------------------------------------------------------------------

class PaillierKeyHolder:
    """The decryptor: holds the private key and decrypts, at most once per step, only a product
    it computes itself from at least `quorum` uploads, each tagged by its client.

    `n_clients`, `vector_length`, `codec`, `noise_bound` and `guard_bits` are the session's
    parameters, given to it by the deployment as to the server: it checks every upload against
    the layout they fix. Each client enrolls at setup with its X25519 public key (`enroll`).
    """

    def __init__(self, keypair: Keypair | None = None, *, n_clients: int, vector_length: int,
                 codec: FixedPointCodec, noise_bound: int = 0, guard_bits: int = 1,
                 key_bits: int = DEFAULT_KEY_BITS, unsafe_small_keys: bool = False,
                 quorum: int = 1) -> None:
        quorum = check_count("quorum", quorum)  # before a keypair that takes seconds to draw
        n_clients = check_count("the key holder's number of clients", n_clients, low=2)
        if quorum > n_clients:
            raise ParameterError(f"quorum must be at most the {n_clients} clients, got {quorum}")
        self.vector_length = check_count("vector_length", vector_length)
        public, private = keypair or generate_keypair(key_bits,
                                                      unsafe_small_keys=unsafe_small_keys)
        if (not isinstance(public, PaillierPublicKey) or not isinstance(private, PaillierPrivateKey)
                or private.public_key.n != public.n):
            raise ParameterError("keypair must be a matching (PaillierPublicKey, "
                                 "PaillierPrivateKey) pair, e.g. from generate_keypair()")
        check_key_bits(public.n.bit_length(), unsafe_small_keys=unsafe_small_keys)
        self.layout = session_layout(codec, n_clients, public.n, noise_bound=noise_bound,
                                     guard_bits=guard_bits)
        self.session_id = os.urandom(SESSION_ID_BYTES)
        self._modulus, self._private = public.n, private
        self._auth_private, self.auth_key = generate_auth_keypair()
        self._upload_keys: dict[int, bytes] = {}  # client id -> the key its uploads are tagged with
        self.n_clients, self.quorum, self._last_step = n_clients, quorum, 0
        self._sizes = key_holder_sizes(n_clients=n_clients, modulus=public.n,
                                       ciphertexts=self.layout.plaintexts_for(self.vector_length))

    def announce(self) -> bytes:
        """The public key message for the server."""
        return PublicKeyMessage(self.session_id, self._modulus, self.auth_key).encode()

    def enroll(self, data: bytes) -> None:
        """Register one client's X25519 public key (setup: before the first decryption, once per
        client). The key holder trusts that it is that client's real key."""
        self._sizes.check(data, expected=ClientKey.TYPE)  # by its length, before decoding
        msg = ClientKey.decode(data)
        if msg.session_id != self.session_id:
            raise StageError("client key of another session")
        if self._last_step:
            raise StageError("clients enroll at setup, before the first decryption")
        if not 0 <= msg.client_id < self.n_clients:
            raise IntegrityError(f"unknown client {msg.client_id}: this session has clients "
                                 f"0..{self.n_clients - 1}")
        if msg.client_id in self._upload_keys:
            raise StageError(f"client {msg.client_id} has already enrolled")
        secret = agree(self._auth_private, msg.auth_key)
        self._upload_keys[msg.client_id] = upload_key(
            secret, session_id=self.session_id, client_id=msg.client_id,
            client_key=msg.auth_key, holder_key=self.auth_key)

    def _check_bundle(self, bundle: UploadBundle) -> None:
        """Every refusal happens here, before any arithmetic on the private key."""
        if bundle.session_id != self.session_id:
            raise StageError("uploads of another session")
        if bundle.step <= self._last_step:
            raise ReplayError(f"step {bundle.step} comes after step {self._last_step} was "
                              "decrypted")
        for cid in sorted(bundle.members):  # distinct: the decoder refuses a repeated client
            if cid not in self._upload_keys:
                raise IntegrityError(f"unknown client {cid}: no enrolled key")
        if len(bundle.members) < self.quorum:
            raise TooFewSurvivorsError(needed=self.quorum, remaining=len(bundle.members),
                                       context=f"key holder, step {bundle.step}")
        count, width = self.layout.plaintexts_for(self.vector_length), residue_width(self._modulus)
        for upload in bundle.uploads:
            cid = upload.sender
            if upload.session_id != self.session_id or upload.step != bundle.step:
                raise ReplayError(f"client {cid}'s upload is of another session or step "
                                  f"({upload.step}), not step {bundle.step}")
            # exactly one aggregate's worth: a longer list could carry several clients' uploads
            if upload.width != width or len(upload.values) != count:
                raise MalformedMessageError(f"client {cid}'s upload must hold {count} "
                                            f"ciphertexts of {width} bytes")
            _check_residues(upload.values, self._modulus**2)
            expected = upload_tag(self._upload_keys[cid], session_id=self.session_id,
                                  step=bundle.step, client_id=cid, width=width,
                                  values=upload.values)
            if not hmac.compare_digest(expected, upload.tag):
                raise IntegrityError(f"client {cid}'s upload fails its tag: forged or altered")

    def decrypt(self, data: bytes) -> bytes:
        """Plaintexts of the product of a step's uploads, after every check in _check_bundle.

        Steps only move forward, so no step is decrypted twice. A refused bundle decrypts
        nothing and leaves its step open: every member must be an enrolled client whose tag
        binds this session and step, so a retry cannot pad or replay members.
        """
        self._sizes.check(data, expected=UploadBundle.TYPE)  # by its length, before decoding
        bundle = UploadBundle.decode(data)
        self._check_bundle(bundle)
        product = raw_multiply(self._modulus, [u.values for u in bundle.uploads])
        self._last_step = bundle.step
        plain = raw_decrypt(self._private, product)
        return Ciphertexts(self.session_id, bundle.step, Ciphertexts.PLAINTEXT, bundle.members,
                           -(-self._modulus.bit_length() // 8), tuple(plain)).encode()


class PaillierServer:
    """The relay: checks uploads, forwards them to the key holder (which multiplies them), and
    unpacks the sum it gets back, knowing only the public key.

    A reply that fails to decode or validate excludes its sender, as a dropout would; the reason
    is kept in `rejections`. The server cannot check tags: the key holder does. It forwards no
    step with fewer valid uploads than the key holder's `quorum`.
    """

    def __init__(self, announcement: bytes, *, n_clients: int, vector_length: int,
                 codec: FixedPointCodec, noise_bound: int = 0, guard_bits: int = 1,
                 unsafe_small_keys: bool = False, quorum: int = 1) -> None:
        n_clients = check_count("the server's number of clients", n_clients, low=2)
        self.quorum = check_count("quorum", quorum)
        offer_sizes().check(announcement, expected=PublicKeyMessage.TYPE)  # before decoding
        key = PublicKeyMessage.decode(announcement)
        check_key_bits(key.modulus.bit_length(), unsafe_small_keys=unsafe_small_keys)
        self.session_id, self.modulus, self.holder_key = key.session_id, key.modulus, key.auth_key
        self.n_clients, self.vector_length, self.codec = n_clients, vector_length, codec
        self.noise_bound, self.guard_bits = noise_bound, guard_bits
        self.layout = session_layout(codec, n_clients, key.modulus, noise_bound=noise_bound,
                                     guard_bits=guard_bits)
        count = self.layout.plaintexts_for(check_count("vector_length", vector_length))
        self._upload_sizes = upload_sizes(modulus=key.modulus, ciphertexts=count)
        self._sum_sizes = sum_sizes(n_clients=n_clients, modulus=key.modulus, ciphertexts=count)
        self.last_step = 0
        self.rejections: list[tuple[int, int, ProtocolError]] = []  # (step, client, error)
        self._sent: UploadBundle | None = None  # the uploads awaiting decryption

    def offer(self, client_id: int) -> bytes:
        """The session parameters and public key for one client."""
        c = self.codec
        return Offer(self.session_id, client_id, self.n_clients, self.vector_length, c.clip,
                     c.scale_bits, c.ring_bits, c.rounding, self.noise_bound, self.guard_bits,
                     self.modulus, self.holder_key).encode()

    def open_step(self) -> bytes:
        """The request for the next step's uploads."""
        self._sent = None  # an unfinished step is abandoned
        self.last_step += 1
        return StepRequest(self.session_id, self.last_step).encode()

    def _check_upload(self, cid: int, data: bytes) -> Ciphertexts:
        if not 0 <= cid < self.n_clients:
            raise IntegrityError(f"an upload from {cid!r}, not a client of this session")
        self._upload_sizes.check(data, expected=Ciphertexts.TYPE)  # by its length, unread
        msg = Ciphertexts.decode(data, Ciphertexts.UPLOAD)
        if msg.session_id != self.session_id or msg.step != self.last_step:
            raise StageError(f"upload for another session or step (step {msg.step})")
        if msg.members != {cid}:
            raise IntegrityError(f"client {cid} sent an upload signed as {sorted(msg.members)}")
        count = self.layout.plaintexts_for(self.vector_length)
        if msg.width != residue_width(self.modulus) or len(msg.values) != count:
            raise MalformedMessageError(f"an upload must hold {count} ciphertexts")
        _check_residues(msg.values, self.modulus**2)
        return msg

    def forward(self, uploads: Mapping[int, bytes]) -> bytes:
        """The valid uploads, as their clients sent them, for the key holder to multiply."""
        valid = {}
        for cid, data in sorted(uploads.items()):
            try:
                valid[cid] = self._check_upload(cid, data)
            except ProtocolError as error:
                self.rejections.append((self.last_step, cid, error))
        if len(valid) < self.quorum:  # the key holder would refuse the bundle
            raise TooFewSurvivorsError(needed=self.quorum, remaining=len(valid),
                                       context=f"server, step {self.last_step}")
        self._sent = UploadBundle(self.session_id, self.last_step, tuple(valid.values()))
        return self._sent.encode()

    def finish(self, data: bytes) -> StepOutcome:
        """Unpack the key holder's plaintexts into the step's outcome."""
        sent = self._sent
        if sent is None:
            raise StageError("no uploads await decryption")
        self._sum_sizes.check(data, expected=Ciphertexts.TYPE)  # by its length, before decoding
        msg = Ciphertexts.decode(data, Ciphertexts.PLAINTEXT)
        if (msg.session_id, msg.step, msg.members) != (sent.session_id, sent.step, sent.members):
            raise StageError("the decrypted sum is not the one of the uploads that were sent")
        if any(v >= self.modulus for v in msg.values):
            raise MalformedMessageError("a plaintext lies outside [0, N)")
        sums = unpack_sum(self.layout, msg.values, length=self.vector_length,
                          n_summed=len(msg.members))
        self._sent = None
        ring_total = (sums.view(np.uint64) & np.uint64(self.codec.mask)).astype(self.codec.dtype)
        total = np.multiply(sums, math.ldexp(1.0, -self.codec.scale_bits))
        everyone = frozenset(range(self.n_clients))
        return StepOutcome(msg.step, total, ring_total, msg.members, everyone - msg.members)


class PaillierClient:
    """Encodes, noises (optionally), packs, encrypts and tags one vector per step.

    At setup it draws an X25519 key and agrees a tag key with the key holder's (from the offer);
    `enrollment()` is the message that gives the key holder its public half.
    """

    def __init__(self, client_id: int, offer: bytes, *, rounding_seed: bytes | None = None,
                 noise: Noise | None = None, encryptor: ParallelEncryptor | None = None,
                 unsafe_small_keys: bool = False, limits: OfferLimits | None = None) -> None:
        """An offer outside `limits` (default OfferLimits()) is refused before it is used."""
        limits = limits or OfferLimits()
        offer_sizes().check(offer, expected=Offer.TYPE)  # by its length, before decoding
        msg = Offer.decode(offer)
        if msg.client_id != client_id:
            raise IntegrityError(f"offer addressed to client {msg.client_id}, not {client_id}")
        check_offer(limits, msg)
        check_key_bits(msg.modulus.bit_length(), unsafe_small_keys=unsafe_small_keys)
        self.client_id, self.offer = client_id, msg
        self.codec = FixedPointCodec(clip=msg.clip, scale_bits=msg.scale_bits,
                                     ring_bits=msg.ring_bits,
                                     rounding=cast(Rounding, msg.rounding))  # codec checks it
        self.layout = session_layout(self.codec, msg.n_clients, msg.modulus,
                                     noise_bound=msg.noise_bound, guard_bits=msg.guard_bits)
        self._rounding_seed, self._noise = rounding_seed, noise
        self._encryptor = encryptor or ParallelEncryptor(1)
        self._last_step = 0
        auth_private, self.auth_key = generate_auth_keypair()
        self._upload_key = upload_key(
            agree(auth_private, msg.auth_key), session_id=msg.session_id, client_id=client_id,
            client_key=self.auth_key, holder_key=msg.auth_key)

    def enrollment(self) -> bytes:
        """The client's X25519 public key for the key holder (relayed at setup)."""
        return ClientKey(self.offer.session_id, self.client_id, self.auth_key).encode()

    def _noise_for(self, step: int) -> np.ndarray:
        m, bound = self.offer.vector_length, self.offer.noise_bound
        assert self._noise is not None  # the caller draws noise only when it was given
        noise = np.asarray(self._noise(self.client_id, step, m))
        if noise.shape != (m,) or noise.dtype.kind not in "iu":
            raise ParameterError(f"noise must be an integer vector of length {m}")
        noise = noise.astype(np.int64)
        if noise.size and int(np.abs(noise).max()) > bound:
            raise OverflowBudgetError(f"noise exceeds the declared noise_bound {bound}")
        return noise

    def upload(self, request: bytes, vector: np.ndarray) -> bytes:
        """The encrypted, packed upload for the requested step."""
        client_sizes().check(request, expected=StepRequest.TYPE)  # by its length, unread
        req = StepRequest.decode(request)
        if req.session_id != self.offer.session_id:
            raise StageError("step request of another session")
        if req.step <= self._last_step:
            raise ReplayError(f"step {req.step} was requested after step {self._last_step}")
        vector = np.asarray(vector)
        if vector.size != self.offer.vector_length:
            raise ParameterError(f"input has {vector.size} values, the session expects "
                                 f"{self.offer.vector_length}")
        key = None if self._rounding_seed is None else derive_key(
            self._rounding_seed, session_id=b"rounding", purpose="stochastic-rounding",
            context=(req.step,))
        encoded = self.codec.encode(vector.reshape(-1), rounding_key=key)
        values = self.codec.signed(encoded).astype(np.int64)
        if self._noise is not None:
            values += self._noise_for(req.step)
        ciphertexts = self._encryptor.encrypt(self.offer.modulus, pack(self.layout, values))
        self._last_step = req.step
        width = residue_width(self.offer.modulus)
        tag = upload_tag(self._upload_key, session_id=req.session_id, step=req.step,
                         client_id=self.client_id, width=width, values=ciphertexts)
        return Ciphertexts(req.session_id, req.step, Ciphertexts.UPLOAD,
                           frozenset({self.client_id}), width, tuple(ciphertexts), tag).encode()
