"""[aggregation]: how cross-client sums are computed, and which dropouts to simulate.

User choices only: thresholds, graph degrees and scale bits are derived from them where the
sums are set up, not stored here.
"""

from __future__ import annotations

from dataclasses import dataclass

from codream_secure.config.checks import Checks
from codream_secure.config.section import Section
from protocols import registry
from protocols.codec import MAX_RING_BITS, MIN_RING_BITS
from protocols.errors import ParameterError
from protocols.secagg.messages import THREAT_MODELS
from protocols.spec import AggregatorSpec


@dataclass(frozen=True)
class AggregationConfig(Section):
    """The aggregator, its threat model, clips and ring, and the simulated client dropouts."""

    SECTION = "aggregation"
    TUPLES = ("dropout_clients",)

    aggregator: str = "secagg"
    threat_model: str = "active"
    grad_clip: float = 8.0
    label_clip: float = 1.0
    ring_bits: int = 32
    paillier_bits: int = 3072
    dropout_rate: float = 0.0
    dropout_clients: tuple[int, ...] = ()

    def validate(self, check: Checks) -> None:
        check.choice("aggregator", self.aggregator, registry.names())
        check.choice("threat_model", self.threat_model, THREAT_MODELS)
        for key in ("grad_clip", "label_clip"):
            check.real(key, getattr(self, key), low=0.0)
        check.count("ring_bits", self.ring_bits, minimum=MIN_RING_BITS, maximum=MAX_RING_BITS)
        check.count("paillier_bits", self.paillier_bits, minimum=2048)
        if self.paillier_bits % 2:  # phe draws two primes of half the size: it never halts
            raise check.fail("paillier_bits", "must be even (2048 or 3072 are usual), got "
                                              f"{self.paillier_bits}")
        check.real("dropout_rate", self.dropout_rate, low=0.0, high=1.0, closed_low=True)
        for cid in self.dropout_clients:  # the upper bound needs [data] clients: see config.run
            check.count("dropout_clients", cid, minimum=0)
        check.unique("dropout_clients", self.dropout_clients)

    def spec(self) -> AggregatorSpec:
        """The registered aggregator `aggregator` names."""
        try:
            return registry.get(self.aggregator)
        except ParameterError:
            raise Checks(self.SECTION).fail(
                "aggregator", f"unknown value {self.aggregator!r}; choose from "
                              f"{', '.join(registry.names())}") from None
