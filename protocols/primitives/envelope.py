"""AES-256-GCM envelopes: authenticated encryption of Shamir shares the server relays."""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocols.errors import IntegrityError, ParameterError

__all__ = ["KEY_BYTES", "NONCE_BYTES", "TAG_BYTES", "open_envelope", "seal"]

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


def _is_bytes(value: object, size: int | None = None) -> bool:
    return isinstance(value, (bytes, bytearray)) and (size is None or len(value) == size)


def seal(key: bytes, plaintext: bytes, *, nonce: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM encryption: ciphertext || 16-byte tag, bound to associated_data."""
    if not _is_bytes(key, KEY_BYTES):
        raise ParameterError(f"envelope key must be {KEY_BYTES} bytes")
    if not _is_bytes(nonce, NONCE_BYTES):
        raise ParameterError(f"envelope nonce must be {NONCE_BYTES} bytes")
    if not _is_bytes(plaintext) or not _is_bytes(associated_data):
        raise ParameterError("plaintext and associated_data must be bytes")
    return AESGCM(bytes(key)).encrypt(bytes(nonce), bytes(plaintext), bytes(associated_data))


def open_envelope(key: bytes, ciphertext: bytes, *, nonce: bytes, associated_data: bytes) -> bytes:
    """Authenticated decryption of seal's output; any failure raises IntegrityError."""
    # A wrong key or nonce size can only come from a peer's bytes here, so it is an integrity
    # failure like a bad tag, and callers handle one exception.
    if not _is_bytes(key, KEY_BYTES):
        raise IntegrityError(f"envelope key must be {KEY_BYTES} bytes")
    if not _is_bytes(nonce, NONCE_BYTES):
        raise IntegrityError(f"envelope nonce must be {NONCE_BYTES} bytes")
    if not _is_bytes(ciphertext) or len(ciphertext) < TAG_BYTES:
        raise IntegrityError("envelope is shorter than its authentication tag")
    if not _is_bytes(associated_data):
        raise IntegrityError("associated_data must be bytes")
    try:
        return AESGCM(bytes(key)).decrypt(bytes(nonce), bytes(ciphertext), bytes(associated_data))
    except InvalidTag as exc:
        message = "envelope failed authentication (tampered, or wrong key/nonce/AD)"
        raise IntegrityError(message) from exc
