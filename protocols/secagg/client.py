"""SecAgg client state machine: one handler per stage, every server request validated."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..codec import FixedPointCodec, Rounding
from ..errors import (
    IntegrityError,
    ParameterError,
    PolicyViolationError,
    ProtocolError,
    ReplayError,
    StageError,
    StateError,
    TooFewSurvivorsError,
)
from ..graph import NeighbourGraph, complete_graph, harary_graph
from ..limits import OfferLimits
from ..primitives import envelope, kdf, prg, shamir
from ..session import RingNoise
from ..wire import message_type
from . import keys
from .client_state import DITHER_SECRET_BYTES, ClientStage, SavedClient, StepState
from .limits import check_offer, session_sizes, sizes_before_offer
from .messages import (
    THREAT_MODELS,
    ConsistencyReply,
    ConsistencyRequest,
    DropRequest,
    KeyAdvertisement,
    MaskedInput,
    PairwiseReveal,
    Roster,
    SessionOffer,
    ShareRequest,
    ShareReveal,
    StepRequest,
    decode_message,
)

InputProvider = Callable[[int], np.ndarray]
SELF_SEED_BYTES = 32  # a fresh AES-256-CTR key per client and step


def reduce_ring(vector: np.ndarray, ring_bits: int) -> np.ndarray:
    """Reduce a uint32/uint64 vector modulo 2^ring_bits (free for 32 and 64 bits)."""
    if ring_bits in (32, 64):
        return vector
    np.bitwise_and(vector, vector.dtype.type((1 << ring_bits) - 1), out=vector)
    return vector


def build_graph(offer: SessionOffer) -> NeighbourGraph:
    """The neighbour graph every party derives from the offer's public parameters."""
    if offer.degree >= offer.n_clients - 1:
        return complete_graph(offer.n_clients)
    return harary_graph(offer.n_clients, offer.degree, seed=offer.graph_seed)


@dataclass(frozen=True)
class StepSecrets:
    """What a device masker needs to build one upload exactly as the protocol specifies.

    The client derives every key itself; the masker only expands and adds them (encode with
    `rounding_key`, add `noise`, add the self mask and signed pair masks from the `prg` stream).
    """

    client_id: int
    step: int
    self_seed: bytes = field(repr=False)
    pair_seeds: dict[int, bytes] = field(repr=False)
    rounding_key: bytes | None = field(repr=False)
    prg: str
    noise: np.ndarray | None = field(repr=False)


Masker = Callable[[object, FixedPointCodec, StepSecrets], np.ndarray]


