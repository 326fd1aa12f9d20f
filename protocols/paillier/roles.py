"""The three Paillier roles (client, server, key holder), their keys and their arithmetic.

Roles exchange bytes only (protocols.paillier_messages). The server holds the public key and
never the private key; the key holder sees only aggregate ciphertexts and returns their
plaintexts, so it learns each step's sum (and nothing else unless it colludes with the server).
Values are the session's fixed-point integers (one precision, no per-value exponents), packed
many per plaintext (protocols.paillier_packing). Keys come from `phe`; the arithmetic uses gmpy2
when it is installed.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import secrets
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction

import numpy as np
from phe.paillier import PaillierPrivateKey, PaillierPublicKey, generate_paillier_keypair

from ..codec import FixedPointCodec
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
from ..primitives.kdf import derive_key
from ..session import StepOutcome
from .messages import SESSION_ID_BYTES, Ciphertexts, Offer, PublicKeyMessage, StepRequest
from .packing import SlotLayout, pack, unpack_sum

try:
    from gmpy2 import mpz as _big
    from gmpy2 import powmod as _powmod
except ImportError:  # pragma: no cover - gmpy2 is the `fast` extra
    _big, _powmod = int, pow

__all__ = [
    "DEFAULT_KEY_BITS", "MIN_KEY_BITS", "PaillierClient", "PaillierKeyHolder", "PaillierServer",
    "ParallelEncryptor", "check_key_bits", "generate_keypair", "raw_encrypt", "session_codec",
    "session_layout", "unsafe_keypair_from_primes",
]

MIN_KEY_BITS, DEFAULT_KEY_BITS = 2048, 3072
UNSAFE_MIN_KEY_BITS = 64  # below this not even one slot fits; only tests go under 2048
Keypair = tuple[PaillierPublicKey, PaillierPrivateKey]
Noise = Callable[[int, int, int], np.ndarray]


# ---- keys and raw arithmetic ------------------------------------------------------------------

def check_key_bits(bits: int, *, unsafe_small_keys: bool = False) -> None:
    """Refuse moduli under 2048 bits (under 64 with unsafe_small_keys, for tests only)."""
    floor = UNSAFE_MIN_KEY_BITS if unsafe_small_keys else MIN_KEY_BITS
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < floor:
        raise ParameterError(
            f"Paillier keys must have at least {MIN_KEY_BITS} bits, got {bits!r}"
            + ("" if unsafe_small_keys else " (tests may pass unsafe_small_keys=True)")
        )


def generate_keypair(key_bits: int = DEFAULT_KEY_BITS, *,
                     unsafe_small_keys: bool = False) -> Keypair:
    """A fresh Paillier keypair with a key_bits-bit modulus (up to seconds at 3072 bits)."""
    check_key_bits(key_bits, unsafe_small_keys=unsafe_small_keys)
    if key_bits % 2:  # phe draws primes of key_bits // 2 bits until N has key_bits: never
        raise ParameterError(f"Paillier key_bits must be even, got {key_bits}")
    return generate_paillier_keypair(n_length=key_bits)


def unsafe_keypair_from_primes(p: int, q: int) -> Keypair:
    """The keypair of N = p q for fixed primes: regression vectors and tests only."""
    public = PaillierPublicKey(p * q)
    return public, PaillierPrivateKey(public, p, q)


def raw_encrypt(modulus: int, plaintext: int, r: int) -> int:
    """(1 + N m) r^N mod N^2: textbook Paillier with g = N + 1 and an explicit r."""
    n = _big(modulus)
    nsq = n * n
    return int((1 + n * plaintext) * _powmod(_big(r), n, nsq) % nsq)


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
    codec = FixedPointCodec.for_clients(n_clients, clip=clip, ring_bits=ring_bits,
                                        scale_bits=scale_bits, rounding=rounding)
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
    return FixedPointCodec(clip=codec.clip, scale_bits=f, ring_bits=ring_bits, rounding=rounding)


def session_layout(codec: FixedPointCodec, n_clients: int, modulus: int, *, noise_bound: int,
                   guard_bits: int = 1) -> SlotLayout:
    """Slots for values |q + e| <= ceil(clip 2^f) + noise_bound, summed over n clients."""
    if not _ring_fits(n_clients, codec.clip, codec.scale_bits, codec.ring_bits, noise_bound):
        raise OverflowBudgetError("the ring cannot hold n inputs plus their noise")
    bound = math.ceil(Fraction(codec.clip) * (1 << codec.scale_bits)) + noise_bound
    return SlotLayout.for_modulus(modulus, value_bound=bound, max_summands=n_clients,
                                  guard_bits=guard_bits)


def _signed(codec: FixedPointCodec, ring: np.ndarray) -> np.ndarray:
    """Two's complement reading of ring elements, as int64."""
    k = codec.ring_bits
    values = ring.view(np.int64) if k == 64 else ring.astype(np.int64)
    if k < 64:
        values = np.where(values >= 1 << (k - 1), values - (1 << k), values)
    return values


