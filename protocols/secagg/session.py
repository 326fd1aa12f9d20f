"""A multi-step pairwise-mask session (SecAgg, SecAgg+): one key setup, then one sum per step.

The server, the clients and the in-process network that carries their bytes, behind the
session interface of protocols.session.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from ..codec import FixedPointCodec, Rounding
from ..errors import ConsistencyAbortError, NonFiniteInputError, TooFewSurvivorsError
from ..inputs import check_count, check_step_inputs, without_departed
from ..limits import OfferLimits
from ..network import InProcessNetwork
from ..plan import mask_graph
from ..primitives.kdf import derive_key
from ..session import Dropout, FaultPlan, RingNoise, Stage, StepOutcome, Traffic
from .client import InputProvider, Masker, SecAggClient
from .limits import check_session
from .server import SecAggServer, Unmasker

__all__ = ["PairwiseMaskSession", "pairwise_server"]


def pairwise_server(n_clients: int, vector_length: int, *, clip: float, sparse: bool,
                    threshold: int | None = None, degree: int | None = None,
                    ring_bits: int = 32, scale_bits: int | None = None,
                    rounding: Rounding = "stochastic", headroom: float = 0.0,
                    prg: str = "aes-256-ctr", expected_dropout: float = 0.1,
                    corrupt_rate: float = 0.05, unmasker: Unmasker | None = None,
                    threat_model: str = "active", limits: OfferLimits | None = None
                    ) -> SecAggServer:
    """The server of a SecAgg/SecAgg+ session: its codec, neighbour graph and threshold, checked
    against `limits` (what every client would refuse is refused here, naming the limit)."""
    codec = FixedPointCodec.for_clients(n_clients, clip=clip, ring_bits=ring_bits,
                                        scale_bits=scale_bits, rounding=rounding,
                                        headroom=headroom, prg=prg)
    graph, threshold = mask_graph(n_clients, sparse=sparse, threshold=threshold, degree=degree,
                                  expected_dropout=expected_dropout, corrupt_rate=corrupt_rate)
    check_session(limits or OfferLimits(), n_clients=n_clients, degree=graph.degree,
                  threshold=threshold, vector_length=vector_length)
    return SecAggServer(graph=graph, threshold=threshold, codec=codec,
                        vector_length=vector_length, unmasker=unmasker, threat_model=threat_model)


class PairwiseMaskSession:
    """A multi-step SecAgg/SecAgg+ session: one key setup, then one `step` per summed vector.

    `sparse` lets SecAgg+ pick a sparse neighbour graph for large n (protocols.plan.mask_graph);
    `aggregator` is the name the session reports. `prg` picks the keystream of masks and dither
    ("aes-256-ctr" or "chacha20"); `maskers` gives chosen clients a device masker
    (codream_secure.gpu.masking.protocol_masker), and `unmasker` the server a device unmasker
    (codream_secure.gpu.masking.protocol_unmasker). `threat_model` "active" (default) adds the
    consistency round that keeps a lying server from unmasking anyone with fewer than t
    colluders; "semi-honest" skips it. `limits` (protocols.limits.OfferLimits) is the
    largest session the clients join; the session refuses to open beyond it.
    """

    def __init__(self, n_clients: int, vector_length: int, *, clip: float, aggregator: str,
                 sparse: bool, threshold: int | None = None, degree: int | None = None,
                 ring_bits: int = 32, scale_bits: int | None = None,
                 expected_dropout: float = 0.1, corrupt_rate: float = 0.05,
                 rounding: Rounding = "stochastic", faults: FaultPlan | None = None,
                 rounding_seed: bytes | None = None, noise: RingNoise | None = None,
                 prg: str = "aes-256-ctr", maskers: Mapping[int, Masker] | None = None,
                 unmasker: Unmasker | None = None, threat_model: str = "active",
                 limits: OfferLimits | None = None) -> None:
        n_clients = check_count("secure aggregation's number of clients", n_clients, low=2)
        vector_length = check_count("vector_length", vector_length)
        limits = limits or OfferLimits()
        self.server = pairwise_server(
            n_clients, vector_length, clip=clip, sparse=sparse, threshold=threshold,
            degree=degree, ring_bits=ring_bits, scale_bits=scale_bits, rounding=rounding,
            headroom=0.0 if noise is None else noise.headroom, prg=prg,
            expected_dropout=expected_dropout, corrupt_rate=corrupt_rate, unmasker=unmasker,
            threat_model=threat_model, limits=limits)
        self.codec = self.server.codec
        self.protocol, self.n_clients, self.vector_length = aggregator, n_clients, vector_length
        self._pending: dict[int, np.ndarray] = {}
        self._masked_elsewhere = frozenset(maskers or {})
        clients = {
            cid: SecAggClient(self._provider(cid), noise=noise, limits=limits,
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

    def _provider(self, cid: int) -> InputProvider:
        def provide(step: int) -> np.ndarray:
            return self._pending[cid]
        return provide

    @property
    def active(self) -> frozenset[int]:
        """Clients still taking part in the session."""
        return self.server.active

    def close(self) -> None:
        """Nothing to release: the parties live in this process."""

    def step(self, inputs: Mapping[int, np.ndarray], *,
             drop_after_upload: Iterable[int] = ()) -> StepOutcome:
        """Sum one vector per active client.

        Active clients missing from `inputs` drop before uploading; those in `drop_after_upload`
        upload and then fall silent (their self masks are recovered from shares). A client that
        left the session earlier (at setup or at an earlier step) stays out: its input and its
        `drop_after_upload` entry are ignored. Inputs no client could send (an unknown id, a
        wrong length, NaN) are refused before any message. A client silent in the consistency
        round aborts the step; the same inputs are then summed at the next step id without it
        (the outcome's `step` is that id, and the traffic counts both tries). The outcome's
        `dropped` are the clients active when the call began that are not in the sum.
        """
        inputs, drop_after_upload = without_departed(inputs, drop_after_upload,
                                                     n_clients=self.n_clients, active=self.active)
        dropping = check_step_inputs(inputs, drop_after_upload, active=self.active,
                                     length=self.vector_length, floats_only=True,
                                     masked_elsewhere=self._masked_elsewhere)
        first = upcoming = self.server.last_step + 1
        self.network.add_dropouts(
            [Dropout(c, upcoming, Stage.UPLOAD) for c in self.active if c not in inputs]
        )
        before = self.active
        self._pending = dict(inputs)
        try:
            while True:
                # moved to each try: a late dropout falls silent after that try's upload
                self.network.leave_after_upload([c for c in dropping if c in self.active],
                                                upcoming)
                try:
                    outcome = self.network.step()
                    break
                except ConsistencyAbortError:
                    # nothing of the aborted step can be unmasked (no share was released), and
                    # the retry masks its inputs with fresh per-step secrets
                    self.server.abandon_step()
                    upcoming = self.server.last_step + 1
        except TooFewSurvivorsError as error:
            # the next step starts afresh with this one's survivors (safe: every secret
            # revealed during a step is specific to it), instead of a StageError
            self.server.abandon_step()
            self._refuse_masker_errors(first, upcoming, cause=error)
            raise
        finally:
            self._pending = {}
            # whatever happened, those who were to leave have left for good
            self.network.leave_after_upload((), upcoming)
            self.network.add_dropouts([Dropout(c, upcoming, Stage.SHARES) for c in dropping])
        self._refuse_masker_errors(first, upcoming)
        return dataclasses.replace(outcome, dropped=frozenset(before - outcome.included))

    def _refuse_masker_errors(self, first: int, last: int, *,
                              cause: Exception | None = None) -> None:
        """A device masker that refused its client's vector mid-step: no sum is returned."""
        for when, client, error in self.network.refusals:
            if first <= when <= last and isinstance(error, NonFiniteInputError):
                raise NonFiniteInputError(
                    f"client {client}'s masker refused its vector at step {when} ({error}); "
                    "the client has left the session and the step's sum is discarded"
                ) from cause
