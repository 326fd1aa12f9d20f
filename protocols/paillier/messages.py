"""Typed messages of the packed Paillier path: canonical bytes, strict decoding.

Big integers (the modulus, ciphertexts, plaintexts) travel as fixed-width big-endian fields; a
decoder checks framing and sizes, and the receiving role checks ranges against its key and
verifies upload tags.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..errors import MalformedMessageError
from ..limits import MAX_KEY_BITS
from ..wire import MAX_LIST, Reader, Writer

__all__ = ["Ciphertexts", "ClientKey", "Offer", "PublicKeyMessage", "StepRequest", "UploadBundle"]

SESSION_ID_BYTES = 16
AUTH_KEY_BYTES = 32  # a raw X25519 public key
TAG_BYTES = 32  # HMAC-SHA256
MAX_INT_BYTES = MAX_KEY_BITS // 4  # a residue mod N^2 of the largest modulus
ROUNDING_MODES = ("stochastic", "nearest")


def int_width(value: int) -> int:
    """Bytes of the big-endian form of a non-negative int."""
    return -(-value.bit_length() // 8)


def _write_ints(w: Writer, values: Sequence[int], width: int) -> Writer:
    w.u32(width).u32(len(values))
    for v in values:
        w.fixed(int(v).to_bytes(width, "big"), width)
    return w


def _read_ints(r: Reader) -> tuple[int, list[int]]:
    width, count = r.u32(), r.u32()
    if not 1 <= width <= MAX_INT_BYTES or count > MAX_LIST:
        raise MalformedMessageError(f"{count} integers of {width} bytes are out of bounds")
    blob = r.fixed(width * count)
    return width, [int.from_bytes(blob[i : i + width], "big") for i in range(0, len(blob), width)]


@dataclass(frozen=True)
class PublicKeyMessage:
    """Key holder -> server: the session id, the public modulus N and the key holder's X25519
    public key, with which each client derives the key that tags its uploads."""

    TYPE: ClassVar[int] = 0x41
    session_id: bytes
    modulus: int
    auth_key: bytes

    def encode(self) -> bytes:
        w = (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES)
             .fixed(self.auth_key, AUTH_KEY_BYTES))
        return _write_ints(w, [self.modulus], int_width(self.modulus)).finish()

    @classmethod
    def decode(cls, data: bytes) -> PublicKeyMessage:
        r = Reader(data, cls.TYPE)
        session_id, auth_key = r.fixed(SESSION_ID_BYTES), r.fixed(AUTH_KEY_BYTES)
        _, ints = _read_ints(r)
        r.done()
        if len(ints) != 1 or ints[0] % 2 == 0 or ints[0] < 3:
            raise MalformedMessageError("the public key must be one odd modulus")
        return cls(session_id, ints[0], auth_key)


@dataclass(frozen=True)
class Offer:
    """Server -> client: the public key, every parameter the packing depends on, and the key
    holder's X25519 public key (forwarded from its PublicKeyMessage)."""

    TYPE: ClassVar[int] = 0x42
    session_id: bytes
    client_id: int
    n_clients: int
    vector_length: int
    clip: float
    scale_bits: int
    ring_bits: int
    rounding: str
    noise_bound: int
    guard_bits: int
    modulus: int
    auth_key: bytes

    def encode(self) -> bytes:
        w = (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u32(self.client_id)
             .u32(self.n_clients).u64(self.vector_length).f64(self.clip).u8(self.scale_bits)
             .u8(self.ring_bits).u8(ROUNDING_MODES.index(self.rounding)).u64(self.noise_bound).u8(self.guard_bits))
        w.fixed(self.auth_key, AUTH_KEY_BYTES)
        return _write_ints(w, [self.modulus], int_width(self.modulus)).finish()

    @classmethod
    def decode(cls, data: bytes) -> Offer:
        r = Reader(data, cls.TYPE)
        head = (r.fixed(SESSION_ID_BYTES), r.u32(), r.u32(), r.u64(), r.f64(), r.u8(), r.u8())
        code, tail, auth_key = r.u8(), (r.u64(), r.u8()), r.fixed(AUTH_KEY_BYTES)
        _, ints = _read_ints(r)
        r.done()
        if code >= len(ROUNDING_MODES):
            raise MalformedMessageError(f"unknown rounding mode code {code}")
        if len(ints) != 1 or ints[0] % 2 == 0:
            raise MalformedMessageError("the offer must carry one odd modulus")
        if not math.isfinite(head[4]) or head[4] <= 0:
            raise MalformedMessageError(f"clip must be a positive finite number, got {head[4]}")
        return cls(*head, ROUNDING_MODES[code], *tail, ints[0], auth_key)