def _width(modulus: int) -> int:
    return -(-(2 * modulus.bit_length()) // 8)  # bytes of any residue mod N^2


def _check_residues(values: Sequence[int], bound: int) -> None:
    if any(not 0 < v < bound for v in values):
        raise MalformedMessageError("a ciphertext lies outside (0, N^2)")


# ---- roles ------------------------------------------------------------------------------------

class PaillierKeyHolder:
    """The decryptor: holds the private key and decrypts aggregates only, once per step, and
    only of at least `quorum` clients (a sum of fewer may carry too little DP noise)."""

    def __init__(self, keypair: Keypair | None = None, *, key_bits: int = DEFAULT_KEY_BITS,
                 unsafe_small_keys: bool = False, quorum: int = 1) -> None:
        quorum = check_count("quorum", quorum)  # before a keypair that takes seconds to draw
        public, private = keypair or generate_keypair(key_bits,
                                                      unsafe_small_keys=unsafe_small_keys)
        if (not isinstance(public, PaillierPublicKey) or not isinstance(private, PaillierPrivateKey)
                or private.public_key.n != public.n):
            raise ParameterError("keypair must be a matching (PaillierPublicKey, "
                                 "PaillierPrivateKey) pair, e.g. from generate_keypair()")
        check_key_bits(public.n.bit_length(), unsafe_small_keys=unsafe_small_keys)
        self.session_id = os.urandom(SESSION_ID_BYTES)
        self._modulus, self._private = public.n, private
        self._last_step, self.quorum = 0, quorum

    def announce(self) -> bytes:
        """The public key message for the server."""
        return PublicKeyMessage(self.session_id, self._modulus).encode()

    def decrypt(self, data: bytes) -> bytes:
        """Plaintexts of an aggregate; steps only move forward, so no step is decrypted twice."""
        msg = Ciphertexts.decode(data, Ciphertexts.AGGREGATE)
        if msg.session_id != self.session_id:
            raise StageError("aggregate of another session")
        if msg.step <= self._last_step:
            raise ReplayError(f"step {msg.step} comes after step {self._last_step} was decrypted")
        if msg.width != _width(self._modulus):
            raise MalformedMessageError(f"ciphertexts must be {_width(self._modulus)} bytes")
        _check_residues(msg.values, self._modulus**2)
        self._last_step = msg.step  # a refused step stays spent: no retry with padded members
        if len(msg.members) < self.quorum:
            raise TooFewSurvivorsError(needed=self.quorum, remaining=len(msg.members),
                                       context=f"key holder, step {msg.step}")
        plain = tuple(self._private.raw_decrypt(c) for c in msg.values)
        return Ciphertexts(self.session_id, msg.step, Ciphertexts.PLAINTEXT, msg.members,
                           -(-self._modulus.bit_length() // 8), plain).encode()


class PaillierServer:
    """The aggregator: multiplies ciphertexts (adds plaintexts), knowing only the public key.

    A reply that fails to decode or validate excludes its sender, as a dropout would; the reason
    is kept in `rejections`.
    """

    def __init__(self, announcement: bytes, *, n_clients: int, vector_length: int,
                 codec: FixedPointCodec, noise_bound: int = 0, guard_bits: int = 1,
                 unsafe_small_keys: bool = False) -> None:
        key = PublicKeyMessage.decode(announcement)
        check_key_bits(key.modulus.bit_length(), unsafe_small_keys=unsafe_small_keys)
        self.session_id, self.modulus = key.session_id, key.modulus
        self.n_clients, self.vector_length, self.codec = n_clients, vector_length, codec
        self.noise_bound, self.guard_bits = noise_bound, guard_bits
        self.layout = session_layout(codec, n_clients, key.modulus, noise_bound=noise_bound,
                                     guard_bits=guard_bits)
        self.last_step = 0
        self.rejections: list[tuple[int, int, ProtocolError]] = []  # (step, client, error)
        self._sent: Ciphertexts | None = None  # the aggregate awaiting decryption

    def offer(self, client_id: int) -> bytes:
        """The session parameters and public key for one client."""
        c = self.codec
        return Offer(self.session_id, client_id, self.n_clients, self.vector_length, c.clip,
                     c.scale_bits, c.ring_bits, c.rounding, self.noise_bound, self.guard_bits,
                     self.modulus).encode()

    def open_step(self) -> bytes:
        """The request for the next step's uploads."""
        self._sent = None  # an unfinished step is abandoned
        self.last_step += 1
        return StepRequest(self.session_id, self.last_step).encode()

    def _check_upload(self, cid: int, data: bytes) -> list[int]:
        msg = Ciphertexts.decode(data, Ciphertexts.UPLOAD)
        if msg.session_id != self.session_id or msg.step != self.last_step:
            raise StageError(f"upload for another session or step (step {msg.step})")
        if msg.members != {cid}:
            raise IntegrityError(f"client {cid} sent an upload signed as {sorted(msg.members)}")
        count = self.layout.plaintexts_for(self.vector_length)
        if msg.width != _width(self.modulus) or len(msg.values) != count:
            raise MalformedMessageError(f"an upload must hold {count} ciphertexts")
        _check_residues(msg.values, self.modulus**2)
        return list(msg.values)

    def aggregate(self, uploads: Mapping[int, bytes]) -> bytes:
        """The product of the valid uploads' ciphertexts, for the key holder."""
        valid = {}
        for cid, data in sorted(uploads.items()):
            try:
                valid[cid] = self._check_upload(cid, data)
            except ProtocolError as error:
                self.rejections.append((self.last_step, cid, error))
        if not valid:
            raise TooFewSurvivorsError(needed=1, remaining=0, context=f"step {self.last_step}")
        nsq = _big(self.modulus) ** 2
        uploads_left = iter(valid.values())
        products = [_big(c) for c in next(uploads_left)]
        for values in uploads_left:
            products = [p * c % nsq for p, c in zip(products, values, strict=True)]
        members = frozenset(valid)
        self._sent = Ciphertexts(self.session_id, self.last_step, Ciphertexts.AGGREGATE, members,
                                 _width(self.modulus), tuple(int(p) for p in products))
        return self._sent.encode()

    def finish(self, data: bytes) -> StepOutcome:
        """Unpack the key holder's plaintexts into the step's outcome."""
        sent = self._sent
        if sent is None:
            raise StageError("no aggregate awaits decryption")
        msg = Ciphertexts.decode(data, Ciphertexts.PLAINTEXT)
        if (msg.session_id, msg.step, msg.members) != (sent.session_id, sent.step, sent.members):
            raise StageError("the decrypted sum is not the aggregate that was sent")
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
    """Encodes, noises (optionally), packs and encrypts one vector per step."""

    def __init__(self, client_id: int, offer: bytes, *, rounding_seed: bytes | None = None,
                 noise: Noise | None = None, encryptor: ParallelEncryptor | None = None,
                 unsafe_small_keys: bool = False) -> None:
        msg = Offer.decode(offer)
        if msg.client_id != client_id:
            raise IntegrityError(f"offer addressed to client {msg.client_id}, not {client_id}")
        check_key_bits(msg.modulus.bit_length(), unsafe_small_keys=unsafe_small_keys)
        self.client_id, self.offer = client_id, msg
        self.codec = FixedPointCodec(clip=msg.clip, scale_bits=msg.scale_bits,
                                     ring_bits=msg.ring_bits, rounding=msg.rounding)
        self.layout = session_layout(self.codec, msg.n_clients, msg.modulus,
                                     noise_bound=msg.noise_bound, guard_bits=msg.guard_bits)
        self._rounding_seed, self._noise = rounding_seed, noise
        self._encryptor = encryptor or ParallelEncryptor(1)
        self._last_step = 0

    def _noise_for(self, step: int) -> np.ndarray:
        m, bound = self.offer.vector_length, self.offer.noise_bound
        noise = np.asarray(self._noise(self.client_id, step, m))
        if noise.shape != (m,) or noise.dtype.kind not in "iu":
            raise ParameterError(f"noise must be an integer vector of length {m}")
        noise = noise.astype(np.int64)
        if noise.size and int(np.abs(noise).max()) > bound:
            raise OverflowBudgetError(f"noise exceeds the declared noise_bound {bound}")
        return noise

    def upload(self, request: bytes, vector: np.ndarray) -> bytes:
        """The encrypted, packed upload for the requested step."""
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
        values = _signed(self.codec, self.codec.encode(vector.reshape(-1), rounding_key=key))
        if self._noise is not None:
            values += self._noise_for(req.step)
        ciphertexts = self._encryptor.encrypt(self.offer.modulus, pack(self.layout, values))
        self._last_step = req.step
        return Ciphertexts(req.session_id, req.step, Ciphertexts.UPLOAD,
                           frozenset({self.client_id}), _width(self.offer.modulus),
                           tuple(ciphertexts)).encode()
