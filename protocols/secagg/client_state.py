"""What a SecAgg client remembers between two messages, as versioned bytes with strict decoding.

On Flower a ClientApp runs in a fresh process per message, so a client's keys, stage and step
travel in these bytes from one message to the next. They hold the client's pair keys (and,
between its key advertisement and its roster, its X25519 private key): store them as one stores
a secret key. Decoding trusts nothing: bytes that are truncated, oversized, of another version
or inconsistent raise StateError, and nothing is sized by a count before its bytes are there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..errors import ParameterError, ProtocolError, StateError
from ..limits import OfferLimits
from ..primitives.kdf import PRIVATE_KEY_BYTES
from ..wire import Reader, Writer
from .limits import check_offer, sizes_before_offer
from .messages import THREAT_MODEL_CODES, THREAT_MODELS, SessionOffer

__all__ = ["DITHER_SECRET_BYTES", "STATE_VERSION", "ClientStage", "SavedClient", "StepState"]

STATE_TYPE = 0x53  # the header's type code ("S"): no protocol message uses it
STATE_VERSION = 1
DITHER_SECRET_BYTES = 32  # client-local: the server cannot recompute a client's rounding
KEY_BYTES = 32  # pair, envelope and confirmation keys are HKDF-SHA256 outputs
MAX_ROUNDING_SEED = 1024  # far above the 32 bytes a session derives; bounds the field


class ClientStage(Enum):
    """Where a client is in the session; each handler names the stages it accepts."""

    NEW = "new"
    ADVERTISED = "advertised"
    READY = "ready"
    UPLOADED = "uploaded"
    PAIRWISE_REVEALED = "pairwise-revealed"
    CONFIRMED = "confirmed"
    SHARES_REVEALED = "shares-revealed"


_STAGES = list(ClientStage)
_BEFORE_KEYS = frozenset({ClientStage.NEW, ClientStage.ADVERTISED})
_IN_STEP = frozenset({ClientStage.UPLOADED, ClientStage.PAIRWISE_REVEALED, ClientStage.CONFIRMED,
                      ClientStage.SHARES_REVEALED})


@dataclass
class StepState:
    """What one client remembers about the current step (and only the current step)."""

    step: int
    active: frozenset[int]
    dropped: set[int] = field(default_factory=set)
    pair_revealed: set[int] = field(default_factory=set)
    frozen: bool = False  # consistency tokens were issued: the dropped set may not grow
    shares_revealed: bool = False


@dataclass(frozen=True, eq=False)
class SavedClient:
    """Everything a SecAggClient carries from one message to the next (what it is given anew
    each time, its input provider, noise, masker and limits, is not in here)."""

    threat_model: str
    stage: ClientStage
    dither_secret: bytes = field(repr=False)
    rounding_seed: bytes | None = field(repr=False)
    offer: SessionOffer | None
    active: frozenset[int]
    pair_keys: dict[int, bytes] = field(repr=False)
    seal_keys: dict[int, bytes] = field(repr=False)
    open_keys: dict[int, bytes] = field(repr=False)
    confirm_keys: dict[int, bytes] = field(repr=False)
    last_step: int
    step: StepState | None
    private_key: bytes | None = field(repr=False)  # raw X25519, only in stage ADVERTISED

    def encode(self) -> bytes:
        """The canonical bytes of this state (STATE_VERSION)."""
        if self.rounding_seed is not None and len(self.rounding_seed) > MAX_ROUNDING_SEED:
            raise ParameterError(f"a rounding seed of {len(self.rounding_seed)} bytes is "
                                 f"longer than a client state holds ({MAX_ROUNDING_SEED})")
        w = Writer(STATE_TYPE).u8(STATE_VERSION).u8(THREAT_MODEL_CODES[self.threat_model])
        w.u8(_STAGES.index(self.stage)).fixed(self.dither_secret, DITHER_SECRET_BYTES)
        _write_optional(w, self.rounding_seed)
        _write_optional(w, None if self.offer is None else self.offer.encode())
        w.ids(self.active)
        for table in (self.pair_keys, self.seal_keys, self.open_keys, self.confirm_keys):
            w.keyed_fixed(list(table.items()), KEY_BYTES)
        w.u32(self.last_step).u8(self.step is not None)
        if self.step is not None:
            st = self.step
            w.u32(st.step).ids(st.active).ids(st.dropped).ids(st.pair_revealed)
            w.u8(st.frozen).u8(st.shares_revealed)
        w.u8(self.private_key is not None)
        if self.private_key is not None:
            w.fixed(self.private_key, PRIVATE_KEY_BYTES)
        return w.finish()

    @classmethod
    def decode(cls, data: bytes, limits: OfferLimits) -> SavedClient:
        """The saved client in `data`; its offer must lie inside `limits` (checked before
        anything is sized by it). Raises StateError naming the problem, and nothing else."""
        try:
            saved = cls._read(data, limits)
            saved.check()
        except StateError:
            raise
        except ProtocolError as error:
            raise StateError(f"client state does not decode: {error}") from error
        return saved

    @classmethod
    def _read(cls, data: bytes, limits: OfferLimits) -> SavedClient:
        r = Reader(data, STATE_TYPE)
        version = r.u8()
        if version != STATE_VERSION:
            raise StateError(f"client state version {version} is not {STATE_VERSION}, the "
                             "version this build reads")
        threat_code, stage_code = r.u8(), r.u8()
        if threat_code >= len(THREAT_MODELS) or stage_code >= len(_STAGES):
            raise StateError(f"client state names an unknown threat model ({threat_code}) "
                             f"or stage ({stage_code})")
        dither_secret = r.fixed(DITHER_SECRET_BYTES)
        rounding_seed = _read_optional(r, MAX_ROUNDING_SEED, "rounding seed")
        encoded_offer = _read_optional(r, sizes_before_offer().limits[SessionOffer.TYPE],
                                       "offer")
        offer = None if encoded_offer is None else SessionOffer.decode(encoded_offer)
        if offer is not None:
            check_offer(limits, offer)  # before its sizes bound anything below
        holders = 0 if offer is None else min(offer.degree, offer.n_clients - 1)
        active = r.ids(holders)
        pair, seal, opening, confirm = (r.keyed_fixed(KEY_BYTES, holders) for _ in range(4))
        last_step = r.u32()
        step = _read_step(r, holders) if _read_flag(r, "step") else None
        private_key = r.fixed(PRIVATE_KEY_BYTES) if _read_flag(r, "private key") else None
        r.done()
        return cls(THREAT_MODELS[threat_code], _STAGES[stage_code], dither_secret,
                   rounding_seed, offer, active, pair, seal, opening, confirm, last_step, step,
                   private_key)

    def check(self) -> None:
        """Raise StateError unless the fields agree with each other and with the stage."""
        stage, step = self.stage, self.step
        keyed = set(self.pair_keys)
        _require((self.offer is None) == (stage is ClientStage.NEW), "an offer iff not new")
        _require((self.private_key is not None) == (stage is ClientStage.ADVERTISED),
                 "a private key iff advertised and without a roster")
        _require(all(set(t) == keyed for t in (self.seal_keys, self.open_keys,
                                                self.confirm_keys)),
                 "the same peers in all four key tables")
        _require(bool(keyed) == (stage not in _BEFORE_KEYS), "pair keys iff a roster came")
        _require(self.active <= keyed, "active peers with pair keys")
        _require((step is not None) == (stage in _IN_STEP), "a step state iff in a step")
        if step is None:
            _require(self.last_step == 0, "no step before the first")
            _require(stage is not ClientStage.READY or self.active == keyed,
                     "every keyed peer active before the first step")
            return
        _require(step.step == self.last_step >= 1, "the step state of the last step")
        _require(step.active <= keyed, "step peers with pair keys")
        _require(step.pair_revealed <= step.dropped <= step.active,
                 "revealed pair seeds only of dropped step peers")
        _require(self.active == step.active - step.dropped, "active = step peers - dropped")
        _require(step.shares_revealed == (stage is ClientStage.SHARES_REVEALED),
                 "shares revealed iff in that stage")
        _require(step.frozen == (stage is ClientStage.CONFIRMED)
                 or (step.frozen and stage is ClientStage.SHARES_REVEALED),
                 "a frozen dropped set iff confirmed (or shares revealed after it)")


def _require(holds: bool, what: str) -> None:
    if not holds:
        raise StateError(f"inconsistent client state: expected {what}")


def _write_optional(w: Writer, data: bytes | None) -> None:
    w.u8(data is not None)
    if data is not None:
        w.u32(len(data)).fixed(data, len(data))


def _read_flag(r: Reader, what: str) -> bool:
    flag = r.u8()
    if flag > 1:
        raise StateError(f"client state: {what} flag must be 0 or 1, got {flag}")
    return flag == 1


def _read_optional(r: Reader, limit: int, what: str) -> bytes | None:
    if not _read_flag(r, what):
        return None
    size = r.u32()
    if size > limit:
        raise StateError(f"client state: the {what} of {size} bytes exceeds the limit {limit}")
    return r.fixed(size)


def _read_step(r: Reader, holders: int) -> StepState:
    step, active, dropped, revealed = r.u32(), r.ids(holders), r.ids(holders), r.ids(holders)
    frozen, shares_revealed = _read_flag(r, "frozen"), _read_flag(r, "shares revealed")
    return StepState(step, active, set(dropped), set(revealed), frozen, shares_revealed)
