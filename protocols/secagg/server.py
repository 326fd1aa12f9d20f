"""SecAgg server state machine: routes shares, removes masks, outputs only the sum."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import numpy as np

from ..codec import FixedPointCodec
from ..errors import (
    ConsistencyAbortError,
    IntegrityError,
    MalformedMessageError,
    ParameterError,
    ProtocolError,
    StageError,
    TooFewSurvivorsError,
)
from ..graph import NeighbourGraph
from ..inputs import check_count
from ..primitives import prg, shamir
from ..session import StepOutcome
from ..wire import MAX_VECTOR
from . import keys
from .limits import SEALED_SHARE_BYTES, session_sizes, validate_threshold
from .messages import (
    SESSION_ID_BYTES,
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
)


class ServerStage(Enum):
    """What the server waits for next."""

    NEW = "new"
    KEYS = "collecting-keys"
    READY = "ready"
    INPUTS = "collecting-inputs"
    PAIRWISE = "collecting-pair-seeds"
    CONSISTENCY = "collecting-consistency-tokens"
    SHARES = "collecting-shares"


Unmasker = Callable[[Sequence[np.ndarray], Sequence[tuple[bytes, int]], FixedPointCodec],
                   np.ndarray]
"""(uploads, [(seed, sign)], codec) -> sum(uploads) + sum sign * PRG(seed), reduced mod 2^k."""

_Reply = TypeVar("_Reply", KeyAdvertisement, MaskedInput, PairwiseReveal, ConsistencyReply,
                 ShareReveal)


def host_unmask(uploads: Sequence[np.ndarray], signed_seeds: Sequence[tuple[bytes, int]],
                codec: FixedPointCodec) -> np.ndarray:
    """The server's ring sum of the uploads with the rebuilt masks added (sign +1) or removed."""
    total = np.zeros(uploads[0].shape, dtype=codec.dtype)
    for upload in uploads:
        np.add(total, upload, out=total)
    prg.add_uniform_rings(total, signed_seeds, ring_bits=codec.ring_bits, algorithm=codec.prg)
    return total


@dataclass
class _ServerStep:
    step: int
    active: frozenset[int]
    inputs: dict[int, MaskedInput] = field(default_factory=dict)
    survivors: set[int] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)
    pair_seeds: dict[tuple[int, int], bytes] = field(default_factory=dict, repr=False)
    asked: set[int] = field(default_factory=set)
    tokens: dict[tuple[int, int], bytes] = field(default_factory=dict, repr=False)


