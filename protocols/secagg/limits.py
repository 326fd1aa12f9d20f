"""The largest session a client joins and the largest message each party reads.

Both are checked before anything proportional to them is allocated: an offer of 2^32 clients is
refused by its numbers, not by a MemoryError after seconds of graph building, and an oversized
message by its length, before its body is decoded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import MalformedMessageError, ParameterError
from ..inputs import check_count
from ..primitives import envelope, shamir
from ..wire import MAX_VECTOR, message_type
from .messages import (
    GRAPH_SEED_BYTES,
    PUBLIC_KEY_BYTES,
    SEED_BYTES,
    SESSION_ID_BYTES,
    TOKEN_BYTES,
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

__all__ = [
    "DEFAULT_MAX_CLIENTS", "DEFAULT_MAX_VECTOR_LENGTH", "SEALED_SHARE_BYTES", "MessageSizes",
    "OfferLimits", "validate_threshold",
]

DEFAULT_MAX_CLIENTS = 100_000
DEFAULT_MAX_VECTOR_LENGTH = 1 << 28  # 1 GiB of 32-bit ring words per upload
SEALED_SHARE_BYTES = shamir.FIELD_256.element_bytes + envelope.TAG_BYTES  # one share, GCM-sealed
_ID, _KEYED = 4, 4  # an id in a list; the key of a keyed entry
_BLOB_HEAD = 8  # a blob's key and length


def validate_threshold(threshold: int, degree: int, n_clients: int) -> None:
    """Shares go to a client's neighbours (never to itself), so 1 <= t <= degree."""
    holders = min(degree, n_clients - 1)
    if not 1 <= threshold <= holders:
        raise ParameterError(
            f"threshold {threshold} must be between 1 and the number of share holders {holders} "
            f"(the graph degree)"
        )


@dataclass(frozen=True)
class OfferLimits:
    """The largest session a client takes part in (a deployment's choice; defaults below).

    Degrees and thresholds are bounded through `max_degree` (a threshold never exceeds the
    degree); the defaults admit the complete graph on every cohort `max_clients` admits.
    """

    max_clients: int = DEFAULT_MAX_CLIENTS
    max_degree: int = DEFAULT_MAX_CLIENTS - 1
    max_vector_length: int = DEFAULT_MAX_VECTOR_LENGTH

    def __post_init__(self) -> None:
        check_count("OfferLimits.max_clients", self.max_clients, low=2)
        check_count("OfferLimits.max_degree", self.max_degree)
        check_count("OfferLimits.max_vector_length", self.max_vector_length)
        if self.max_vector_length > MAX_VECTOR:
            raise ParameterError(f"OfferLimits.max_vector_length must be at most {MAX_VECTOR} "
                                 f"(what a message can carry), got {self.max_vector_length}")

    def check(self, offer: SessionOffer) -> None:
        """Raise ParameterError naming the first field of `offer` that is out of range.

        Reads only the offer's numbers: nothing here grows with them.
        """
        self.check_session(n_clients=offer.n_clients, degree=offer.degree,
                           threshold=offer.threshold, vector_length=offer.vector_length)
        if offer.client_id >= offer.n_clients:
            raise ParameterError(f"client_id {offer.client_id} is not valid for "
                                 f"{offer.n_clients} clients")

    def check_session(self, *, n_clients: int, degree: int, threshold: int,
                      vector_length: int) -> None:
        """The same check on a session's parameters (a server refuses what clients would)."""
        n = n_clients
        if not 2 <= n <= self.max_clients:
            raise ParameterError(f"n_clients must be in [2, {self.max_clients}] "
                                 f"(OfferLimits.max_clients), got {n}")
        if degree > self.max_degree:
            raise ParameterError(f"degree must be at most {self.max_degree} "
                                 f"(OfferLimits.max_degree), got {degree}")
        if degree != n - 1 and (degree % 2 or not 2 <= degree < n - 1):
            raise ParameterError(f"degree must be even in [2, n-2] or exactly n-1 = {n - 1}, "
                                 f"got {degree}")
        validate_threshold(threshold, degree, n)
        if not 1 <= vector_length <= self.max_vector_length:
            raise ParameterError(f"vector_length must be in [1, {self.max_vector_length}] "
                                 f"(OfferLimits.max_vector_length), got {vector_length}")


