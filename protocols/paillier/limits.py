"""What a Paillier party reads: an offer within the client's OfferLimits, and messages no longer
than the session's public parameters allow (checked on the header, before the body is decoded).

A client sizes nothing by an offer's n or m when it accepts it (packing and encryption follow
the caller's vector), so its OfferLimits are the deployment's policy on what it joins; what
bounds allocation are the message limits, since a decoder builds one integer per field it reads.
"""

from __future__ import annotations

from ..errors import ParameterError
from ..limits import MAX_KEY_BITS, MessageSizes, OfferLimits, encoded_size
from .messages import (
    AUTH_KEY_BYTES,
    ROUNDING_MODES,
    SESSION_ID_BYTES,
    TAG_BYTES,
    Ciphertexts,
    ClientKey,
    Offer,
    PublicKeyMessage,
    StepRequest,
    UploadBundle,
    int_width,
)

__all__ = [
    "check_offer", "client_sizes", "key_holder_sizes", "offer_sizes", "residue_width",
    "sum_sizes", "upload_sizes",
]

_SID, _KEY = bytes(SESSION_ID_BYTES), bytes(AUTH_KEY_BYTES)
_ID, _FRAME = 4, 8  # an id in a member list; the length before each upload of a bundle


def residue_width(modulus: int) -> int:
    """Bytes of any residue mod N^2: the width of every ciphertext."""
    return -(-(2 * modulus.bit_length()) // 8)


def check_offer(limits: OfferLimits, offer: Offer) -> None:
    """Raise ParameterError naming the first field of `offer` outside `limits`."""
    limits.check_clients(offer.n_clients)
    if offer.client_id >= offer.n_clients:
        raise ParameterError(f"client_id {offer.client_id} is not valid for "
                             f"{offer.n_clients} clients")
    limits.check_vector_length(offer.vector_length)
    limits.check_key_bits(offer.modulus.bit_length())


def offer_sizes() -> MessageSizes:
    """The setup messages with the largest modulus a message carries: the offer a client reads,
    and the public key a server reads (a smaller OfferLimits.max_key_bits is checked after)."""
    modulus = (1 << MAX_KEY_BITS) - 1
    offer = Offer(_SID, 0, 2, 1, 1.0, 0, 32, ROUNDING_MODES[0], 0, 0, modulus, _KEY)
    key = PublicKeyMessage(_SID, modulus, _KEY)
    return MessageSizes({Offer.TYPE: encoded_size(offer), PublicKeyMessage.TYPE: encoded_size(key)})


def client_sizes() -> MessageSizes:
    """What a client reads once it has its offer: step requests."""
    return MessageSizes({StepRequest.TYPE: encoded_size(StepRequest(_SID, 0))})


def _upload_size(modulus: int, ciphertexts: int) -> int:
    empty = Ciphertexts(_SID, 0, Ciphertexts.UPLOAD, frozenset({0}), 1, (), bytes(TAG_BYTES))
    return encoded_size(empty) + ciphertexts * residue_width(modulus)


def upload_sizes(*, modulus: int, ciphertexts: int) -> MessageSizes:
    """What a server reads from a client: one upload of `ciphertexts` residues mod N^2."""
    return MessageSizes({Ciphertexts.TYPE: _upload_size(modulus, ciphertexts)})


def sum_sizes(*, n_clients: int, modulus: int, ciphertexts: int) -> MessageSizes:
    """What a server reads from the key holder: the plaintexts of a sum of up to n members."""
    empty = Ciphertexts(_SID, 0, Ciphertexts.PLAINTEXT, frozenset(), 1, ())
    return MessageSizes({Ciphertexts.TYPE: encoded_size(empty) + n_clients * _ID
                         + ciphertexts * int_width(modulus)})


def key_holder_sizes(*, n_clients: int, modulus: int, ciphertexts: int) -> MessageSizes:
    """What a key holder reads: client keys, and bundles of up to n uploads."""
    upload = _FRAME + _upload_size(modulus, ciphertexts)
    return MessageSizes({ClientKey.TYPE: encoded_size(ClientKey(_SID, 0, _KEY)),
                         UploadBundle.TYPE: encoded_size(UploadBundle(_SID, 0, ()))
                         + n_clients * upload})
