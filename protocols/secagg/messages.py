"""Typed SecAgg messages: one frozen dataclass each, canonical bytes, strict decoding."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import numpy as np

from ..errors import MalformedMessageError
from ..primitives.prg import ALGORITHMS
from ..wire import Reader, Writer, message_type

SESSION_ID_BYTES = 16
PUBLIC_KEY_BYTES = 32
SEED_BYTES = 32
GRAPH_SEED_BYTES = 32
ROUNDING_MODES = ("stochastic", "nearest")
ROUNDING_CODES = {mode: code for code, mode in enumerate(ROUNDING_MODES)}
PRG_NAMES = ALGORITHMS  # the keystream of masks and dither; its wire code is the index
PRG_CODES = {name: code for code, name in enumerate(PRG_NAMES)}
# "active": a consistency round before any self-mask share is released (the server may lie);
# "semi-honest": the server follows the protocol, so that round is skipped.
THREAT_MODELS = ("active", "semi-honest")
THREAT_MODEL_CODES = {model: code for code, model in enumerate(THREAT_MODELS)}
TOKEN_BYTES = 32  # HMAC-SHA256 consistency token


@dataclass(frozen=True)
class SessionOffer:
    """Server -> client: the session's public parameters and the client's id."""

    TYPE: ClassVar[int] = 1
    session_id: bytes
    client_id: int
    n_clients: int
    degree: int
    threshold: int
    graph_seed: bytes
    ring_bits: int
    scale_bits: int
    clip: float
    vector_length: int
    rounding: str = "stochastic"
    prg: str = "aes-256-ctr"
    threat_model: str = "active"

    def encode(self) -> bytes:
        return (
            Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u32(self.client_id)
            .u32(self.n_clients).u32(self.degree).u32(self.threshold)
            .fixed(self.graph_seed, GRAPH_SEED_BYTES).u8(self.ring_bits).u8(self.scale_bits)
            .f64(self.clip).u64(self.vector_length).u8(ROUNDING_CODES[self.rounding])
            .u8(PRG_CODES[self.prg]).u8(THREAT_MODEL_CODES[self.threat_model]).finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> SessionOffer:
        r = Reader(data, cls.TYPE)
        head = (r.fixed(SESSION_ID_BYTES), r.u32(), r.u32(), r.u32(), r.u32(),
                r.fixed(GRAPH_SEED_BYTES), r.u8(), r.u8(), r.f64(), r.u64())
        code, prg_code, threat_code = r.u8(), r.u8(), r.u8()
        r.done()
        if code >= len(ROUNDING_MODES):
            raise MalformedMessageError(f"unknown rounding mode code {code}")
        if prg_code >= len(PRG_NAMES):
            raise MalformedMessageError(f"unknown PRG code {prg_code}")
        if threat_code >= len(THREAT_MODELS):
            raise MalformedMessageError(f"unknown threat model code {threat_code}")
        msg = cls(*head, ROUNDING_MODES[code], PRG_NAMES[prg_code], THREAT_MODELS[threat_code])
        if not math.isfinite(msg.clip) or msg.clip <= 0:
            raise MalformedMessageError(f"clip must be a positive finite number, got {msg.clip}")
        return msg


@dataclass(frozen=True)
class KeyAdvertisement:
    """Client -> server: the client's X25519 public key for this session."""

    TYPE: ClassVar[int] = 2
    session_id: bytes
    client_id: int
    public_key: bytes

    def encode(self) -> bytes:
        return (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u32(self.client_id)
                .fixed(self.public_key, PUBLIC_KEY_BYTES).finish())

    @classmethod
    def decode(cls, data: bytes) -> KeyAdvertisement:
        r = Reader(data, cls.TYPE)
        msg = cls(r.fixed(SESSION_ID_BYTES), r.u32(), r.fixed(PUBLIC_KEY_BYTES))
        r.done()
        return msg


@dataclass(frozen=True)
class Roster:
    """Server -> client: the public keys of the client's neighbours that advertised."""

    TYPE: ClassVar[int] = 3
    session_id: bytes
    client_id: int
    public_keys: dict[int, bytes]

    def encode(self) -> bytes:
        return (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u32(self.client_id)
                .keyed_fixed(list(self.public_keys.items()), PUBLIC_KEY_BYTES).finish())

    @classmethod
    def decode(cls, data: bytes) -> Roster:
        r = Reader(data, cls.TYPE)
        msg = cls(r.fixed(SESSION_ID_BYTES), r.u32(), r.keyed_fixed(PUBLIC_KEY_BYTES))
        r.done()
        return msg


@dataclass(frozen=True)
class StepRequest:
    """Server -> client: open step `step`; `active` are the client's neighbours taking part."""

    TYPE: ClassVar[int] = 4
    session_id: bytes
    step: int
    active: frozenset[int]

    def encode(self) -> bytes:
        return (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u32(self.step)
                .ids(self.active).finish())

    @classmethod
    def decode(cls, data: bytes) -> StepRequest:
        r = Reader(data, cls.TYPE)
        msg = cls(r.fixed(SESSION_ID_BYTES), r.u32(), r.ids())
        r.done()
        return msg


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Client -> server: the masked ring vector and sealed self-mask shares for its holders."""

    TYPE: ClassVar[int] = 5
    session_id: bytes
    client_id: int
    step: int
    vector: np.ndarray
    envelopes: dict[int, bytes]

    def encode(self) -> bytes:
        return (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u32(self.client_id)
                .u32(self.step).ring(self.vector).keyed_blobs(list(self.envelopes.items()))
                .finish())

    @classmethod
    def decode(cls, data: bytes, *, max_length: int | None = None) -> MaskedInput:
        r = Reader(data, cls.TYPE)
        head = (r.fixed(SESSION_ID_BYTES), r.u32(), r.u32())
        vector = r.ring() if max_length is None else r.ring(max_length)
        msg = cls(*head, vector, r.keyed_blobs())
        r.done()
        return msg


_D = TypeVar("_D", bound="_DroppedSet")


@dataclass(frozen=True)
class _DroppedSet:
    """The layout of the two server requests that name a step's dropped neighbours."""

    TYPE: ClassVar[int]
    session_id: bytes
    step: int
    dropped: frozenset[int]

    def encode(self) -> bytes:
        return (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u32(self.step)
                .ids(self.dropped).finish())

    @classmethod
    def decode(cls: type[_D], data: bytes) -> _D:
        r = Reader(data, cls.TYPE)
        msg = cls(r.fixed(SESSION_ID_BYTES), r.u32(), r.ids())
        r.done()
        return msg


