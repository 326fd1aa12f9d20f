"""Canonical binary encoding with strict decoding: malformed input raises MalformedMessageError."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence
from typing import Any, cast

import numpy as np

from .errors import MalformedMessageError

MAGIC = b"CDSA"
VERSION = 1
MAX_LIST = 1 << 20
MAX_BLOB = 1 << 16
MAX_VECTOR = 1 << 31

_U8, _U32 = struct.Struct("<B"), struct.Struct("<I")
_U64, _F64 = struct.Struct("<Q"), struct.Struct("<d")
_RING_DTYPES: dict[int, np.dtype[Any]] = {32: np.dtype("<u4"), 64: np.dtype("<u8")}


class Writer:
    """Appends typed fields; the output is the canonical encoding of one message."""

    def __init__(self, msg_type: int) -> None:
        self._parts: list[bytes | memoryview] = [MAGIC, _U8.pack(VERSION), _U8.pack(msg_type)]

    def u8(self, value: int) -> Writer:
        self._parts.append(_U8.pack(value))
        return self

    def u32(self, value: int) -> Writer:
        self._parts.append(_U32.pack(value))
        return self

    def u64(self, value: int) -> Writer:
        self._parts.append(_U64.pack(value))
        return self

    def f64(self, value: float) -> Writer:
        self._parts.append(_F64.pack(value))
        return self

    def fixed(self, data: bytes, size: int) -> Writer:
        if len(data) != size:
            raise MalformedMessageError(f"field must be {size} bytes, got {len(data)}")
        self._parts.append(bytes(data))
        return self

    def ids(self, ids: Iterable[int]) -> Writer:
        values = sorted(ids)
        self.u32(len(values))
        self._parts.append(np.asarray(values, dtype="<u4").tobytes())
        return self

    def keyed_fixed(self, items: Sequence[tuple[int, bytes]], size: int) -> Writer:
        self.u32(len(items))
        for key, data in sorted(items):
            self.u32(key).fixed(data, size)
        return self

    def keyed_blobs(self, items: Sequence[tuple[int, bytes]]) -> Writer:
        self.u32(len(items))
        for key, data in sorted(items):
            self.u32(key).u32(len(data))
            self._parts.append(bytes(data))
        return self

    def ring(self, vector: np.ndarray) -> Writer:
        bits = 64 if vector.dtype.itemsize == 8 else 32
        self.u8(bits).u64(vector.size)
        # a view, not a copy: finish() copies it into the message once (vectors are megabytes)
        words = np.ascontiguousarray(vector, dtype=_RING_DTYPES[bits])
        self._parts.append(memoryview(cast(Any, words)))  # numpy stubs: Buffer only on 3.12+
        return self

    def finish(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Consumes typed fields from bytes; any deviation from the canonical form raises."""

    def __init__(self, data: bytes, expected_type: int) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedMessageError(f"message must be bytes, got {type(data).__name__}")
        self._view = memoryview(data).cast("B")
        self._pos = 0
        if self._take(4) != MAGIC:
            raise MalformedMessageError("bad magic: not a codream-secure protocol message")
        version, msg_type = self.u8(), self.u8()
        if version != VERSION:
            raise MalformedMessageError(f"unsupported protocol version {version}")
        if msg_type != expected_type:
            raise MalformedMessageError(f"expected message type {expected_type}, got {msg_type}")

    def _take(self, size: int) -> bytes:
        end = self._pos + size
        if size < 0 or end > len(self._view):
            raise MalformedMessageError(
                f"truncated message: needed {size} bytes at offset {self._pos}, "
                f"{len(self._view) - self._pos} left"
            )
        chunk = self._view[self._pos : end]
        self._pos = end
        return chunk.tobytes()

    def u8(self) -> int:
        return cast(int, _U8.unpack(self._take(1))[0])

    def u32(self) -> int:
        return cast(int, _U32.unpack(self._take(4))[0])

    def u64(self) -> int:
        return cast(int, _U64.unpack(self._take(8))[0])

    def f64(self) -> float:
        return cast(float, _F64.unpack(self._take(8))[0])

    def fixed(self, size: int) -> bytes:
        return self._take(size)

    def _count(self, limit: int, what: str) -> int:
        count = self.u32()
        if count > limit:
            raise MalformedMessageError(f"{what}: {count} entries exceed the limit {limit}")
        return count

    def ids(self, limit: int = MAX_LIST) -> frozenset[int]:
        count = self._count(limit, "id list")
        values = np.frombuffer(self._take(4 * count), dtype="<u4")
        if count > 1 and not bool(np.all(values[1:] > values[:-1])):
            raise MalformedMessageError("id list must be strictly increasing (no duplicates)")
        return frozenset(int(v) for v in values)

    def _keys_ok(self, keys: list[int], what: str) -> None:
        if any(b <= a for a, b in itertools.pairwise(keys)):
            raise MalformedMessageError(f"{what}: keys must be strictly increasing")

    def keyed_fixed(self, size: int, limit: int = MAX_LIST) -> dict[int, bytes]:
        count = self._count(limit, "keyed list")
        items = [(self.u32(), self._take(size)) for _ in range(count)]
        self._keys_ok([k for k, _ in items], "keyed list")
        return dict(items)

    def keyed_blobs(self, limit: int = MAX_LIST, max_blob: int = MAX_BLOB) -> dict[int, bytes]:
        count = self._count(limit, "blob list")
        items = []
        for _ in range(count):
            key, size = self.u32(), self.u32()
            if size > max_blob:
                raise MalformedMessageError(f"blob of {size} bytes exceeds the limit {max_blob}")
            items.append((key, self._take(size)))
        self._keys_ok([k for k, _ in items], "blob list")
        return dict(items)

    def ring(self, max_length: int = MAX_VECTOR) -> np.ndarray:
        bits = self.u8()
        if bits not in _RING_DTYPES:
            raise MalformedMessageError(f"ring word size must be 32 or 64 bits, got {bits}")
        count = self.u64()
        if count > max_length:
            raise MalformedMessageError(f"vector of {count} values exceeds the limit {max_length}")
        dtype = _RING_DTYPES[bits]
        raw = self._view[self._pos : self._pos + count * dtype.itemsize]
        if len(raw) != count * dtype.itemsize:
            raise MalformedMessageError("truncated message: ring vector shorter than declared")
        self._pos += len(raw)
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)

    def done(self) -> None:
        if self._pos != len(self._view):
            left = len(self._view) - self._pos
            raise MalformedMessageError(f"{left} trailing bytes after message")


def message_type(data: bytes) -> int:
    """Read the type code of a framed message without decoding its body."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 6:
        raise MalformedMessageError("message too short to carry a header")
    if bytes(data[:4]) != MAGIC:
        raise MalformedMessageError("bad magic: not a codream-secure protocol message")
    return data[5]
