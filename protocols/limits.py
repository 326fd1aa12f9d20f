"""The largest session a client joins and the longest message a party reads, for every aggregator.

Both are checked before anything proportional to them is allocated: an offer of 2^32 clients is
refused by its numbers, not by a MemoryError after seconds of work, and an oversized message by
its length, before its body is decoded. Each aggregator builds its own message limits from the
public parameters of its session (protocols/secagg/limits.py, protocols/paillier/limits.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .errors import MalformedMessageError, ParameterError
from .inputs import check_count
from .wire import MAX_VECTOR, message_type

__all__ = [
    "DEFAULT_MAX_CLIENTS", "DEFAULT_MAX_VECTOR_LENGTH", "MAX_KEY_BITS", "MessageSizes",
    "OfferLimits", "encoded_size",
]

DEFAULT_MAX_CLIENTS = 100_000
DEFAULT_MAX_VECTOR_LENGTH = 1 << 28  # 1 GiB of 32-bit ring words per upload
MAX_KEY_BITS = 8192  # the largest Paillier modulus whose residues mod N^2 a message carries


@dataclass(frozen=True)
class OfferLimits:
    """The largest session a client takes part in (a deployment's choice; defaults below).

    Degrees and thresholds (pairwise masks) are bounded through `max_degree` (a threshold never
    exceeds the degree), Paillier moduli through `max_key_bits`; an aggregator ignores the limits
    that do not apply to it. The defaults admit the complete graph on every cohort
    `max_clients` admits, and every modulus a message can carry.
    """

    max_clients: int = DEFAULT_MAX_CLIENTS
    max_degree: int = DEFAULT_MAX_CLIENTS - 1
    max_vector_length: int = DEFAULT_MAX_VECTOR_LENGTH
    max_key_bits: int = MAX_KEY_BITS

    def __post_init__(self) -> None:
        check_count("OfferLimits.max_clients", self.max_clients, low=2)
        check_count("OfferLimits.max_degree", self.max_degree)
        check_count("OfferLimits.max_vector_length", self.max_vector_length)
        check_count("OfferLimits.max_key_bits", self.max_key_bits)
        if self.max_vector_length > MAX_VECTOR:
            raise ParameterError(f"OfferLimits.max_vector_length must be at most {MAX_VECTOR} "
                                 f"(what a message can carry), got {self.max_vector_length}")
        if self.max_key_bits > MAX_KEY_BITS:
            raise ParameterError(f"OfferLimits.max_key_bits must be at most {MAX_KEY_BITS} "
                                 f"(what a message can carry), got {self.max_key_bits}")

    def check_clients(self, n_clients: int) -> None:
        """Refuse a session of fewer than 2 or more than `max_clients` clients."""
        if not 2 <= n_clients <= self.max_clients:
            raise ParameterError(f"n_clients must be in [2, {self.max_clients}] "
                                 f"(OfferLimits.max_clients), got {n_clients}")

    def check_degree(self, degree: int) -> None:
        """Refuse a neighbour graph of degree above `max_degree`."""
        if degree > self.max_degree:
            raise ParameterError(f"degree must be at most {self.max_degree} "
                                 f"(OfferLimits.max_degree), got {degree}")

    def check_vector_length(self, vector_length: int) -> None:
        """Refuse vectors of no value or of more than `max_vector_length` values."""
        if not 1 <= vector_length <= self.max_vector_length:
            raise ParameterError(f"vector_length must be in [1, {self.max_vector_length}] "
                                 f"(OfferLimits.max_vector_length), got {vector_length}")

    def check_key_bits(self, key_bits: int) -> None:
        """Refuse a modulus of more than `max_key_bits` bits."""
        if key_bits > self.max_key_bits:
            raise ParameterError(f"a Paillier modulus must have at most {self.max_key_bits} "
                                 f"bits (OfferLimits.max_key_bits), got {key_bits}")


@dataclass(frozen=True)
class MessageSizes:
    """The longest encoding each message type can have in one session; longer ones are refused
    before decoding. Aggregators build it from the public parameters every party knows."""

    limits: Mapping[int, int] = field(default_factory=dict)

    def check(self, data: bytes, *, expected: int | None = None) -> None:
        """Raise MalformedMessageError unless `data` is bytes no longer than the limit of its
        type (of `expected`, when the reader knows what it waits for).

        Reads the 6-byte header only; a type these limits do not list is refused here too.
        """
        code = message_type(data)  # refuses what is not bytes
        limit = self.limits.get(code if expected is None else expected)
        if limit is None:
            raise MalformedMessageError(f"message type {code} is not accepted here")
        size = len(data)
        if size > limit:
            raise MalformedMessageError(f"message of type {code} is {size} bytes, more than "
                                        f"the {limit} this session's parameters allow")


class _Encodes(Protocol):
    def encode(self) -> bytes: ...


def encoded_size(message: _Encodes) -> int:
    """Bytes of `message`'s encoding: a template whose variable parts are empty or largest."""
    return len(message.encode())