@dataclass(frozen=True)
class DropRequest(_DroppedSet):
    """Server -> survivor: these neighbours dropped at `step`; reveal the pair seeds with them."""

    TYPE: ClassVar[int] = 6


@dataclass(frozen=True)
class PairwiseReveal:
    """Survivor -> server: per-step pair seeds with dropped neighbours (never a long-term key)."""

    TYPE: ClassVar[int] = 7
    session_id: bytes
    client_id: int
    step: int
    seeds: dict[int, bytes] = field(repr=False)  # secrets: never in a log line

    def encode(self) -> bytes:
        return (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u32(self.client_id)
                .u32(self.step).keyed_fixed(list(self.seeds.items()), SEED_BYTES).finish())

    @classmethod
    def decode(cls, data: bytes) -> PairwiseReveal:
        r = Reader(data, cls.TYPE)
        msg = cls(r.fixed(SESSION_ID_BYTES), r.u32(), r.u32(), r.keyed_fixed(SEED_BYTES))
        r.done()
        return msg


@dataclass(frozen=True)
class ConsistencyRequest(_DroppedSet):
    """Server -> survivor: the final dropped set of its neighbours at `step` (active model)."""

    TYPE: ClassVar[int] = 10


@dataclass(frozen=True)
class ConsistencyReply:
    """Survivor -> server: one token per neighbour whose pair seed it never reveals at `step`."""

    TYPE: ClassVar[int] = 11
    session_id: bytes
    client_id: int
    step: int
    tokens: dict[int, bytes] = field(repr=False)

    def encode(self) -> bytes:
        return (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u32(self.client_id)
                .u32(self.step).keyed_fixed(list(self.tokens.items()), TOKEN_BYTES).finish())

    @classmethod
    def decode(cls, data: bytes) -> ConsistencyReply:
        r = Reader(data, cls.TYPE)
        msg = cls(r.fixed(SESSION_ID_BYTES), r.u32(), r.u32(), r.keyed_fixed(TOKEN_BYTES))
        r.done()
        return msg


@dataclass(frozen=True)
class ShareRequest:
    """Server -> survivor: the final survivors of `step` and the sealed shares addressed to it.

    `tokens[u]` (active model) is survivor u's consistency token for this holder; without a
    valid one the holder keeps u's share.
    """

    TYPE: ClassVar[int] = 8
    session_id: bytes
    step: int
    survivors: frozenset[int]
    envelopes: dict[int, bytes]
    tokens: dict[int, bytes] = field(default_factory=dict, repr=False)

    def encode(self) -> bytes:
        return (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u32(self.step)
                .ids(self.survivors).keyed_blobs(list(self.envelopes.items()))
                .keyed_fixed(list(self.tokens.items()), TOKEN_BYTES).finish())

    @classmethod
    def decode(cls, data: bytes) -> ShareRequest:
        r = Reader(data, cls.TYPE)
        msg = cls(r.fixed(SESSION_ID_BYTES), r.u32(), r.ids(), r.keyed_blobs(),
                  r.keyed_fixed(TOKEN_BYTES))
        r.done()
        return msg


@dataclass(frozen=True)
class ShareReveal:
    """Survivor -> server: its Shamir shares of surviving neighbours' per-step self-mask seeds."""

    TYPE: ClassVar[int] = 9
    session_id: bytes
    client_id: int
    step: int
    shares: dict[int, bytes] = field(repr=False)
    share_bytes: int = 33

    def encode(self) -> bytes:
        return (Writer(self.TYPE).fixed(self.session_id, SESSION_ID_BYTES).u32(self.client_id)
                .u32(self.step).u8(self.share_bytes)
                .keyed_fixed(list(self.shares.items()), self.share_bytes).finish())

    @classmethod
    def decode(cls, data: bytes) -> ShareReveal:
        r = Reader(data, cls.TYPE)
        head = (r.fixed(SESSION_ID_BYTES), r.u32(), r.u32())
        size = r.u8()
        msg = cls(*head, r.keyed_fixed(size), size)
        r.done()
        return msg


Message = (
    SessionOffer | KeyAdvertisement | Roster | StepRequest | MaskedInput | DropRequest
    | PairwiseReveal | ConsistencyRequest | ConsistencyReply | ShareRequest | ShareReveal
)
MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (SessionOffer, KeyAdvertisement, Roster, StepRequest, MaskedInput, DropRequest,
                PairwiseReveal, ConsistencyRequest, ConsistencyReply, ShareRequest, ShareReveal)
}


def decode_message(data: bytes) -> Message:
    """Decode any protocol message by its type code."""
    code = message_type(data)
    cls = MESSAGE_TYPES.get(code)
    if cls is None:
        raise MalformedMessageError(f"unknown message type {code}")
    return cls.decode(data)
