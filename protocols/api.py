"""One-call secure sums and multi-step aggregation sessions: the protocol layer's front door."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .codec import FixedPointCodec
from .dp import DPSpec
from .errors import (
    ConsistencyAbortError,
    NonFiniteInputError,
    ParameterError,
    TooFewSurvivorsError,
)
from .graph import (
    COMPLETE_GRAPH_BELOW,
    NeighbourGraph,
    choose_parameters,
    complete_graph,
    harary_graph,
)
from .inputs import check_count, check_step_inputs, real_array
from .network import Dropout, FaultPlan, InProcessNetwork, Stage, Traffic
from .primitives.kdf import derive_key
from .secagg.client import Masker, RingNoise, SecAggClient
from .secagg.server import SecAggServer, StepOutcome, Unmasker

PROTOCOLS = ("plain", "secagg", "secagg+", "paillier")


@dataclass(frozen=True, eq=False)
class SecureSumResult:
    """A sum and what it cost: who is in it, bytes per client, seconds per party."""

    total: np.ndarray
    included: tuple[int, ...]
    dropped: tuple[int, ...]
    bytes_up: np.ndarray
    bytes_down: np.ndarray
    client_seconds: np.ndarray
    server_seconds: float
    error_bound: float
    protocol: str
    threshold: int
    degree: int
    weight_sum: float | None = None

    @property
    def weighted_mean(self) -> np.ndarray:
        """sum_k w_k x_k / sum_k w_k over the included clients (weighted sums only)."""
        if self.weight_sum is None:
            raise ParameterError("weighted_mean needs a secure_sum called with weights=")
        if self.weight_sum <= 0:
            raise ParameterError("the included clients' weights sum to zero")
        return self.total / self.weight_sum


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


def default_threshold(n_clients: int) -> int:
    """A majority of the other n - 1 clients on the complete graph: t = floor((n - 1) / 2) + 1."""
    return (n_clients - 1) // 2 + 1


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


def plan_graph(n_clients: int, *, protocol: str, threshold: int | None = None,
               degree: int | None = None, expected_dropout: float = 0.1,
               corrupt_rate: float = 0.05) -> tuple[NeighbourGraph, int]:
    """The neighbour graph and share threshold a SecAgg/SecAgg+ session of n clients uses."""
    sparse_degree, threshold = plan_parameters(
        n_clients, protocol=protocol, threshold=threshold, degree=degree,
        expected_dropout=expected_dropout, corrupt_rate=corrupt_rate)
    if sparse_degree is None:
        return complete_graph(n_clients), threshold
    return harary_graph(n_clients, sparse_degree, seed=os.urandom(32)), threshold


def plan_parameters(n_clients: int, *, protocol: str, threshold: int | None = None,
                    degree: int | None = None, expected_dropout: float = 0.1,
                    corrupt_rate: float = 0.05) -> tuple[int | None, int]:
    """(Harary degree, or None for the complete graph; share threshold), without any graph."""
    small = n_clients < COMPLETE_GRAPH_BELOW and degree is None
    if protocol == "secagg" or degree == n_clients - 1 or small:
        # SecAgg+ uses the complete graph for small n anyway (it costs no more); the
        # majority threshold then applies, as for SecAgg.
        return None, _given(threshold, default_threshold(n_clients))
    if degree is not None:
        return degree, _given(threshold, degree // 2 + 1)
    params = choose_parameters(n_clients, dropout_rate=expected_dropout,
                               corrupt_rate=corrupt_rate)
    return (None if params.complete else params.degree), _given(threshold, params.threshold)


def _given(threshold: int | None, default: int) -> int:
    """The caller's threshold (0 included, which the server refuses), else the default."""
    return default if threshold is None else threshold


