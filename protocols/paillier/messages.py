"""Typed messages of the packed Paillier path: canonical bytes, strict decoding.

Big integers (the modulus, ciphertexts, plaintexts) travel as fixed-width big-endian fields; a
decoder checks framing and sizes, and the receiving role checks ranges against its key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..errors import MalformedMessageError
from ..wire import MAX_LIST, Reader, Writer

__all__ = ["Ciphertexts", "Offer", "PublicKeyMessage", "StepRequest"]

SESSION_ID_BYTES = 16
MAX_INT_BYTES = 2048  # N^2 of an 8192-bit modulus
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
    """Key holder -> server: the session id and the public modulus N."""

    TYPE: ClassVar[int] = 0x41
    session_id: bytes
    modulus: int

    def encode(self) -> bytes:
        w = Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES)
        return _write_ints(w, [self.modulus], int_width(self.modulus)).finish()

    @classmethod
    def decode(cls, data: bytes) -> PublicKeyMessage:
        r = Reader(data, cls.TYPE)
        session_id, (_, ints) = r.fixed(SESSION_ID_BYTES), _read_ints(r)
        r.done()
        if len(ints) != 1 or ints[0] % 2 == 0 or ints[0] < 3:
            raise MalformedMessageError("the public key must be one odd modulus")
        return cls(session_id, ints[0])


@dataclass(frozen=True)
class Offer:
    """Server -> client: the public key and every parameter the packing depends on."""

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

    def encode(self) -> bytes:
        w = (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u32(self.client_id)
             .u32(self.n_clients).u64(self.vector_length).f64(self.clip).u8(self.scale_bits)
             .u8(self.ring_bits).u8(ROUNDING_MODES.index(self.rounding)).u64(self.noise_bound).u8(self.guard_bits))
        return _write_ints(w, [self.modulus], int_width(self.modulus)).finish()

    @classmethod
    def decode(cls, data: bytes) -> Offer:
        r = Reader(data, cls.TYPE)
        head = (r.fixed(SESSION_ID_BYTES), r.u32(), r.u32(), r.u64(), r.f64(), r.u8(), r.u8())
        code, tail = r.u8(), (r.u64(), r.u8())
        _, ints = _read_ints(r)
        r.done()
        if code >= len(ROUNDING_MODES):
            raise MalformedMessageError(f"unknown rounding mode code {code}")
        if len(ints) != 1 or ints[0] % 2 == 0:
            raise MalformedMessageError("the offer must carry one odd modulus")
        if not math.isfinite(head[4]) or head[4] <= 0:
            raise MalformedMessageError(f"clip must be a positive finite number, got {head[4]}")
        return cls(*head, ROUNDING_MODES[code], *tail, ints[0])


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
class Ciphertexts:
    """Client -> server (an upload), server -> key holder (an aggregate, with who is in it), or
    key holder -> server (the aggregate's plaintexts): fixed-width big-endian integers."""

    TYPE: ClassVar[int] = 0x44
    session_id: bytes
    step: int
    kind: int  # UPLOAD, AGGREGATE or PLAINTEXT
    members: frozenset[int]  # the uploader, or the clients in the aggregate
    width: int
    values: tuple[int, ...]

    UPLOAD: ClassVar[int] = 1
    AGGREGATE: ClassVar[int] = 2
    PLAINTEXT: ClassVar[int] = 3

    def encode(self) -> bytes:
        w = (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u64(self.step)
             .u8(self.kind).ids(self.members))
        return _write_ints(w, self.values, self.width).finish()

    @classmethod
    def decode(cls, data: bytes, kind: int) -> Ciphertexts:
        r = Reader(data, cls.TYPE)
        session_id, step, got, members = r.fixed(SESSION_ID_BYTES), r.u64(), r.u8(), r.ids()
        width, values = _read_ints(r)
        r.done()
        if got != kind:
            raise MalformedMessageError(f"expected integer list kind {kind}, got {got}")
        if not members or (kind == cls.UPLOAD and len(members) != 1):
            raise MalformedMessageError("an upload names its one sender; a sum names its members")
        return cls(session_id, step, kind, members, width, tuple(values))
