"""X25519 key agreement and HKDF-SHA256 key derivation with canonical domain separation."""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocols.errors import IntegrityError, MalformedMessageError, ParameterError

__all__ = [
    "DOMAIN",
    "PRIVATE_KEY_BYTES",
    "PUBLIC_KEY_BYTES",
    "agree",
    "derive_key",
    "encode_info",
    "generate_keypair",
    "hkdf",
    "private_key_bytes",
    "private_key_from_bytes",
]

DOMAIN = "codream-secure/v1"
PUBLIC_KEY_BYTES = 32
PRIVATE_KEY_BYTES = 32
_HKDF_MAX_LENGTH = 255 * 32  # RFC 5869: L <= 255 * HashLen
_U64 = struct.Struct(">Q")
_TAG_BYTES, _TAG_STR, _TAG_INT = b"B", b"S", b"I"


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """Fresh X25519 key pair: the private key object and the raw 32-byte public key."""
    private_key = X25519PrivateKey.generate()
    return private_key, private_key.public_key().public_bytes_raw()


def private_key_bytes(private_key: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key (for a client's saved state: a secret, stored as one)."""
    return private_key.private_bytes_raw()


def private_key_from_bytes(raw: bytes) -> X25519PrivateKey:
    """The X25519 private key of 32 raw bytes (what private_key_bytes wrote)."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != PRIVATE_KEY_BYTES:
        raise MalformedMessageError(f"an X25519 private key must be {PRIVATE_KEY_BYTES} raw bytes")
    return X25519PrivateKey.from_private_bytes(bytes(raw))


def agree(private_key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """Raw X25519 shared secret with a peer's raw public key; only ever fed to derive_key."""
    if not isinstance(peer_public, (bytes, bytearray)) or len(peer_public) != PUBLIC_KEY_BYTES:
        raise MalformedMessageError(f"an X25519 public key must be {PUBLIC_KEY_BYTES} raw bytes")
    peer = X25519PublicKey.from_public_bytes(bytes(peer_public))
    try:
        return private_key.exchange(peer)
    except ValueError as exc:
        # cryptography refuses an all-zero output: the peer sent a low-order point.
        raise IntegrityError("X25519 produced an all-zero secret (low-order public key)") from exc


def hkdf(ikm: bytes, *, length: int, salt: bytes | None, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ikm into length bytes."""
    if isinstance(length, bool) or not isinstance(length, int):
        raise ParameterError(f"HKDF length must be an int, got {length!r}")
    if not 1 <= length <= _HKDF_MAX_LENGTH:
        raise ParameterError(f"HKDF length must lie in [1, {_HKDF_MAX_LENGTH}], got {length}")
    kdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info)
    return kdf.derive(ikm)


def _encode_part(part: bytes | str | int) -> bytes:
    if isinstance(part, (bytes, bytearray)):
        return _TAG_BYTES + _U64.pack(len(part)) + bytes(part)
    if isinstance(part, str):
        data = part.encode("utf-8")
        return _TAG_STR + _U64.pack(len(data)) + data
    # bool is an int subclass; refusing it keeps True and 1 from meaning the same context.
    if isinstance(part, int) and not isinstance(part, bool):
        if not 0 <= part < 1 << 64:
            raise ParameterError(f"info integers must lie in [0, 2^64), got {part}")
        return _TAG_INT + _U64.pack(part)
    raise ParameterError(f"info parts must be bytes, str or int, got {type(part).__name__}")


def encode_info(*parts: bytes | str | int) -> bytes:
    """Canonical injective encoding of a tuple of parts: type tag + length/value, per part."""
    # Every part is self-delimiting (tag, then fixed-size length or value), so the concatenation
    # is prefix-free and two different tuples can never encode to the same bytes.
    return b"".join(_encode_part(p) for p in parts)


def derive_key(
    secret: bytes,
    *,
    session_id: bytes,
    purpose: str,
    context: tuple[bytes | str | int, ...] = (),
    length: int = 32,
) -> bytes:
    """A session key for one purpose: HKDF(salt=session_id, info=(DOMAIN, purpose, *context))."""
    if not isinstance(session_id, (bytes, bytearray)) or not session_id:
        raise ParameterError("session_id must be non-empty bytes")
    if not isinstance(purpose, str) or not purpose:
        raise ParameterError("purpose must be a non-empty str")
    if not isinstance(context, tuple):
        raise ParameterError("context must be a tuple")
    info = encode_info(DOMAIN, purpose, *context)
    return hkdf(secret, length=length, salt=bytes(session_id), info=info)
