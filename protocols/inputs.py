"""Checks on what a caller hands a session, made before any message is sent.

A vector a client could not encode used to surface inside the exchange, where the network took
the client's own error for a refusal and dropped the client for good: a silently smaller sum.
Refusing it up front keeps every client, and the session, as they were.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from .errors import NonFiniteInputError, ParameterError

__all__ = ["check_count", "check_step_inputs", "check_vectors", "real_array", "without_departed"]

_V = TypeVar("_V")
_REAL_KINDS = "biuf"  # bool, signed, unsigned, float: what converts to float64 exactly enough


def check_count(name: str, value: object, *, low: int = 1) -> int:
    """`value` as an int if it is an integer (numpy's too, not a bool) of at least `low`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ParameterError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def real_array(vector: object, *, who: str) -> np.ndarray:
    """`vector` as a numpy array of real numbers (no copy when it already is one)."""
    try:
        array = np.asarray(vector)
    except (TypeError, ValueError, OverflowError) as error:
        raise ParameterError(f"{who} is not an array of real numbers ({error})") from None
    if array.dtype.kind not in _REAL_KINDS or array.dtype.itemsize > 8:
        raise ParameterError(f"{who} must hold real numbers (float16/32/64 or integers), got "
                             f"dtype {array.dtype}")
    return array


def _size(vector: object) -> int:
    shape = getattr(vector, "shape", None)  # a device tensor: no copy to the host
    if shape is not None:
        return math.prod(shape)
    return real_array(vector, who="vector").size


def check_step_inputs(inputs: Mapping[int, object], drop_after_upload: Iterable[int], *,
                      active: Collection[int], length: int, floats_only: bool = False,
                      masked_elsewhere: Collection[int] = ()) -> list[int]:
    """Refuse a step's inputs that no client could send; returns drop_after_upload as a list.

    Every id must be an active client, every client dropping after its upload must have an
    input, and every vector must hold `length` finite real numbers (`floats_only`: float16/32/64,
    what the fixed-point codec encodes). Vectors in `masked_elsewhere` (a device masker's) are
    checked for length only: reading their values would copy them to the host; their masker or
    the caller refuses NaN and inf.
    """
    dropping = list(drop_after_upload)
    unknown = sorted(set(inputs) - set(active), key=repr)
    if unknown:
        raise ParameterError(f"inputs for clients {unknown}, which are not active in this "
                             f"session (active: {sorted(active)})")
    stray = sorted(set(dropping) - set(inputs), key=repr)
    if stray:
        raise ParameterError(f"drop_after_upload names clients {stray} without an input: a "
                             "client drops after its upload only if it uploads")
    for client, vector in inputs.items():
        if client in masked_elsewhere:
            size = _size(vector)
        else:
            array = real_array(vector, who=f"client {client}'s vector")
            if floats_only and array.dtype.kind != "f":
                raise ParameterError(f"client {client}'s vector must be float16/32/64, got "
                                     f"dtype {array.dtype}")
            size = array.size
            if array.dtype.kind == "f" and size == length and not np.isfinite(array).all():
                raise NonFiniteInputError(f"client {client}'s vector holds NaN or inf")
        if size != length:
            raise ParameterError(f"client {client}'s vector has {size} values, the session "
                                 f"expects {length}")
    return dropping


def without_departed(inputs: Mapping[int, _V], drop_after_upload: Iterable[int], *,
                     n_clients: int, active: Collection[int]) -> tuple[dict[int, _V], list[int]]:
    """`inputs` and `drop_after_upload` without the clients that have left the session.

    A client of the session (an id in [0, n_clients)) that is no longer active dropped earlier
    and stays dropped, whatever the caller hands for it; any other id is left for
    check_step_inputs to refuse.
    """
    def departed(client: object) -> bool:
        return (isinstance(client, numbers.Integral) and not isinstance(client, bool)
                and 0 <= int(client) < n_clients and client not in active)

    kept = {client: vector for client, vector in inputs.items() if not departed(client)}
    return kept, [client for client in drop_after_upload if not departed(client)]


def check_vectors(vectors: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Stack client vectors into an n x m float array, refusing ragged, complex, non-numeric
    or non-finite input."""
    rows = [real_array(v, who=f"client {c}'s vector").reshape(-1)
            for c, v in enumerate(vectors)]
    if len({row.size for row in rows}) > 1:
        raise ParameterError(f"client vectors must all have the same length, got sizes "
                             f"{sorted({row.size for row in rows})}")
    stacked = np.stack(rows).astype(np.float64, copy=False) if rows else np.empty((0, 0))
    if stacked.shape[0] < 2:
        raise ParameterError(f"a secure sum needs at least 2 clients, got {stacked.shape[0]}")
    bad = ~np.isfinite(stacked)
    if bad.any():
        client, index = map(int, np.argwhere(bad)[0])
        raise NonFiniteInputError(
            f"client {client}'s vector holds {int(bad[client].sum())} NaN/inf values "
            f"(first at index {index})"
        )
    return stacked
