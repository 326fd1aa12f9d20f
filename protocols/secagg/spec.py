"""The pairwise-mask aggregators as registry specs: "secagg" (complete graph) and "secagg+"."""

from __future__ import annotations

from typing import ClassVar

from ..plan import MIN_EXPECTED_DROPOUT, AggregationPlan, mask_graph_parameters
from ..session import RingNoise
from ..spec import AggregatorSpec, SessionOptions
from .session import PairwiseMaskSession

__all__ = ["SecAggPlusSpec", "SecAggSpec"]


class SecAggSpec(AggregatorSpec):
    """"secagg": pairwise masks on the complete graph, a majority share threshold."""

    name: ClassVar[str] = "secagg"
    pairwise_masks: ClassVar[bool] = True
    network_faults: ClassVar[bool] = True

    def plan(self, n_clients: int, *, threshold: int | None = None, degree: int | None = None,
             expected_dropout: float = 0.1, ring_bits: int = 32,
             private: bool = False) -> AggregationPlan:
        """Graph and threshold; an unmaskable sum holds every included client and the t share
        holders it needs among the other survivors, so at least t + 1 inputs."""
        sparse_degree, t = mask_graph_parameters(
            n_clients, sparse=self.sparse_graph, threshold=threshold, degree=degree,
            expected_dropout=max(expected_dropout, MIN_EXPECTED_DROPOUT))
        return AggregationPlan(
            self.name, n_clients, threshold=t,
            degree=n_clients - 1 if sparse_degree is None else sparse_degree,
            min_contributors=min(t + 1, n_clients), ring_bits=ring_bits)

    def open(self, plan: AggregationPlan, vector_length: int, *, clip: float,
             noise: RingNoise | None, options: SessionOptions) -> PairwiseMaskSession:
        return PairwiseMaskSession(
            plan.n_clients, vector_length, clip=clip, aggregator=self.name,
            sparse=self.sparse_graph, threshold=plan.threshold, degree=plan.degree,
            ring_bits=plan.ring_bits, scale_bits=options.scale_bits, faults=options.faults,
            rounding_seed=options.rounding_seed, noise=noise, prg=options.prg,
            maskers=options.maskers, unmasker=options.unmasker,
            threat_model=options.threat_model)


class SecAggPlusSpec(SecAggSpec):
    """"secagg+": pairwise masks over a sparse random Harary graph once n is large enough."""

    name: ClassVar[str] = "secagg+"
    sparse_graph: ClassVar[bool] = True
