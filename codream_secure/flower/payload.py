"""What a CoDream message carries, free of Flower types: an action, scalars and arrays.

The Flower adapters (link.py, client_app.py) turn a Payload into a RecordDict and back: scalars
and protocol bytes in one ConfigRecord, vectors in one ArrayRecord.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Payload", "Reply", "UndecodableReplyError"]

Scalar = bool | int | float | str | bytes


class UndecodableReplyError(ValueError):
    """A reply that does not carry what its request asks for."""


@dataclass(frozen=True)
class Payload:
    """One request to a client: what to do, with which scalars and arrays."""

    action: str
    values: dict[str, Scalar] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """A client's answer: scalars and arrays, or `refused` (why the client would not answer)."""

    values: dict[str, Scalar] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    refused: str = ""

    def value(self, key: str, kind: type | tuple[type, ...]) -> Scalar:
        """The scalar `key`, checked to be of `kind` (UndecodableReplyError otherwise)."""
        found = self.values.get(key)
        if not isinstance(found, kind) or (isinstance(found, bool) and kind in (int, float)):
            raise UndecodableReplyError(f"reply field {key!r} is {found!r}, not a "
                                        f"{getattr(kind, '__name__', kind)}")
        return found

    def array(self, key: str, *, dtype: np.dtype | type, size: int | None = None
              ) -> np.ndarray:
        """The array `key`, checked for dtype and (optionally) size."""
        found = self.arrays.get(key)
        if found is None or found.dtype != np.dtype(dtype) or (size is not None
                                                                and found.size != size):
            shape = None if found is None else (found.shape, str(found.dtype))
            raise UndecodableReplyError(f"reply array {key!r} is {shape}, expected "
                                        f"{np.dtype(dtype)}" + ("" if size is None
                                                                 else f" x {size}"))
        return found
