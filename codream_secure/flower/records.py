"""Payloads and replies as Flower RecordDicts: scalars in a ConfigRecord, arrays in an
ArrayRecord (which Flower chunks), and back."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from .payload import Payload, Reply, UndecodableReplyError

__all__ = ["payload_from_content", "payload_to_content", "reply_from_content",
           "reply_to_content"]

_VALUES, _ARRAYS = "codream", "codream.arrays"
_ACTION, _REFUSED = "action", "refused"


_BYTES_PREFIX = "bytes:"
LARGE_BYTES = 1 << 16  # a masked upload or a share request this big travels as an array


def _content(values: dict, arrays: dict[str, np.ndarray]) -> RecordDict:
    """A ConfigRecord for the scalars; an ArrayRecord (chunked by Flower) for the arrays and
    for byte strings of LARGE_BYTES or more, e.g. a protocol message carrying a masked vector."""
    arrays = dict(arrays)
    small = {}
    for key, value in values.items():
        if isinstance(value, bytes) and len(value) >= LARGE_BYTES:
            arrays[_BYTES_PREFIX + key] = np.frombuffer(value, dtype=np.uint8)
        else:
            small[key] = value
    records: dict = {_VALUES: ConfigRecord(small)}
    if arrays:
        records[_ARRAYS] = ArrayRecord(array_dict={
            name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})
    return RecordDict(records)


def _parts(content: RecordDict) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        values = dict(content.config_records[_VALUES])
        arrays = {name: array.numpy() for name, array in content.array_records[_ARRAYS].items()} \
            if _ARRAYS in content.array_records else {}
    except (KeyError, TypeError, ValueError) as error:
        raise UndecodableReplyError(f"message without CoDream records ({error})") from None
    for key in [k for k in arrays if k.startswith(_BYTES_PREFIX)]:
        data = arrays.pop(key)
        if data.dtype != np.uint8 or data.ndim != 1:
            raise UndecodableReplyError(f"{key!r} is not a byte string")
        values[key[len(_BYTES_PREFIX):]] = data.tobytes()
    return values, arrays


def payload_to_content(payload: Payload) -> RecordDict:
    """A request's RecordDict."""
    return _content({_ACTION: payload.action, **payload.values}, payload.arrays)


def payload_from_content(content: RecordDict) -> Payload:
    """The request a RecordDict carries (UndecodableReplyError if it carries none)."""
    values, arrays = _parts(content)
    action = values.pop(_ACTION, None)
    if not isinstance(action, str):
        raise UndecodableReplyError("request without an action")
    return Payload(action, values, arrays)


def reply_to_content(reply: Reply) -> RecordDict:
    """A reply's RecordDict."""
    values = {**reply.values, _REFUSED: reply.refused} if reply.refused else dict(reply.values)
    return _content(values, reply.arrays)


def reply_from_content(content: RecordDict) -> Reply:
    """The reply a RecordDict carries (UndecodableReplyError if it carries none)."""
    values, arrays = _parts(content)
    refused = values.pop(_REFUSED, "")
    return Reply(values, arrays, refused if isinstance(refused, str) else repr(refused))
