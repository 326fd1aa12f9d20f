"""One-call secure sums and multi-step SecAgg sessions: the protocol layer's front door.

Both are conveniences over the sessions protocols.registry opens; any registered aggregator works.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .dp.mechanisms import DPSpec
from .errors import ParameterError
from .inputs import check_vectors
from .registry import get, open_session
from .secagg.session import PairwiseMaskSession
from .session import AggregationSession, Dropout, FaultPlan, SecureSumResult, Stage

__all__ = ["SecAggSession", "SecureSumResult", "secure_sum"]


def _weighted_rows(stacked: np.ndarray, weights: Sequence[float], clip: float,
                   max_weight: float | None) -> tuple[np.ndarray, float]:
    """Rows [w_k * clip(x_k), w_k] and the clip that bounds them, for a weighted sum.

    The weight travels as one more coordinate, so the server learns only the sum of the
    survivors' weights, never a single client's.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (stacked.shape[0],) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ParameterError(f"weights must be {stacked.shape[0]} finite numbers >= 0")
    bound = float(max_weight if max_weight is not None else w.max())
    if not math.isfinite(bound) or bound <= 0 or np.any(w > bound):
        raise ParameterError(f"max_weight must be positive and at least every weight, got {bound}")
    rows = np.clip(stacked, -clip, clip) * w[:, None]
    return np.hstack([rows, w[:, None]]), bound * max(clip, 1.0)


class SecAggSession(PairwiseMaskSession):
    """A multi-step SecAgg/SecAgg+ session opened by aggregator name, with every option of
    protocols.secagg.session.PairwiseMaskSession (a graph, a threshold, faults, device maskers,
    the threat model).
    """

    def __init__(self, n_clients: int, vector_length: int, *, clip: float,
                 protocol: str = "secagg+", **options: Any) -> None:
        spec = get(protocol)
        if not spec.pairwise_masks:
            raise ParameterError(f"protocol must be a pairwise-mask aggregator, got {protocol!r}")
        super().__init__(n_clients, vector_length, clip=clip, aggregator=spec.name,
                         sparse=spec.sparse_graph, **options)


def secure_sum(vectors: Sequence[np.ndarray] | np.ndarray, *, protocol: str = "secagg+",
               clip: float | None = None, dropouts: Iterable[Dropout] = (),
               dropout_rate: float = 0.0, dropout_stage: Stage | str = Stage.SHARES,
               threshold: int | None = None, degree: int | None = None, ring_bits: int = 32,
               scale_bits: int | None = None, seed: int = 0,
               weights: Sequence[float] | None = None,
               max_weight: float | None = None, dp: DPSpec | None = None,
               threat_model: str = "active") -> SecureSumResult:
    """Sum n client vectors under `protocol`, with dropouts, and report the bytes and the time.

    `clip` defaults to the largest absolute input (a real deployment declares it up front).
    `dropout_rate` drops each client independently at `dropout_stage`; `dropouts` names exact ones
    (a client named twice falls silent at the earliest; a malformed one raises ParameterError).
    The result holds the clients that stayed until their input was in the sum; `dropped` the
    others, key setup dropouts included.
    With `weights` (e.g. sample counts, bounded by the public `max_weight`) the result holds
    sum_k w_k x_k and sum_k w_k over the survivors, and `.weighted_mean` is their ratio.
    With `dp` (a protocols.dp.DPSpec) every vector is clipped to L2 norm dp.l2_clip and the sum
    is noised (protocols.dp.private); dropouts then happen before or after the upload only.
    `threat_model` ("active" or "semi-honest") applies to SecAgg and SecAgg+.
    """
    spec = get(protocol)
    stacked = check_vectors(vectors)
    n, m = stacked.shape
    clip = float(clip if clip is not None else max(float(np.abs(stacked).max()), 1e-12))
    if not math.isfinite(clip) or clip <= 0:
        raise ParameterError(f"clip must be a positive finite number, got {clip}")
    # a malformed dropout is refused before anything runs
    plan = FaultPlan.for_clients(n, dropouts, rate=dropout_rate, stage=dropout_stage, seed=seed)
    if dp is not None:
        if weights is not None:
            raise ParameterError("weights and dp together are not supported")
        return _private_sum(stacked, protocol, plan, dp, threshold=threshold, degree=degree,
                            ring_bits=ring_bits, expected_dropout=max(dropout_rate, 0.05),
                            threat_model=threat_model)
    if weights is not None:
        stacked, clip = _weighted_rows(stacked, weights, clip, max_weight)
        result = secure_sum(stacked, protocol=protocol, clip=clip, dropouts=plan.dropouts,
                            threshold=threshold, degree=degree, ring_bits=ring_bits,
                            scale_bits=scale_bits, seed=seed, threat_model=threat_model)
        return dataclasses.replace(result, total=result.total[:m],
                                   weight_sum=float(result.total[m]))
    session = open_session(spec.name, n, m, clip=clip, threshold=threshold, degree=degree,
                           ring_bits=ring_bits, scale_bits=scale_bits,
                           expected_dropout=max(dropout_rate, 0.05),
                           faults=plan if spec.network_faults else None,
                           threat_model=threat_model)
    return _one_step(session, stacked, plan, spec.name, played=spec.network_faults)


def _private_sum(stacked: np.ndarray, protocol: str, plan: FaultPlan, dp: DPSpec, *,
                 threshold: int | None, degree: int | None, ring_bits: int,
                 expected_dropout: float, threat_model: str) -> SecureSumResult:
    """One DP release (a client silent before uploading is absent, one silent after is not)."""
    n, m = stacked.shape
    session = open_session(protocol, n, m, clip=dp.l2_clip, ring_bits=ring_bits, dp=dp,
                           threshold=threshold, degree=degree, expected_dropout=expected_dropout,
                           threat_model=threat_model)
    return _one_step(session, stacked, plan, protocol, played=False)


def _one_step(session: AggregationSession, stacked: np.ndarray, plan: FaultPlan, protocol: str,
              *, played: bool) -> SecureSumResult:
    """Sum the rows in one step of `session` and report it; `played`: the session's own network
    plays `plan` (else its dropouts become absent or silent clients)."""
    n = stacked.shape[0]
    try:
        if played:
            outcome = session.step({c: stacked[c] for c in range(n)})
        else:
            before, after = plan.first_step_arrivals()
            outcome = session.step({c: stacked[c] for c in range(n) if c not in before},
                                   drop_after_upload=sorted(after))
    finally:
        session.close()
    traffic = session.traffic
    included = tuple(sorted(outcome.included))
    dropped = tuple(c for c in range(n) if c not in outcome.included)  # setup dropouts too
    return SecureSumResult(
        outcome.total, included, dropped, traffic.bytes_up,
        traffic.bytes_down, traffic.client_seconds, traffic.server_seconds,
        session.error_bound(max(len(included), 1)), protocol, session.threshold, session.degree)
