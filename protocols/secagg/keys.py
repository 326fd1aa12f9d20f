"""Session key schedule: every derived key is bound to session, purpose, pair and step."""

from __future__ import annotations

import hashlib
import hmac

from ..errors import IntegrityError, MalformedMessageError
from ..primitives.kdf import PUBLIC_KEY_BYTES, derive_key, encode_info

_CURVE25519_PRIME = 2**255 - 19
# The u-coordinates below p of Curve25519's points of order 1, 2, 4 and 8 (the list libsodium's
# has_small_order checks; its other entries, p and p + 1, are not canonical). Every X25519 key
# agreement with one of them yields the all-zero secret: a test checks each against
# cryptography's exchange. A set lookup instead of a throwaway exchange: 58 us per key at
# setup adds up to 6 ms for a server of 100 clients.
LOW_ORDER_U = frozenset({
    0, 1, _CURVE25519_PRIME - 1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
})


def check_canonical_key(public_key: bytes) -> None:
    """Refuse a peer's X25519 key unless it is 32 bytes encoding u < p, canonically."""
    if not isinstance(public_key, (bytes, bytearray)) or len(public_key) != PUBLIC_KEY_BYTES:
        raise MalformedMessageError(f"an X25519 public key must be {PUBLIC_KEY_BYTES} raw bytes")
    # X25519 ignores bit 255 and reduces u mod p, so a point has several encodings; accepting
    # only the canonical one makes byte comparison (the copied-key checks) compare points.
    if int.from_bytes(public_key, "little") >= _CURVE25519_PRIME:
        raise IntegrityError("X25519 public key is not canonically encoded")


def check_public_key(public_key: bytes) -> None:
    """Refuse a peer's X25519 key unless it is canonically encoded and not of low order.

    The server runs this on every advertised key. A client needs only check_canonical_key: its
    own key agreement with each neighbour refuses a low-order key anyway.
    """
    check_canonical_key(public_key)
    if int.from_bytes(public_key, "little") in LOW_ORDER_U:
        raise IntegrityError("X25519 public key is a point of low order")


def pair_master_key(shared_secret: bytes, *, session_id: bytes, a: int, b: int) -> bytes:
    """Long-term (one session) pair key; it never leaves the two clients that agreed on it."""
    low, high = sorted((a, b))
    return derive_key(
        shared_secret, session_id=session_id, purpose="pair-mask", context=(low, high)
    )


def pair_step_seed(master: bytes, *, session_id: bytes, step: int) -> bytes:
    """Per-step pair mask seed; revealing it discloses this step's pair mask and nothing else."""
    return derive_key(master, session_id=session_id, purpose="pair-mask-step", context=(step,))


def envelope_key(shared_secret: bytes, *, session_id: bytes, sender: int, receiver: int) -> bytes:
    """Directed AES-GCM key for shares sent from `sender` to `receiver` through the server."""
    return derive_key(
        shared_secret, session_id=session_id, purpose="share-envelope", context=(sender, receiver)
    )


def envelope_nonce(step: int) -> bytes:
    """One envelope per directed pair and step, so the step number is a unique nonce."""
    return step.to_bytes(12, "big")


def envelope_aad(*, session_id: bytes, step: int, sender: int, receiver: int) -> bytes:
    """Associated data binding an envelope to its session, step, sender and receiver."""
    return encode_info("self-mask-share", session_id, step, sender, receiver)


def confirmation_key(shared_secret: bytes, *, session_id: bytes, a: int, b: int) -> bytes:
    """Pair key for consistency tokens: only the two clients can compute it, never the server."""
    low, high = sorted((a, b))
    return derive_key(
        shared_secret, session_id=session_id, purpose="consistency-token", context=(low, high)
    )


def consistency_token(key: bytes, *, session_id: bytes, step: int, owner: int,
                      holder: int) -> bytes:
    """HMAC-SHA256 token of `owner` for `holder`: owner never reveals their pair seed at step.

    Ordered (owner, holder): the token one client issues cannot pass as its partner's.
    """
    message = encode_info("consistency", session_id, step, owner, holder)
    return hmac.new(key, message, hashlib.sha256).digest()


def check_consistency_token(key: bytes, token: bytes, *, session_id: bytes, step: int,
                            owner: int, holder: int) -> None:
    """Raise IntegrityError unless `token` is owner's token for holder (constant-time compare)."""
    expected = consistency_token(key, session_id=session_id, step=step, owner=owner,
                                 holder=holder)
    if not hmac.compare_digest(expected, token):
        raise IntegrityError(f"consistency token of client {owner} does not verify")


def pair_sign(own: int, peer: int) -> int:
    """The lower id adds the pair mask, the higher id subtracts it, so the pair cancels."""
    return 1 if own < peer else -1
