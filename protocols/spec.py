"""What an aggregator declares to the registry: its name, its capabilities, its planning and how
it opens a session (protocols.registry keeps one spec object per name)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import ParameterError
from .plan import AggregationPlan
from .secagg.client import Masker
from .secagg.messages import THREAT_MODELS
from .secagg.server import Unmasker
from .session import AggregationSession, FaultPlan, RingNoise

__all__ = ["AggregatorSpec", "SessionOptions"]

DEFAULT_KEY_BITS = 3072  # a key holder's modulus unless the caller says otherwise


@dataclass(frozen=True)
class SessionOptions:
    """Options only some aggregators use; a spec ignores what it has no use for, and the registry
    refuses device maskers for an aggregator without pairwise masks and faults for one without
    an in-process network."""

    rounding_seed: bytes | None = None
    scale_bits: int | None = None
    key_bits: int = DEFAULT_KEY_BITS
    keypair: object | None = None
    prg: str = "aes-256-ctr"
    maskers: Mapping[int, Masker] = field(default_factory=dict)
    unmasker: Unmasker | None = None
    faults: FaultPlan | None = None
    threat_model: str = "active"  # pairwise-mask aggregators: "active" adds a consistency round

    def __post_init__(self) -> None:
        if self.threat_model not in THREAT_MODELS:
            raise ParameterError(f"threat_model must be one of {', '.join(THREAT_MODELS)}, "
                                 f"got {self.threat_model!r}")


class AggregatorSpec:
    """One aggregator: a name, capabilities as attributes, parameter planning, sessions.

    Subclasses set the class attributes and implement `plan` and `open`; DP wraps any of them.
    """

    name: ClassVar[str]
    masks_inputs: ClassVar[bool] = True  # the server never sees a single client's vector
    fixed_point: ClassVar[bool] = True  # inputs are clipped and encoded in the ring Z_2^k
    pairwise_masks: ClassVar[bool] = False  # uploads are pairwise-masked ring vectors: device
    # maskers and unmaskers (codream_secure.gpu.masking) apply
    sparse_graph: ClassVar[bool] = False  # masks over a sparse neighbour graph for large n
    key_holder: ClassVar[bool] = False  # a separate party holds the decryption key
    network_faults: ClassVar[bool] = False  # the session's in-process wire plays a FaultPlan's
    # dropouts, lateness and tampering; other sessions see dropouts only as missing or silent
    # clients
    dp_modes: ClassVar[frozenset[str]] = frozenset({"central", "distributed"})

    def plan(self, n_clients: int, *, threshold: int | None = None, degree: int | None = None,
             expected_dropout: float = 0.1, ring_bits: int = 32,
             private: bool = False) -> AggregationPlan:
        """The parameters a session of n_clients will run with (`private`: under DP)."""
        raise NotImplementedError

    def open(self, plan: AggregationPlan, vector_length: int, *, clip: float,
             noise: RingNoise | None, options: SessionOptions) -> AggregationSession:
        """A fresh session following `plan`; `noise` is each client's distributed DP noise."""
        raise NotImplementedError

    def generate_keypair(self, key_bits: int) -> object:
        """A keypair for the key holder, to reuse across sessions (key-holder aggregators)."""
        raise ParameterError(f"aggregator {self.name!r} has no key holder")