class SecAggSession:
    """A multi-step SecAgg/SecAgg+ session: one key setup, then one `step` per summed vector.

    `prg` picks the keystream of masks and dither ("aes-256-ctr" or "chacha20"); `maskers`
    gives chosen clients a device masker (codream_secure.gpu.masking.protocol_masker), and
    `unmasker` the server a device unmasker (codream_secure.gpu.masking.protocol_unmasker).
    `threat_model` "active" (default) adds the consistency round that keeps a lying server
    from unmasking anyone with fewer than t colluders; "semi-honest" skips it.
    """

    def __init__(self, n_clients: int, vector_length: int, *, clip: float,
                 protocol: str = "secagg+", threshold: int | None = None,
                 degree: int | None = None, ring_bits: int = 32, scale_bits: int | None = None,
                 expected_dropout: float = 0.1, corrupt_rate: float = 0.05,
                 rounding: str = "stochastic", faults: FaultPlan | None = None,
                 rounding_seed: bytes | None = None, noise: RingNoise | None = None,
                 prg: str = "aes-256-ctr", maskers: Mapping[int, Masker] | None = None,
                 unmasker: Unmasker | None = None, threat_model: str = "active") -> None:
        if protocol not in ("secagg", "secagg+"):
            raise ParameterError(f"protocol must be 'secagg' or 'secagg+', got {protocol!r}")
        n_clients = check_count("secure aggregation's number of clients", n_clients, low=2)
        vector_length = check_count("vector_length", vector_length)
        self.codec = FixedPointCodec.for_clients(
            n_clients, clip=clip, ring_bits=ring_bits, scale_bits=scale_bits, rounding=rounding,
            headroom=0.0 if noise is None else noise.headroom, prg=prg)
        graph, threshold = plan_graph(n_clients, protocol=protocol, threshold=threshold,
                                      degree=degree, expected_dropout=expected_dropout,
                                      corrupt_rate=corrupt_rate)
        self.protocol, self.n_clients, self.vector_length = protocol, n_clients, vector_length
        self._pending: dict[int, np.ndarray] = {}
        self._masked_elsewhere = frozenset(maskers or {})
        self.server = SecAggServer(graph=graph, threshold=threshold, codec=self.codec,
                                   vector_length=vector_length, unmasker=unmasker,
                                   threat_model=threat_model)
        clients = {
            cid: SecAggClient(self._provider(cid), noise=noise,
                              masker=(maskers or {}).get(cid), threat_model=threat_model,
                              rounding_seed=None if rounding_seed is None
                              else derive_key(rounding_seed, session_id=b"rounding",
                                              purpose="client-rounding", context=(cid,)))
            for cid in range(n_clients)
        }
        self.network = InProcessNetwork(self.server, clients, faults=faults)
        self.network.setup()

    @property
    def threshold(self) -> int:
        return self.server.threshold

    @property
    def traffic(self) -> Traffic:
        """Bytes and seconds so far, per party."""
        return self.network.traffic

    def error_bound(self, n_summed: int) -> float:
        """Worst-case per-coordinate decode error of a sum of n_summed inputs."""
        return self.codec.error_bound(n_summed)

    @property
    def degree(self) -> int:
        return self.server.graph.degree

    def _provider(self, cid: int):
        def provide(step: int) -> np.ndarray:
            return self._pending[cid]
        return provide

    @property
    def active(self) -> frozenset[int]:
        """Clients still taking part in the session."""
        return self.server.active

    def step(self, inputs: Mapping[int, np.ndarray], *,
             drop_after_upload: Iterable[int] = ()) -> StepOutcome:
        """Sum one vector per active client.

        Active clients missing from `inputs` drop before uploading; those in `drop_after_upload`
        upload and then fall silent (their self masks are recovered from shares). Inputs no
        client could send (an unknown id, a wrong length, NaN) are refused before any message.
        A client silent in the consistency round aborts the step; the same inputs are then
        summed at the next step id without it (the outcome's `step` is that id, `dropped`
        covers both tries, and the traffic counts both).
        """
        dropping = check_step_inputs(inputs, drop_after_upload, active=self.active,
                                     length=self.vector_length, floats_only=True,
                                     masked_elsewhere=self._masked_elsewhere)
        first = upcoming = self.server.last_step + 1
        self.network.add_dropouts(
            [Dropout(c, upcoming, Stage.UPLOAD) for c in self.active if c not in inputs]
        )
        before, gone = self.active, frozenset()
        self._pending = dict(inputs)
        try:
            while True:
                # re-scheduled each try: a late dropout falls silent after that try's upload
                self.network.add_dropouts([Dropout(c, upcoming, Stage.SHARES)
                                           for c in dropping if c in self.active])
                try:
                    outcome = self.network.step()
                    break
                except ConsistencyAbortError as error:
                    # nothing of the aborted step can be unmasked (no share was released), and
                    # the retry masks its inputs with fresh per-step secrets
                    self.server.abandon_step()
                    gone |= error.silent
                    upcoming = self.server.last_step + 1
        except TooFewSurvivorsError as error:
            # the next step starts afresh with this one's survivors (safe: every secret
            # revealed during a step is specific to it), instead of a StageError
            self.server.abandon_step()
            self._refuse_masker_errors(first, upcoming, cause=error)
            raise
        finally:
            self._pending = {}
        self._refuse_masker_errors(first, upcoming)
        if upcoming != first:
            outcome = dataclasses.replace(outcome, dropped=frozenset(before - outcome.included))
        return outcome

    def _refuse_masker_errors(self, first: int, last: int, *,
                              cause: Exception | None = None) -> None:
        """A device masker that refused its client's vector mid-step: no sum is returned."""
        for when, client, error in self.network.refusals:
            if first <= when <= last and isinstance(error, NonFiniteInputError):
                raise NonFiniteInputError(
                    f"client {client}'s masker refused its vector at step {when} ({error}); "
                    "the client has left the session and the step's sum is discarded"
                ) from cause


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
    `dropout_rate` drops each client independently at `dropout_stage`; `dropouts` names exact ones.
    With `weights` (e.g. sample counts, bounded by the public `max_weight`) the result holds
    sum_k w_k x_k and sum_k w_k over the survivors, and `.weighted_mean` is their ratio.
    With `dp` (a protocols.dp.DPSpec) every vector is clipped to L2 norm dp.l2_clip and the sum
    is noised (protocols.private); dropouts then happen before or after the upload only.
    `threat_model` ("active" or "semi-honest") applies to SecAgg and SecAgg+.
    """
    if protocol not in PROTOCOLS:
        raise ParameterError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    stacked = check_vectors(vectors)
    n, m = stacked.shape
    clip = float(clip if clip is not None else max(float(np.abs(stacked).max()), 1e-12))
    if not math.isfinite(clip) or clip <= 0:
        raise ParameterError(f"clip must be a positive finite number, got {clip}")
    plan = FaultPlan.random(n, rate=dropout_rate, stage=dropout_stage, seed=seed)
    plan.dropouts.extend(dropouts)
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
    if protocol == "plain":
        return _plain_sum(stacked, plan)
    if protocol == "paillier":
        from .paillier import paillier_sum  # phe is optional: import only when asked for

        return paillier_sum(stacked, clip=clip, dropouts=plan.dropouts, ring_bits=ring_bits,
                            scale_bits=scale_bits, seed=seed)
    session = SecAggSession(n, stacked.shape[1], clip=clip, protocol=protocol, threshold=threshold,
                            degree=degree, ring_bits=ring_bits, scale_bits=scale_bits,
                            expected_dropout=max(dropout_rate, 0.05), faults=plan,
                            threat_model=threat_model)
    outcome = session.step({cid: stacked[cid] for cid in range(n)})
    traffic = session.network.traffic
    return SecureSumResult(
        outcome.total, tuple(sorted(outcome.included)), tuple(sorted(outcome.dropped)),
        traffic.bytes_up, traffic.bytes_down, traffic.client_seconds, traffic.server_seconds,
        session.codec.error_bound(len(outcome.included)), protocol, session.threshold,
        session.degree,
    )


def _private_sum(stacked: np.ndarray, protocol: str, plan: FaultPlan, dp: DPSpec, *,
                 threshold: int | None, degree: int | None, ring_bits: int,
                 expected_dropout: float, threat_model: str) -> SecureSumResult:
    """One DP release through protocols.registry (clients silent before uploading are absent)."""
    from .registry import open_session

    n, m = stacked.shape
    session = open_session(protocol, n, m, clip=dp.l2_clip, ring_bits=ring_bits, dp=dp,
                           threshold=threshold, degree=degree, expected_dropout=expected_dropout,
                           threat_model=threat_model)
    before = {d.client for d in plan.dropouts if d.stage in (Stage.ADVERTISE, Stage.UPLOAD)}
    after = [d.client for d in plan.dropouts if d.client not in before]
    outcome = session.step({c: stacked[c] for c in range(n) if c not in before},
                           drop_after_upload=after)
    traffic = session.traffic
    included = tuple(sorted(outcome.included))
    return SecureSumResult(
        outcome.total, included, tuple(sorted(outcome.dropped)), traffic.bytes_up,
        traffic.bytes_down, traffic.client_seconds, traffic.server_seconds,
        session.error_bound(max(len(included), 1)), protocol, session.threshold, session.degree)


def _plain_sum(stacked: np.ndarray, plan: FaultPlan) -> SecureSumResult:
    """The unprotected baseline: float32 vectors sent in the clear and added by the server."""
    n, m = stacked.shape
    gone = {d.client for d in plan.dropouts if d.stage in (Stage.ADVERTISE, Stage.UPLOAD)}
    included = tuple(c for c in range(n) if c not in gone)
    start = time.perf_counter()
    total = stacked[list(included)].astype(np.float32).sum(axis=0, dtype=np.float64)
    seconds = time.perf_counter() - start
    up = np.array([4 * m if c in included else 0 for c in range(n)], dtype=np.int64)
    return SecureSumResult(total, included, tuple(sorted(gone)), up, np.zeros(n, np.int64),
                           np.zeros(n), seconds, 0.0, "plain", 1, n - 1)