class SecAggClient:
    """An honest client: masks its inputs and refuses any request that could expose them."""

    def __init__(self, input_provider: InputProvider, *,
                 rounding_seed: bytes | None = None, noise: RingNoise | None = None,
                 masker: Masker | None = None, threat_model: str = "active",
                 limits: OfferLimits | None = None) -> None:
        """`rounding_seed` keys stochastic rounding together with a secret this client draws
        and never sends, and the session id, so no other party can recompute it; without it
        every step draws fresh randomness. `noise` is added to every encoded input before
        masking, so no party ever sees this client's un-noised value. With `threat_model`
        "active" the client refuses a session offered without the consistency round. An offer
        outside `limits` (default OfferLimits()) is refused before anything is built for it."""
        if threat_model not in THREAT_MODELS:
            raise ParameterError(f"threat_model must be one of {', '.join(THREAT_MODELS)}, "
                                 f"got {threat_model!r}")
        self._inputs = input_provider
        self._threat_model = threat_model
        self._rounding_seed = rounding_seed
        self._dither_secret = os.urandom(DITHER_SECRET_BYTES)
        self._noise = noise
        self._masker = masker  # e.g. codream_secure.gpu: the same upload, computed on a GPU
        self._limits = limits or OfferLimits()
        self._sizes = sizes_before_offer()  # what an incoming message may weigh
        self.stage = ClientStage.NEW
        self.client_id = -1
        self._offer: SessionOffer | None = None
        self._codec: FixedPointCodec | None = None
        self._neighbours: frozenset[int] = frozenset()
        self._active: frozenset[int] = frozenset()
        self._pair_keys: dict[int, bytes] = {}
        self._seal_keys: dict[int, bytes] = {}
        self._open_keys: dict[int, bytes] = {}
        self._confirm_keys: dict[int, bytes] = {}
        self._private_key: X25519PrivateKey | None = None  # from the offer to the roster only
        self._own_public_key = b""
        self._last_step = 0
        self._step: StepState | None = None

    def __repr__(self) -> str:
        return f"SecAggClient(client_id={self.client_id}, stage={self.stage.value!r})"

    # -- state between messages ---------------------------------------------------------------

    def to_state(self) -> bytes:
        """Everything this client needs to handle its next message, as versioned bytes
        (protocols/secagg/client_state.py). They hold its secret keys: store them as one."""
        private_key = self._private_key
        return SavedClient(
            self._threat_model, self.stage, self._dither_secret, self._rounding_seed,
            self._offer, self._active, self._pair_keys, self._seal_keys, self._open_keys,
            self._confirm_keys, self._last_step, self._step,
            None if private_key is None else kdf.private_key_bytes(private_key),
        ).encode()

    @classmethod
    def from_state(cls, data: bytes, input_provider: InputProvider, *,
                   noise: RingNoise | None = None, masker: Masker | None = None,
                   limits: OfferLimits | None = None) -> SecAggClient:
        """The client `to_state` saved, with what is given anew each time (its inputs, noise,
        masker and limits). Raises StateError, naming the problem, on bytes that do not restore
        (including an offer outside `limits` or a session `noise` could wrap)."""
        limits = limits or OfferLimits()
        saved = SavedClient.decode(data, limits)
        client = cls(input_provider, rounding_seed=saved.rounding_seed, noise=noise,
                     masker=masker, threat_model=saved.threat_model, limits=limits)
        try:
            client._restore(saved)
        except ProtocolError as error:
            raise StateError(f"client state does not restore: {error}") from error
        return client

    def _restore(self, saved: SavedClient) -> None:
        self._dither_secret = saved.dither_secret
        if saved.offer is not None:
            self._join(saved.offer)
            strangers = set(saved.pair_keys) - self._neighbours
            if strangers:
                raise StateError(f"client state holds keys of non-neighbours {sorted(strangers)}")
        if saved.private_key is not None:
            self._private_key = kdf.private_key_from_bytes(saved.private_key)
            self._own_public_key = self._private_key.public_key().public_bytes_raw()
        self._active = saved.active
        self._pair_keys, self._seal_keys = dict(saved.pair_keys), dict(saved.seal_keys)
        self._open_keys, self._confirm_keys = dict(saved.open_keys), dict(saved.confirm_keys)
        self._last_step, self._step = saved.last_step, saved.step
        self.stage = saved.stage

    # -- dispatch -----------------------------------------------------------------------------

    def handle(self, data: bytes) -> bytes | None:
        """Process one server message and return the reply bytes (None when none is due).

        Any input, however hostile, ends in a reply, None or a ProtocolError.
        """
        if self._offer is None and message_type(data) != SessionOffer.TYPE:
            raise StageError(f"message type {message_type(data)} before any session offer")
        self._sizes.check(data)  # by its length, before the body is decoded
        msg = decode_message(data)
        if isinstance(msg, SessionOffer):
            return self._on_offer(msg)
        if self._offer is None:
            raise StageError(f"{type(msg).__name__} before any session offer")
        if msg.session_id != self._offer.session_id:
            raise StageError("message belongs to another session")
        if isinstance(msg, Roster):
            self._on_roster(msg)
            return None
        if isinstance(msg, StepRequest):
            return self._on_step(msg)
        if isinstance(msg, DropRequest):
            return self._on_drop(msg)
        if isinstance(msg, ConsistencyRequest):
            return self._on_consistency(msg)
        if isinstance(msg, ShareRequest):
            return self._on_share_request(msg)
        raise StageError(f"a client does not accept {type(msg).__name__}")

    def _expect(self, *stages: ClientStage) -> None:
        if self.stage not in stages:
            names = ", ".join(s.value for s in stages)
            raise StageError(f"message not allowed in stage {self.stage.value} (expected {names})")

    # -- session setup ------------------------------------------------------------------------

    def _on_offer(self, offer: SessionOffer) -> bytes:
        self._expect(ClientStage.NEW)
        self._join(offer)
        self._private_key, public_key = kdf.generate_keypair()
        self._own_public_key = public_key
        self.stage = ClientStage.ADVERTISED
        return KeyAdvertisement(offer.session_id, offer.client_id, public_key).encode()

    def _join(self, offer: SessionOffer) -> None:
        """Check the offer against this client's limits and policy, and build what it sizes."""
        check_offer(self._limits, offer)  # before any graph or buffer is sized by the offer
        if self._threat_model == "active" and offer.threat_model != "active":
            raise PolicyViolationError(
                f"session offered under the {offer.threat_model!r} threat model; this client "
                "requires 'active' (a consistency round before any self-mask share)"
            )
        codec = FixedPointCodec(clip=offer.clip, scale_bits=offer.scale_bits,
                                ring_bits=offer.ring_bits,
                                rounding=cast(Rounding, offer.rounding),  # codec checks it
                                prg=offer.prg)
        # refuse a session whose sum (with this client's noise) could wrap
        codec.check_budget(offer.n_clients,
                           headroom=0.0 if self._noise is None else self._noise.headroom)
        self._neighbours = build_graph(offer).neighbours(offer.client_id)
        self._offer, self._codec, self.client_id = offer, codec, offer.client_id
        self._sizes = session_sizes(n_clients=offer.n_clients, degree=offer.degree,
                                               vector_length=offer.vector_length,
                                               ring_bits=offer.ring_bits)

    def _on_roster(self, roster: Roster) -> None:
        self._expect(ClientStage.ADVERTISED)
        offer = self._offer
        assert offer is not None
        if roster.client_id != self.client_id:
            raise StageError(f"roster addressed to client {roster.client_id}, not {self.client_id}")
        strangers = set(roster.public_keys) - self._neighbours
        if strangers:
            raise PolicyViolationError(f"roster lists non-neighbours {sorted(strangers)}")
        keys_seen = list(roster.public_keys.values())
        for public in keys_seen:  # low-order keys: kdf.agree below refuses them
            keys.check_canonical_key(public)
        if len(set(keys_seen)) != len(keys_seen) or self._own_public_key in keys_seen:
            raise IntegrityError("roster repeats a public key or contains this client's own key")
        self._require_holders(len(roster.public_keys), "key roster")
        sid = offer.session_id
        assert self._private_key is not None  # drawn with the offer, kept until now
        for peer, public in roster.public_keys.items():
            secret = kdf.agree(self._private_key, public)
            self._pair_keys[peer] = keys.pair_master_key(secret, session_id=sid,
                                                         a=self.client_id, b=peer)
            self._seal_keys[peer] = keys.envelope_key(secret, session_id=sid,
                                                      sender=self.client_id, receiver=peer)
            self._open_keys[peer] = keys.envelope_key(secret, session_id=sid,
                                                      sender=peer, receiver=self.client_id)
            self._confirm_keys[peer] = keys.confirmation_key(secret, session_id=sid,
                                                             a=self.client_id, b=peer)
        self._active = frozenset(roster.public_keys)
        self._private_key = None  # no further key agreement in this session
        self.stage = ClientStage.READY
        return None

    def _require_holders(self, holders: int, context: str) -> None:
        assert self._offer is not None
        if holders < self._offer.threshold:
            raise TooFewSurvivorsError(needed=self._offer.threshold, remaining=holders,
                                       context=context)

    # -- one aggregation step -----------------------------------------------------------------

    def _on_step(self, request: StepRequest) -> bytes:
        self._expect(ClientStage.READY, ClientStage.UPLOADED, ClientStage.PAIRWISE_REVEALED,
                     ClientStage.CONFIRMED, ClientStage.SHARES_REVEALED)
        if request.step <= self._last_step:
            raise ReplayError(f"step {request.step} was already opened (last {self._last_step})")
        if request.step != self._last_step + 1:
            raise StageError(f"step {request.step} skips ahead of step {self._last_step + 1}")
        newcomers = request.active - self._active
        if newcomers:
            raise PolicyViolationError(
                f"step {request.step} adds clients {sorted(newcomers)} that are not active "
                "neighbours (the active set may only shrink)"
            )
        self._require_holders(len(request.active), f"step {request.step}")
        offer, codec = self._offer, self._codec
        assert offer is not None and codec is not None
        vector = self._inputs(request.step)
        if self._masker is None:  # a device masker takes its own tensor type, unconverted
            vector = np.asarray(vector)
        size = int(vector.numel()) if hasattr(vector, "numel") else np.asarray(vector).size
        if size != offer.vector_length:
            raise ParameterError(
                f"input of step {request.step} has {size} values, the session expects "
                f"{offer.vector_length}"
            )
        # keyed by this client's own secret under the session id: reproducible for the client
        # within a session, unpredictable to the server and different in every session
        rounding_key = None if self._rounding_seed is None else kdf.derive_key(
            self._dither_secret, session_id=offer.session_id, purpose="stochastic-rounding",
            context=(self._rounding_seed, request.step))
        self_seed = os.urandom(SELF_SEED_BYTES)
        ring = offer.ring_bits
        pair_seeds = {peer: keys.pair_step_seed(self._pair_keys[peer],
                                                session_id=offer.session_id, step=request.step)
                      for peer in request.active}
        if self._masker is not None:
            masked = self._masked_by_hook(vector, codec, request.step, self_seed, pair_seeds,
                                          rounding_key)
        else:
            masked = codec.encode(vector.reshape(-1), rounding_key=rounding_key)
            if self._noise is not None:
                self._add_noise(masked, codec)
            masks = [(self_seed, 1)] + [(seed, keys.pair_sign(self.client_id, peer))
                                        for peer, seed in pair_seeds.items()]
            prg.add_uniform_rings(masked, masks, ring_bits=ring, algorithm=offer.prg)
        masked = reduce_ring(masked, ring)
        # Shares go to the active neighbours only: a client never holds a share of its own seed,
        # so t colluding neighbours (not t - 1 plus the victim's own share) are needed.
        shares = shamir.split(self_seed, threshold=offer.threshold,
                              share_ids=[h + 1 for h in sorted(request.active)])
        envelopes = {
            peer: envelope.seal(
                self._seal_keys[peer], shares[peer + 1], nonce=keys.envelope_nonce(request.step),
                associated_data=keys.envelope_aad(session_id=offer.session_id, step=request.step,
                                                  sender=self.client_id, receiver=peer),
            )
            for peer in request.active
        }
        self._active = request.active
        self._last_step = request.step
        self._step = StepState(request.step, request.active)
        self.stage = ClientStage.UPLOADED
        return MaskedInput(offer.session_id, self.client_id, request.step, masked,
                           envelopes).encode()

    def _checked_noise(self, length: int, codec: FixedPointCodec) -> np.ndarray:
        """One noise draw, refused unless it is int64 of the right length inside the budget."""
        assert self._noise is not None
        noise = np.asarray(self._noise.sample(length, codec.scale_bits))
        if noise.shape != (length,) or noise.dtype != np.int64:
            raise ParameterError(f"noise must be {length} int64 values, got "
                                 f"{noise.shape} {noise.dtype}")
        limit = codec.noise_units(self._noise.headroom)
        if noise.size and int(np.abs(noise).max()) > limit:
            raise ParameterError(f"noise exceeds its declared bound of {limit} units; the sum "
                                 "could wrap")
        return noise

    def _add_noise(self, encoded: np.ndarray, codec: FixedPointCodec) -> None:
        """encoded += noise (mod 2^k), after checking the noise stays inside the budget."""
        noise = self._checked_noise(encoded.size, codec)
        # int64 -> uint32/uint64 wraps modulo 2^32 / 2^64: the ring residue of the signed noise.
        np.add(encoded, noise.astype(encoded.dtype), out=encoded)

    def _masked_by_hook(self, vector: object, codec: FixedPointCodec, step: int,
                        self_seed: bytes, pair_seeds: dict[int, bytes],
                        rounding_key: bytes | None) -> np.ndarray:
        """The upload built by the device masker from the secrets this client derived."""
        assert self._masker is not None and self._offer is not None
        noise = None if self._noise is None else self._checked_noise(
            self._offer.vector_length, codec)
        secrets = StepSecrets(self.client_id, step, self_seed, dict(pair_seeds),
                              rounding_key, self._offer.prg, noise)
        masked = np.asarray(self._masker(vector, codec, secrets))
        if masked.dtype != codec.dtype or masked.shape != (self._offer.vector_length,):
            raise ParameterError(f"the masker returned {masked.shape} {masked.dtype}; the "
                                 f"protocol needs ({self._offer.vector_length},) {codec.dtype}")
        # reduce_ring works in place below 32 bits: never on the masker's array. At 32 and 64
        # bits nothing writes to it before the message encoding copies it.
        return masked if codec.ring_bits in (32, 64) else masked.copy()

    def _current_step(self, step: int) -> StepState:
        state = self._step
        if state is None or step != state.step:
            current = None if state is None else state.step
            if state is not None and step < state.step:
                raise ReplayError(f"request for finished step {step} (current step {current})")
            raise StageError(f"request for step {step}, but the current step is {current}")
        return state

    def _on_drop(self, request: DropRequest) -> bytes:
        state = self._current_step(request.step)
        if state.shares_revealed:
            # Never both: self-mask shares of this step's survivors are out; revealing pair
            # seeds now would let the server strip both masks from someone's input.
            raise PolicyViolationError(
                f"refusing pair seeds for step {request.step}: self-mask shares were revealed"
            )
        if state.frozen and not request.dropped <= state.dropped:
            # consistency tokens promised the other neighbours their pair seeds stay secret
            raise PolicyViolationError(
                f"refusing pair seeds of {sorted(request.dropped - state.dropped)} at step "
                f"{request.step}: the dropped set was frozen by the consistency round"
            )
        self._expect(ClientStage.UPLOADED, ClientStage.PAIRWISE_REVEALED, ClientStage.CONFIRMED)
        offer = self._offer
        assert offer is not None
        if self.client_id in request.dropped:
            raise PolicyViolationError("a client cannot be asked to unmask its own dropout")
        unknown = request.dropped - state.active
        if unknown:
            raise PolicyViolationError(
                f"dropped set names {sorted(unknown)}, who were not active at step {request.step}"
            )
        if not state.dropped <= request.dropped:
            raise PolicyViolationError("the dropped set of a step may only grow")
        self._require_holders(len(state.active - request.dropped),
                              f"step {request.step} after dropouts")
        fresh = request.dropped - state.pair_revealed
        seeds = {
            peer: keys.pair_step_seed(self._pair_keys[peer], session_id=offer.session_id,
                                      step=request.step)
            for peer in fresh
        }
        state.dropped = set(request.dropped)
        state.pair_revealed |= fresh
        self._active = state.active - request.dropped  # a dropped client never comes back
        if not state.frozen:
            self.stage = ClientStage.PAIRWISE_REVEALED
        return PairwiseReveal(offer.session_id, self.client_id, request.step, seeds).encode()

    def _on_consistency(self, request: ConsistencyRequest) -> bytes:
        """Freeze this step's dropped set and vouch, per neighbour outside it, for its pair seed.

        A holder releases this client's self-mask share only with its token, so every honest
        share-giver w keeps the pair mask s_uw on this client's input: the server then needs t
        colluding holders to unmask it, whatever it told whom.
        """
        state = self._current_step(request.step)
        if state.frozen:
            raise ReplayError(f"consistency tokens of step {request.step} were already issued")
        if state.shares_revealed:
            raise StageError(f"consistency request after the share reveal of step {request.step}")
        self._expect(ClientStage.UPLOADED, ClientStage.PAIRWISE_REVEALED)
        offer = self._offer
        assert offer is not None
        if request.dropped != state.dropped:
            raise PolicyViolationError(
                f"consistency request names dropped set {sorted(request.dropped)} at step "
                f"{request.step}, but this client answered for {sorted(state.dropped)}"
            )
        partners = state.active - state.pair_revealed
        self._require_holders(len(partners), f"step {request.step} consistency round")
        state.frozen = True
        tokens = {
            peer: keys.consistency_token(self._confirm_keys[peer], session_id=offer.session_id,
                                         step=request.step, owner=self.client_id, holder=peer)
            for peer in sorted(partners)
        }
        self.stage = ClientStage.CONFIRMED
        return ConsistencyReply(offer.session_id, self.client_id, request.step, tokens).encode()

    def _on_share_request(self, request: ShareRequest) -> bytes:
        state = self._current_step(request.step)
        if state.shares_revealed:
            raise ReplayError(f"self-mask shares of step {request.step} were already revealed")
        self._expect(ClientStage.UPLOADED, ClientStage.PAIRWISE_REVEALED, ClientStage.CONFIRMED)
        offer = self._offer
        assert offer is not None
        if self.client_id not in request.survivors:
            raise PolicyViolationError("share request sent to a client it lists as dropped")
        peers = request.survivors - {self.client_id}
        if not peers <= state.active:
            raise PolicyViolationError(
                f"survivors {sorted(peers - state.active)} were not active at step {request.step}"
            )
        both = peers & state.pair_revealed
        if both:
            # Never both: a pair seed for these clients was revealed at this step, so their
            # self-mask shares must stay secret or their masked inputs would be exposed.
            raise PolicyViolationError(
                f"refusing self-mask shares of {sorted(both)}: their pair seeds for step "
                f"{request.step} were already revealed"
            )
        self._require_holders(len(peers), f"step {request.step} share reveal")
        active_model = offer.threat_model == "active"
        if active_model and not state.frozen:
            raise PolicyViolationError(
                f"share request for step {request.step} before this client's consistency round"
            )
        if set(request.envelopes) != peers:
            raise IntegrityError("share request must carry exactly one envelope per survivor")
        if active_model and not set(request.tokens) <= peers:
            raise IntegrityError("share request carries tokens of clients it does not list")
        shares, failed = self._open_shares(request)
        if active_model:
            self._withhold_unconfirmed(request, shares, failed)
        # A sender whose envelope fails is left out: the reply is then exactly what a request
        # naming one survivor fewer would get (never-both was checked for every survivor
        # named, and the t-holders check is repeated on what is revealed), so a forged
        # envelope costs only its sender's share, never the whole reply, and reveals nothing.
        if len(shares) < offer.threshold:
            raise IntegrityError(
                f"envelopes or tokens of {sorted(failed)} failed to verify at step "
                f"{request.step}; the {len(shares)} shares left are fewer than the threshold "
                f"{offer.threshold}"
            ) from next(iter(failed.values()), None)
        self.stage = ClientStage.SHARES_REVEALED
        state.shares_revealed = True
        return ShareReveal(offer.session_id, self.client_id, request.step, shares,
                           shamir.FIELD_256.element_bytes).encode()

    def _withhold_unconfirmed(self, request: ShareRequest, shares: dict[int, bytes],
                              failed: dict[int, ProtocolError]) -> None:
        """Drop the share of every owner whose consistency token for this holder is missing or
        forged: that owner may have revealed its pair seed with this holder (a split view)."""
        assert self._offer is not None
        for owner in sorted(shares):
            token = request.tokens.get(owner)
            try:
                if token is None:
                    raise IntegrityError(f"no consistency token of client {owner}")
                keys.check_consistency_token(
                    self._confirm_keys[owner], token, session_id=self._offer.session_id,
                    step=request.step, owner=owner, holder=self.client_id)
            except IntegrityError as error:
                failed[owner] = error
                del shares[owner]

    def _open_shares(self, request: ShareRequest
                     ) -> tuple[dict[int, bytes], dict[int, ProtocolError]]:
        """The shares whose envelopes open to a field element, and why the others did not."""
        assert self._offer is not None
        shares: dict[int, bytes] = {}
        failed: dict[int, ProtocolError] = {}
        for peer, sealed in sorted(request.envelopes.items()):
            try:
                share = envelope.open_envelope(
                    self._open_keys[peer], sealed, nonce=keys.envelope_nonce(request.step),
                    associated_data=keys.envelope_aad(
                        session_id=self._offer.session_id, step=request.step, sender=peer,
                        receiver=self.client_id),
                )
                shamir.check_share(share, name=f"of client {peer}")  # its sender can seal anything
            except ProtocolError as error:
                failed[peer] = error
                continue
            shares[peer] = share
        return shares, failed
