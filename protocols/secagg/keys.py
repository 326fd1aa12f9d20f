"""Session key schedule: every derived key is bound to session, purpose, pair and step."""

from __future__ import annotations

from ..primitives.kdf import derive_key, encode_info


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


def pair_sign(own: int, peer: int) -> int:
    """The lower id adds the pair mask, the higher id subtracts it, so the pair cancels."""
    return 1 if own < peer else -1