class SecAggServer:
    """Honest-but-curious aggregator; `receive` takes the replies that arrived before a deadline.

    Replies are keyed by the sender id that the (authenticated) transport vouches for. A reply
    that fails to decode or validate excludes its sender, as a dropout would; the reason is kept
    in `rejections`. `unmasker` does the vector work of the last stage elsewhere (e.g. on a GPU,
    codream_secure.gpu.masking.protocol_unmasker); it must return what `host_unmask` returns.
    `threat_model` "active" (the default) runs the consistency round before the share round;
    "semi-honest" skips it and is safe only against a server that follows the protocol.
    """

    def __init__(self, *, graph: NeighbourGraph, threshold: int, codec: FixedPointCodec,
                 vector_length: int, session_id: bytes | None = None,
                 unmasker: Unmasker | None = None, threat_model: str = "active") -> None:
        if threat_model not in THREAT_MODELS:
            raise ParameterError(f"threat_model must be one of {', '.join(THREAT_MODELS)}, "
                                 f"got {threat_model!r}")
        self.threat_model = threat_model
        self.vector_length = check_count("vector_length", vector_length)
        if self.vector_length > MAX_VECTOR:  # a message cannot carry more
            raise ParameterError(f"vector_length must be at most {MAX_VECTOR}, got "
                                 f"{vector_length}")
        validate_threshold(threshold, graph.degree, graph.n)
        codec.check_budget(graph.n)
        self.graph, self.threshold, self.codec = graph, threshold, codec
        self._sizes = session_sizes(n_clients=graph.n, degree=graph.degree,
                                               vector_length=self.vector_length,
                                               ring_bits=codec.ring_bits)
        self.session_id = session_id or os.urandom(SESSION_ID_BYTES)
        self.stage = ServerStage.NEW
        self.active: frozenset[int] = frozenset()
        self.public_keys: dict[int, bytes] = {}
        self.rejections: list[tuple[int, int, ProtocolError]] = []
        self.last_step = 0
        self._step: _ServerStep | None = None
        self._unmask = host_unmask if unmasker is None else unmasker

    # -- setup --------------------------------------------------------------------------------

    def open_session(self) -> dict[int, bytes]:
        """Offer the session to all n clients."""
        self._expect(ServerStage.NEW)
        self.stage = ServerStage.KEYS
        return {
            cid: SessionOffer(
                self.session_id, cid, self.graph.n, self.graph.degree, self.threshold,
                self.graph.seed, self.codec.ring_bits, self.codec.scale_bits, self.codec.clip,
                self.vector_length, self.codec.rounding, self.codec.prg, self.threat_model,
            ).encode()
            for cid in range(self.graph.n)
        }

    def receive(self, replies: Mapping[int, bytes]) -> dict[int, bytes] | StepOutcome:
        """Feed the replies of the current stage; returns the next requests or the outcome."""
        handlers: dict[ServerStage, Callable[[Mapping[int, bytes]], dict[int, bytes] | StepOutcome]]
        handlers = {
            ServerStage.KEYS: self._receive_keys,
            ServerStage.INPUTS: self._receive_inputs,
            ServerStage.PAIRWISE: self._receive_pairwise,
            ServerStage.CONSISTENCY: self._receive_consistency,
            ServerStage.SHARES: self._receive_shares,
        }
        handler = handlers.get(self.stage)
        if handler is None:
            raise StageError(f"the server expects no replies in stage {self.stage.value}")
        return handler(replies)

    def _expect(self, *stages: ServerStage) -> None:
        if self.stage not in stages:
            raise StageError(f"server is in stage {self.stage.value}, not "
                             + " or ".join(s.value for s in stages))

    def _reject(self, cid: int, error: ProtocolError) -> None:
        self.rejections.append((self.last_step, cid, error))

    def _decode(self, replies: Mapping[int, bytes], cls: type[_Reply],
                pool: frozenset[int] | set[int], step: int | None = None) -> dict[int, _Reply]:
        """Decode and check the envelope of each reply; bad ones are rejected, not fatal."""
        good: dict[int, _Reply] = {}
        for cid, data in replies.items():
            if cid not in pool:
                continue  # not asked: a stray or late message is ignored, never used
            try:
                self._sizes.check(data, expected=cls.TYPE)  # by its length, before decoding
                extra = {"max_length": self.vector_length} if cls is MaskedInput else {}
                msg: Any = cls.decode(data, **extra)  # only MaskedInput takes max_length
                if msg.session_id != self.session_id or msg.client_id != cid:
                    raise IntegrityError(f"reply from client {cid} names another session/sender")
                if step is not None and msg.step != step:
                    raise StageError(f"reply for step {msg.step} during step {step}")
            except ProtocolError as error:
                self._reject(cid, error)
                continue
            good[cid] = msg
        return good

    def _keep_protectable(self, members: set[int], pool: frozenset[int]) -> set[int]:
        """Drop members with fewer than t live share holders until every remaining one has t."""
        members = set(members)
        changed = True
        while changed:
            changed = False
            for cid in sorted(members):
                holders = self.graph.neighbours(cid) & pool & members
                if len(holders) < self.threshold:
                    members.discard(cid)
                    changed = True
        return members

    def _receive_keys(self, replies: Mapping[int, bytes]) -> dict[int, bytes]:
        everyone = frozenset(range(self.graph.n))
        adverts = self._decode(replies, KeyAdvertisement, everyone)
        seen: dict[bytes, int] = {}
        for cid, msg in sorted(adverts.items()):
            try:
                # a low-order key would make every honest neighbour refuse the roster
                keys.check_public_key(msg.public_key)
                if msg.public_key in seen:  # a copied key would let one client unmask another
                    raise IntegrityError(f"client {cid} reused the key of {seen[msg.public_key]}")
            except ProtocolError as error:
                self._reject(cid, error)
                continue
            seen[msg.public_key] = cid
            self.public_keys[cid] = msg.public_key
        members = self._keep_protectable(set(self.public_keys), everyone)
        self._require(len(members), len(self.public_keys), "key advertisement")
        self.active = frozenset(members)
        self.stage = ServerStage.READY
        return {
            cid: Roster(self.session_id, cid, {
                peer: self.public_keys[peer] for peer in self.graph.neighbours(cid) & self.active
            }).encode()
            for cid in sorted(self.active)
        }

    def _require(self, kept: int, alive: int, context: str) -> None:
        """Raise when fewer than t clients can be protected; `alive` is who actually answered."""
        if kept >= self.threshold:
            return
        if alive >= self.threshold:
            context += f"; {alive} answered but only {kept} have t live share holders"
            alive = kept
        raise TooFewSurvivorsError(needed=self.threshold, remaining=alive, context=context)

    # -- one aggregation step -----------------------------------------------------------------

    def open_step(self) -> dict[int, bytes]:
        """Start the next step with every client still active."""
        self._expect(ServerStage.READY)
        self.last_step += 1
        self._step = _ServerStep(self.last_step, self.active)
        self.stage = ServerStage.INPUTS
        return {
            cid: StepRequest(self.session_id, self.last_step,
                             self.graph.neighbours(cid) & self.active).encode()
            for cid in sorted(self.active)
        }

    def _receive_inputs(self, replies: Mapping[int, bytes]) -> dict[int, bytes]:
        st = self._step
        assert st is not None
        for cid, msg in self._decode(replies, MaskedInput, st.active, st.step).items():
            expected = self.graph.neighbours(cid) & st.active
            try:
                if msg.vector.size != self.vector_length:
                    raise IntegrityError(f"client {cid} sent {msg.vector.size} values, "
                                         f"expected {self.vector_length}")
                if msg.vector.dtype.itemsize != self.codec.dtype.itemsize:
                    raise IntegrityError(f"client {cid} sent a vector of the wrong word size")
                if set(msg.envelopes) != expected:
                    raise IntegrityError(f"client {cid} sent envelopes for the wrong holders")
                self._check_envelope_sizes(cid, msg.envelopes)
            except ProtocolError as error:
                self._reject(cid, error)
                continue
            st.inputs[cid] = msg
        st.survivors = set(st.inputs)
        return self._settle_dropouts()

    @staticmethod
    def _check_envelope_sizes(cid: int, envelopes: Mapping[int, bytes]) -> None:
        """The server cannot open envelopes, but it can refuse any of the wrong size."""
        bad = sorted(h for h, sealed in envelopes.items() if len(sealed) != SEALED_SHARE_BYTES)
        if bad:
            raise IntegrityError(f"client {cid} sent envelopes for {bad} that are not "
                                 f"{SEALED_SHARE_BYTES} bytes")

    def _settle_dropouts(self) -> dict[int, bytes]:
        """Ask survivors for pair seeds of dropped neighbours until none are missing."""
        st = self._step
        assert st is not None
        kept = self._keep_protectable(st.survivors, st.active)
        self._require(len(kept), len(st.survivors), f"step {st.step}")
        st.survivors = kept
        st.dropped = set(st.active) - kept
        requests = {}
        for cid in sorted(st.survivors):
            wanted = self.graph.neighbours(cid) & st.dropped
            if any((cid, peer) not in st.pair_seeds for peer in wanted):
                requests[cid] = DropRequest(self.session_id, st.step, frozenset(wanted)).encode()
        if requests:
            self.stage = ServerStage.PAIRWISE
            st.asked = set(requests)
            return requests
        if self.threat_model == "active":
            return self._request_consistency()
        return self._request_shares()

    def _receive_pairwise(self, replies: Mapping[int, bytes]) -> dict[int, bytes]:
        st = self._step
        assert st is not None
        answered = set()
        for cid, msg in self._decode(replies, PairwiseReveal, st.asked, st.step).items():
            wanted = self.graph.neighbours(cid) & st.dropped
            missing = {p for p in wanted if (cid, p) not in st.pair_seeds} - set(msg.seeds)
            if missing or not set(msg.seeds) <= wanted:
                self._reject(cid, IntegrityError(f"client {cid} revealed the wrong pair seeds"))
                continue
            for peer, seed in msg.seeds.items():
                st.pair_seeds[(cid, peer)] = seed
            answered.add(cid)
        st.survivors -= st.asked - answered  # silent survivors become dropouts of this step
        return self._settle_dropouts()

    def _request_consistency(self) -> dict[int, bytes]:
        """Tell every survivor the final dropped set of its neighbours; it freezes and vouches."""
        st = self._step
        assert st is not None
        self.stage = ServerStage.CONSISTENCY
        st.asked = set(st.survivors)
        return {
            cid: ConsistencyRequest(self.session_id, st.step,
                                    frozenset(self.graph.neighbours(cid) & st.dropped)).encode()
            for cid in sorted(st.survivors)
        }

    def _receive_consistency(self, replies: Mapping[int, bytes]) -> dict[int, bytes]:
        """Keep each survivor's tokens; a silent survivor makes the step unfinishable.

        Its shares cannot be released without its tokens, and its neighbours have frozen
        their dropped sets, so its pair masks cannot be removed either.
        """
        st = self._step
        assert st is not None
        answered = set()
        for cid, msg in self._decode(replies, ConsistencyReply, st.asked, st.step).items():
            if set(msg.tokens) != self.graph.neighbours(cid) & st.survivors:
                self._reject(cid, IntegrityError(f"client {cid} sent tokens for the wrong "
                                                 "neighbours"))
                continue
            for holder, token in msg.tokens.items():
                st.tokens[(cid, holder)] = token
            answered.add(cid)
        silent = st.survivors - answered
        if silent:
            st.survivors -= silent  # abandon_step keeps them out of the next step
            raise ConsistencyAbortError(step=st.step, silent=frozenset(silent))
        return self._request_shares()

    def _request_shares(self) -> dict[int, bytes]:
        st = self._step
        assert st is not None
        self.stage = ServerStage.SHARES
        requests = {}
        for cid in sorted(st.survivors):
            peers = self.graph.neighbours(cid) & st.survivors
            envelopes = {peer: st.inputs[peer].envelopes[cid] for peer in peers}
            tokens = {peer: st.tokens[(peer, cid)] for peer in peers if (peer, cid) in st.tokens}
            requests[cid] = ShareRequest(self.session_id, st.step, frozenset(peers | {cid}),
                                         envelopes, tokens).encode()
        return requests

    def _receive_shares(self, replies: Mapping[int, bytes]) -> StepOutcome:
        st = self._step
        assert st is not None
        collected: dict[int, dict[int, bytes]] = {cid: {} for cid in st.survivors}
        for holder, msg in self._decode(replies, ShareReveal, st.survivors, st.step).items():
            try:
                self._check_reveal(holder, msg)
            except ProtocolError as error:
                self._reject(holder, error)  # its shares are left out, as a silent holder's are
                continue
            for owner, share in msg.shares.items():
                collected[owner][holder + 1] = share
        signed_seeds: list[tuple[bytes, int]] = []
        for cid in sorted(st.survivors):
            try:
                seed = shamir.combine(collected[cid], threshold=self.threshold)
            except TooFewSurvivorsError as error:
                raise TooFewSurvivorsError(
                    needed=self.threshold, remaining=error.remaining,
                    context=f"share holders of client {cid} at step {st.step}",
                ) from None
            signed_seeds.append((seed, -1))  # the survivor's self mask
            # a dropped peer's pair mask, which cid added with sign pair_sign(cid, peer)
            signed_seeds += [(st.pair_seeds[(cid, peer)], -keys.pair_sign(cid, peer))
                             for peer in sorted(self.graph.neighbours(cid) & st.dropped
                                                & st.active)]
        total = self._unmasked_total([st.inputs[c].vector for c in sorted(st.survivors)],
                                     signed_seeds)
        outcome = StepOutcome(
            st.step, self.codec.decode_sum(total, n_summed=len(st.survivors)), total,
            frozenset(st.survivors), frozenset(st.dropped),
        )
        self.active = frozenset(st.survivors)
        self._step = None
        self.stage = ServerStage.READY
        return outcome

    def _check_reveal(self, holder: int, msg: ShareReveal) -> None:
        """Every share is a full-width field element of a surviving neighbour's seed.

        A holder leaves out an owner whose envelope did not open (forged by that owner), so
        the shares may be fewer than the owners, never more.
        """
        st = self._step
        assert st is not None
        strangers = set(msg.shares) - (self.graph.neighbours(holder) & st.survivors)
        if strangers:
            raise IntegrityError(f"client {holder} revealed shares of {sorted(strangers)}, who "
                                 "are not its surviving neighbours")
        if msg.share_bytes != shamir.FIELD_256.element_bytes:
            raise MalformedMessageError(f"client {holder} sent {msg.share_bytes}-byte shares")
        for owner, share in msg.shares.items():
            shamir.check_share(share, name=f"of client {owner} from client {holder}")

    def _unmasked_total(self, uploads: list[np.ndarray],
                        signed_seeds: list[tuple[bytes, int]]) -> np.ndarray:
        total = np.asarray(self._unmask(uploads, signed_seeds, self.codec))
        if total.dtype != self.codec.dtype or total.shape != (self.vector_length,):
            raise ParameterError(f"the unmasker returned {total.shape} {total.dtype}; the "
                                 f"protocol needs ({self.vector_length},) {self.codec.dtype}")
        return total

    def abandon_step(self) -> None:
        """Give up a failed step; its survivors stay active and the next step starts afresh.

        Safe because every secret revealed during a step is specific to that step.
        """
        if self._step is not None:
            self.active = frozenset(self._step.survivors)
            self._step = None
        self.stage = ServerStage.READY
