"""SecAgg's checks of an offer against the client's OfferLimits, and its message size limits.

The limits themselves are shared by every aggregator (protocols/limits.py); what an offer of
pairwise masks adds is its graph (degree, threshold), and its messages' longest encodings.
"""

from __future__ import annotations

import numpy as np

from ..errors import ParameterError
from ..limits import MessageSizes, OfferLimits, encoded_size
from ..primitives import envelope, shamir
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
    "SEALED_SHARE_BYTES", "check_offer", "check_session", "session_sizes", "sizes_before_offer",
    "validate_threshold",
]

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


def check_offer(limits: OfferLimits, offer: SessionOffer) -> None:
    """Raise ParameterError naming the first field of `offer` outside `limits`.

    Reads only the offer's numbers: nothing here grows with them.
    """
    check_session(limits, n_clients=offer.n_clients, degree=offer.degree,
                  threshold=offer.threshold, vector_length=offer.vector_length)
    if offer.client_id >= offer.n_clients:
        raise ParameterError(f"client_id {offer.client_id} is not valid for "
                             f"{offer.n_clients} clients")


def check_session(limits: OfferLimits, *, n_clients: int, degree: int, threshold: int,
                  vector_length: int) -> None:
    """The same check on a session's parameters (a server refuses what clients would)."""
    n = n_clients
    limits.check_clients(n)
    limits.check_degree(degree)
    if degree != n - 1 and (degree % 2 or not 2 <= degree < n - 1):
        raise ParameterError(f"degree must be even in [2, n-2] or exactly n-1 = {n - 1}, "
                             f"got {degree}")
    validate_threshold(threshold, degree, n)
    limits.check_vector_length(vector_length)


_SID = bytes(SESSION_ID_BYTES)


def sizes_before_offer() -> MessageSizes:
    """What a client reads before it has an offer: the offer itself."""
    offer = SessionOffer(_SID, 0, 2, 1, 1, bytes(GRAPH_SEED_BYTES), 32, 0, 1.0, 1)
    return MessageSizes({SessionOffer.TYPE: encoded_size(offer)})


def session_sizes(*, n_clients: int, degree: int, vector_length: int,
                  ring_bits: int) -> MessageSizes:
    """Every message of a session with these parameters (k = min(degree, n - 1) entries)."""
    k = min(degree, n_clients - 1)
    word = 8 if ring_bits > 32 else 4
    seal = _BLOB_HEAD + SEALED_SHARE_BYTES
    none: frozenset[int] = frozenset()
    no_vector = np.zeros(0, np.uint32)
    sizes = {
        SessionOffer.TYPE: sizes_before_offer().limits[SessionOffer.TYPE],
        KeyAdvertisement.TYPE: encoded_size(KeyAdvertisement(_SID, 0, bytes(PUBLIC_KEY_BYTES))),
        Roster.TYPE: encoded_size(Roster(_SID, 0, {})) + k * (_KEYED + PUBLIC_KEY_BYTES),
        StepRequest.TYPE: encoded_size(StepRequest(_SID, 0, none)) + k * _ID,
        MaskedInput.TYPE: (encoded_size(MaskedInput(_SID, 0, 0, no_vector, {}))
                           + word * vector_length + k * seal),
        DropRequest.TYPE: encoded_size(DropRequest(_SID, 0, none)) + k * _ID,
        PairwiseReveal.TYPE: (encoded_size(PairwiseReveal(_SID, 0, 0, {}))
                              + k * (_KEYED + SEED_BYTES)),
        ConsistencyRequest.TYPE: encoded_size(ConsistencyRequest(_SID, 0, none)) + k * _ID,
        ConsistencyReply.TYPE: (encoded_size(ConsistencyReply(_SID, 0, 0, {}))
                                + k * (_KEYED + TOKEN_BYTES)),
        ShareRequest.TYPE: (encoded_size(ShareRequest(_SID, 0, none, {}))
                            + (k + 1) * _ID + k * (seal + _KEYED + TOKEN_BYTES)),
        ShareReveal.TYPE: (encoded_size(ShareReveal(_SID, 0, 0, {}))
                           + k * (_KEYED + shamir.FIELD_256.element_bytes)),
    }
    return MessageSizes(sizes)