@dataclass(frozen=True)
class StepRequest:
    """Server -> client: send your encrypted input for `step`."""

    TYPE: ClassVar[int] = 0x43
    session_id: bytes
    step: int

    def encode(self) -> bytes:
        return Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u64(self.step).finish()

    @classmethod
    def decode(cls, data: bytes) -> StepRequest:
        r = Reader(data, cls.TYPE)
        msg = cls(r.fixed(SESSION_ID_BYTES), r.u64())
        r.done()
        return msg


@dataclass(frozen=True)
class ClientKey:
    """Client -> key holder (relayed by the server, at setup): the client's X25519 public key."""

    TYPE: ClassVar[int] = 0x45
    session_id: bytes
    client_id: int
    auth_key: bytes

    def encode(self) -> bytes:
        return (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u32(self.client_id)
                .fixed(self.auth_key, AUTH_KEY_BYTES).finish())

    @classmethod
    def decode(cls, data: bytes) -> ClientKey:
        r = Reader(data, cls.TYPE)
        msg = cls(r.fixed(SESSION_ID_BYTES), r.u32(), r.fixed(AUTH_KEY_BYTES))
        r.done()
        return msg


@dataclass(frozen=True)
class Ciphertexts:
    """Client -> server (an upload, with its sender and the tag the key holder verifies), or key
    holder -> server (the plaintexts of a sum, with who is in it): fixed-width integers."""

    TYPE: ClassVar[int] = 0x44
    session_id: bytes
    step: int
    kind: int  # UPLOAD or PLAINTEXT
    members: frozenset[int]  # the uploader, or the clients in the sum
    width: int
    values: tuple[int, ...]
    tag: bytes = b""  # an upload's TAG_BYTES-byte tag; plaintexts carry none

    UPLOAD: ClassVar[int] = 1
    PLAINTEXT: ClassVar[int] = 3

    def encode(self) -> bytes:
        w = (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u64(self.step)
             .u8(self.kind).ids(self.members))
        _write_ints(w, self.values, self.width)
        return w.fixed(self.tag, TAG_BYTES if self.kind == self.UPLOAD else 0).finish()

    @classmethod
    def decode(cls, data: bytes, kind: int) -> Ciphertexts:
        r = Reader(data, cls.TYPE)
        session_id, step, got, members = r.fixed(SESSION_ID_BYTES), r.u64(), r.u8(), r.ids()
        width, values = _read_ints(r)
        if got != kind or kind not in (cls.UPLOAD, cls.PLAINTEXT):
            raise MalformedMessageError(f"expected integer list kind {kind}, got {got}")
        tag = r.fixed(TAG_BYTES if kind == cls.UPLOAD else 0)
        r.done()
        if not members or (kind == cls.UPLOAD and len(members) != 1):
            raise MalformedMessageError("an upload names its one sender; a sum names its members")
        return cls(session_id, step, kind, members, width, tuple(values), tag)

    @property
    def sender(self) -> int:
        """The one client an upload names."""
        return min(self.members)


@dataclass(frozen=True)
class UploadBundle:
    """Server -> key holder: the step's uploads as their clients sent them, one per member in
    increasing client order; the key holder verifies and multiplies them itself."""

    TYPE: ClassVar[int] = 0x46
    session_id: bytes
    step: int
    uploads: tuple[Ciphertexts, ...]

    def encode(self) -> bytes:
        w = Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u64(self.step)
        w.u32(len(self.uploads))
        for upload in self.uploads:  # in the order given: decode refuses a non-canonical one
            data = upload.encode()
            w.u64(len(data)).fixed(data, len(data))
        return w.finish()

    @classmethod
    def decode(cls, data: bytes) -> UploadBundle:
        r = Reader(data, cls.TYPE)
        session_id, step, count = r.fixed(SESSION_ID_BYTES), r.u64(), r.u32()
        if not 1 <= count <= MAX_LIST:
            raise MalformedMessageError(f"a bundle of {count} uploads is out of bounds")
        uploads = tuple(Ciphertexts.decode(r.fixed(r.u64()), Ciphertexts.UPLOAD)
                        for _ in range(count))
        r.done()
        senders = [u.sender for u in uploads]
        if any(b <= a for a, b in itertools.pairwise(senders)):
            raise MalformedMessageError("a bundle holds one upload per client, in increasing "
                                        f"client order, got clients {senders}")
        return cls(session_id, step, uploads)

    @property
    def members(self) -> frozenset[int]:
        """The clients whose uploads the bundle carries."""
        return frozenset(u.sender for u in self.uploads)