class _Encodes(Protocol):
    def encode(self) -> bytes: ...


def _empty_size(message: _Encodes) -> int:
    return len(message.encode())


_SID = bytes(SESSION_ID_BYTES)


@dataclass(frozen=True)
class MessageSizes:
    """The longest encoding each message type can have in one session; longer ones are refused
    before decoding. Built from the public parameters every party knows (n, degree, m, ring)."""

    limits: Mapping[int, int] = field(default_factory=dict)

    @classmethod
    def before_offer(cls) -> MessageSizes:
        """What a client reads before it has an offer: the offer itself."""
        offer = SessionOffer(_SID, 0, 2, 1, 1, bytes(GRAPH_SEED_BYTES), 32, 0, 1.0, 1)
        return cls({SessionOffer.TYPE: _empty_size(offer)})

    @classmethod
    def for_session(cls, *, n_clients: int, degree: int, vector_length: int,
                    ring_bits: int) -> MessageSizes:
        """Every message of a session with these parameters (k = min(degree, n - 1) entries)."""
        k = min(degree, n_clients - 1)
        word = 8 if ring_bits > 32 else 4
        seal = _BLOB_HEAD + SEALED_SHARE_BYTES
        none: frozenset[int] = frozenset()
        no_vector = np.zeros(0, np.uint32)
        sizes = {
            SessionOffer.TYPE: cls.before_offer().limits[SessionOffer.TYPE],
            KeyAdvertisement.TYPE: _empty_size(KeyAdvertisement(_SID, 0, bytes(PUBLIC_KEY_BYTES))),
            Roster.TYPE: _empty_size(Roster(_SID, 0, {})) + k * (_KEYED + PUBLIC_KEY_BYTES),
            StepRequest.TYPE: _empty_size(StepRequest(_SID, 0, none)) + k * _ID,
            MaskedInput.TYPE: (_empty_size(MaskedInput(_SID, 0, 0, no_vector, {}))
                               + word * vector_length + k * seal),
            DropRequest.TYPE: _empty_size(DropRequest(_SID, 0, none)) + k * _ID,
            PairwiseReveal.TYPE: (_empty_size(PairwiseReveal(_SID, 0, 0, {}))
                                  + k * (_KEYED + SEED_BYTES)),
            ConsistencyRequest.TYPE: _empty_size(ConsistencyRequest(_SID, 0, none)) + k * _ID,
            ConsistencyReply.TYPE: (_empty_size(ConsistencyReply(_SID, 0, 0, {}))
                                    + k * (_KEYED + TOKEN_BYTES)),
            ShareRequest.TYPE: (_empty_size(ShareRequest(_SID, 0, none, {}))
                                + (k + 1) * _ID + k * (seal + _KEYED + TOKEN_BYTES)),
            ShareReveal.TYPE: (_empty_size(ShareReveal(_SID, 0, 0, {}))
                               + k * (_KEYED + shamir.FIELD_256.element_bytes)),
        }
        return cls(sizes)

    def check(self, data: bytes, *, expected: int | None = None) -> None:
        """Raise MalformedMessageError unless `data` is bytes no longer than the limit of its
        type (of `expected`, when the reader knows what it waits for).

        Reads the 6-byte header only; a type these limits do not list is refused here too.
        """
        code = message_type(data)  # refuses what is not bytes
        limit = self.limits.get(code if expected is None else expected)
        if limit is None:
            raise MalformedMessageError(f"message type {code} is not accepted here")
        size = len(data)
        if size > limit:
            raise MalformedMessageError(f"message of type {code} is {size} bytes, more than "
                                        f"the {limit} this session's parameters allow")
