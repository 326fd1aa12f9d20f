"""CoDream rounds across clients, and the channels that run their sums as aggregation sessions.

The bridge is explicit: torch tensor -> float32 numpy -> aggregator session -> numpy -> tensor.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from protocols import registry
from protocols.dp.mechanisms import DPSpec
from protocols.errors import NonFiniteInputError, TooFewSurvivorsError
from protocols.registry import open_session
from protocols.session import AggregationSession

from .config import AggregationConfig, CoDreamConfig, DeviceConfig
from .dreams import (
    DreamBuffer,
    DreamLossWeights,
    DreamSynthesizer,
    DreamTargets,
    NonFiniteGradientError,
    dream_gradient,
    server_entropy_gradient,
)
from .errors import ConfigError
from .generator_dreams import DreamObjective, GeneratorDreamer, NoDreamsError, batch_of_step
from .member import (  # ModelDivergedError: re-exported, callers catch it from here
    KDOutcome,
    Member,
    ModelDivergedError,
    check_finite,
    distill_model,
    kd_options,
    trains_after_acquisition,
)
from .results import ClientData, MethodResult
from .seeds import derived_seed, generator

__all__ = ["AggregationChannel", "ChannelStats", "CoDreamFederation", "ModelDivergedError",
           "RoundRecord", "derived_seed", "generator", "kd_record"]
from .teacher import (
    class_histogram,
    class_shares,
    class_weighted_teacher,
    draw_targets,
    teacher_quality,
)
from .train_step import FastPath

if TYPE_CHECKING:  # opacus loads only for runs with DP
    from .privacy import PrivacyLedger
    from .sample_dp import SampleLevelTrainer


@dataclass
class ChannelStats:
    """What the aggregation of one kind of vector cost and how far it is from a plain sum."""

    steps: int = 0
    max_abs_error: float = 0.0
    sum_abs_error: float = 0.0
    values: int = 0
    clipped: int = 0
    seconds: float = 0.0

    def observe(self, secure: np.ndarray, plain: np.ndarray, clipped: int, seconds: float) -> None:
        diff = np.abs(secure - plain)
        self.steps += 1
        self.max_abs_error = max(self.max_abs_error, float(diff.max(initial=0.0)))
        self.sum_abs_error += float(diff.sum())
        self.values += diff.size
        self.clipped += clipped
        self.seconds += seconds


class AggregationChannel:
    """Sums one vector per client through the configured aggregator, one session per round."""

    def __init__(self, aggregator: str, n_clients: int, *, clip: float, ring_bits: int,
                 expected_dropout: float, purpose: str = "dream-gradient",
                 key_bits: int = 3072, dp: DPSpec | None = None,
                 ledger: PrivacyLedger | None = None, masking: str = "host",
                 device: torch.device | None = None, threat_model: str = "active") -> None:
        if masking not in ("host", "device"):
            raise ConfigError(f"masking must be 'host' or 'device', got {masking!r}")
        self.purpose, self.dp, self.ledger = purpose, dp, ledger
        self.threat_model = threat_model
        # device: each client's upload is quantised and masked where its tensor lives (ChaCha20
        # session PRG, bit-identical to a host client); vectors may then be torch tensors
        self.device_masking = masking == "device"
        # ... and on a CUDA `device` the server sums and unmasks there too (bit-identical); on
        # the CPU numpy's sums and `cryptography`'s keystream are the faster server
        self.device_unmasking = (self.device_masking and device is not None
                                 and device.type == "cuda")
        self.device = device
        self.dp_clipped = 0  # client vectors scaled down to the DP L2 clip
        self.aggregator, self.n_clients, self.clip = aggregator, n_clients, clip
        self.spec = registry.get(aggregator)
        self.ring_bits, self.expected_dropout, self.key_bits = ring_bits, expected_dropout, key_bits
        self.stats = ChannelStats()
        self.bytes_up = np.zeros(n_clients, np.int64)
        self.bytes_down = np.zeros(n_clients, np.int64)
        self.session: AggregationSession | None = None
        self._keypair: object | None = None  # Paillier: one key holder for the whole run
        self._traffic_seen = (np.zeros(n_clients, np.int64), np.zeros(n_clients, np.int64))

    def open(self, vector_length: int, *, seed: tuple) -> None:
        """Start a session (one key setup) for vectors of this length.

        `seed` keys the clients' stochastic rounding; SecAgg clients mix in a secret of their
        own and the session id, so there a resumed run matches an uninterrupted one only to
        within the rounding of each sum. Masks stay fresh randomness (they cancel exactly).
        """
        close = getattr(self.session, "close", None)
        if close is not None:  # a Paillier session's encryption workers
            close()
        if self.spec.key_holder and self._keypair is None:
            self._keypair = self.spec.generate_keypair(self.key_bits)
        self.session = open_session(
            self.aggregator, self.n_clients, vector_length, clip=self.clip,
            ring_bits=self.ring_bits, expected_dropout=self.expected_dropout,
            rounding_seed=hashlib.sha256(repr(seed).encode()).digest(),
            key_bits=self.key_bits, keypair=self._keypair, dp=self.dp,
            threat_model=self.threat_model,
            **self._masking_options(),
        )
        self._traffic_seen = (np.zeros(self.n_clients, np.int64),
                              np.zeros(self.n_clients, np.int64))
        self._account()

    def _masking_options(self) -> dict:
        if not self.device_masking:
            return {}
        from .gpu.masking import protocol_masker, protocol_unmasker

        # `sum` refuses a non-finite vector for every client with one sync before the session
        # sees it, so the maskers need not sync once each to check it again
        masker = protocol_masker(check_finite=False)
        options = {"prg": "chacha20", "maskers": {c: masker for c in range(self.n_clients)}}
        if self.device_unmasking:
            options["unmasker"] = protocol_unmasker(self.device)
        return options

    def _account(self) -> None:
        assert self.session is not None
        traffic = self.session.traffic
        up0, down0 = self._traffic_seen
        self.bytes_up += traffic.bytes_up - up0
        self.bytes_down += traffic.bytes_down - down0
        self._traffic_seen = (traffic.bytes_up.copy(), traffic.bytes_down.copy())

    @property
    def error_bound(self) -> float | None:
        """Worst-case per-coordinate decode error of one step's sum (None before a session)."""
        return None if self.session is None else self.session.error_bound(self.n_clients)

    def sum(self, inputs: dict[int, np.ndarray], *, drop_after_upload: Sequence[int] = ()
            ) -> tuple[np.ndarray, frozenset[int]]:
        """The sum over the clients that made it, and who they are.

        A non-finite input is an error naming the client, never a silent exclusion.
        """
        if self.session is None:
            raise RuntimeError("open() the channel before summing")
        hint = "(its model diverged? lower the learning rates)"
        for client in _non_finite_tensors(inputs):
            raise NonFiniteGradientError(
                f"client {client}'s vector for the {self.purpose} sum holds NaN or inf {hint}")
        start = time.perf_counter()
        clipped_before = getattr(self.session, "clipped", 0)
        try:
            outcome = self.session.step(inputs, drop_after_upload=drop_after_upload)
        except NonFiniteInputError as error:  # host vectors: the session checks them itself
            raise NonFiniteGradientError(f"{error}, in the {self.purpose} sum {hint}") from None
        seconds = time.perf_counter() - start
        self._account()
        if self.ledger is not None:
            self.ledger.record(1)  # one released aggregate
        if self.dp is not None:  # the noise is the point: no secure-vs-plain error to measure
            self.dp_clipped += getattr(self.session, "clipped", 0) - clipped_before
            self.stats.steps += 1
            self.stats.seconds += seconds
            return outcome.total, outcome.included
        members = sorted(outcome.included)
        # the reference is what a plain run would have summed: clipping counts as error here
        plain, clipped = _plain_reference([inputs[c] for c in members], self.clip)
        if not self.spec.fixed_point:  # floats in the clear: nothing was clipped
            clipped = 0
        self.stats.observe(outcome.total, plain, clipped, seconds)
        return outcome.total, outcome.included


def _non_finite_tensors(inputs: dict) -> list[int]:
    """Clients whose torch tensor holds NaN/inf, with one sync for all of them (the session
    checks only a device-masked vector's length: reading it would copy it to the host)."""
    tensors = [c for c, v in inputs.items() if torch.is_tensor(v)]
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(inputs[c]).all() for c in tensors]).cpu()
    return sorted(c for c, ok in zip(tensors, finite.tolist(), strict=True) if not ok)


def _plain_reference(vectors: list, clip: float) -> tuple[np.ndarray, int]:
    """What a plain run would have summed (float64), and how many values exceed the clip.

    Device tensors are summed where they live: one vector crosses to the host, not n.
    """
    if vectors and all(torch.is_tensor(v) for v in vectors):
        stacked = torch.stack([v.reshape(-1) for v in vectors])
        clipped = int((stacked.abs() > clip).sum())
        return stacked.double().sum(0).cpu().numpy(), clipped
    arrays = [np.asarray(v.cpu() if torch.is_tensor(v) else v) for v in vectors]
    clipped = sum(int(np.count_nonzero(np.abs(a) > clip)) for a in arrays)
    return np.sum(arrays, axis=0, dtype=np.float64), clipped


def kd_record(members: list[int], outcomes: Sequence[KDOutcome]) -> dict:
    """A round's distillation record: each member's accuracies before and after, and whether
    it kept the distilled weights."""
    return {"clients": members, "val_before": [o.val_before for o in outcomes],
            "val_after": [o.val_after for o in outcomes],
            "test_before": [o.test_before for o in outcomes],
            "test_after": [o.test_after for o in outcomes], "kept": [o.kept for o in outcomes]}


@dataclass
class RoundRecord:
    """One CoDream round's per-client accuracies, traffic and time."""

    round: int
    val: list[float]
    test: list[float]
    bytes_up: list[int]
    bytes_down: list[int]
    seconds: dict[str, float]
    dropped: list[int]
    included_in_dreams: list[int] = field(default_factory=list)
    note: str = ""
    epsilon: float | None = None
    teacher: dict = field(default_factory=dict)
    kd: dict = field(default_factory=dict)
    skipped_batches: int | None = None  # generator mode: dream batches whose sum was not finite

    def to_dict(self) -> dict:
        return {
            "round": self.round,
            "codream": {"val": self.val, "test": self.test, "mean_test": float(np.mean(self.test))},
            "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "seconds": self.seconds,
            "dropped": self.dropped, "included_in_dreams": self.included_in_dreams,
            "note": self.note, "epsilon": self.epsilon, "skipped_batches": self.skipped_batches,
            "teacher": self.teacher, "kd": self.kd,
        }


class CoDreamFederation:
    """Clients with their own models and data, a server model, and the dream buffer."""

    def __init__(self, clients: Sequence[ClientData], models: Sequence[nn.Module],
                 server_model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, *,
                 codream: CoDreamConfig, seed: int, grad_channel: AggregationChannel,
                 label_channel: AggregationChannel, device: torch.device,
                 aggregation: AggregationConfig | None = None,
                 device_options: DeviceConfig | None = None, use_bn_statistics: bool = True,
                 weights: DreamLossWeights | None = None,
                 trainers: Sequence[SampleLevelTrainer] | None = None,
                 teacher: str = "uniform",
                 histogram_channel: AggregationChannel | None = None,
                 dreamer: GeneratorDreamer | None = None) -> None:
        """`codream` drives the rounds; `aggregation` supplies the simulated dropouts (none by
        default), `device_options` the precision and CUDA graphs (fp32, none by default).
        `teacher` "class-aware" weights soft labels per class and needs `histogram_channel`,
        through which the pooled class histogram is released once, after warm-up. `dreamer`
        holds the meta-generator of dream_mode "generator" (its updates use grad_channel)."""
        if teacher not in ("uniform", "class-aware"):
            raise ConfigError(f"teacher must be 'uniform' or 'class-aware', got {teacher!r}")
        if teacher == "class-aware" and histogram_channel is None:
            raise ConfigError("a class-aware teacher needs a channel for the class histogram")
        if codream.dream_objective == "label" and teacher != "class-aware":
            raise ConfigError("label-conditioned dreams need the class-aware teacher")
        self.teacher_kind, self.histogram_channel = teacher, histogram_channel
        self.pooled_histogram: np.ndarray | None = None
        self._share_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if codream.dream_mode == "generator" and dreamer is None:
            raise ConfigError('[codream] dream_mode = "generator" needs a GeneratorDreamer')
        self.dreamer = dreamer
        self.clients, self.models, self.server_model = list(clients), list(models), server_model
        self.trainers = None if trainers is None else list(trainers)  # sample-level DP-SGD
        self.x_test, self.y_test, self.s, self.device = x_test, y_test, codream, device
        self.seed, self.use_bn_statistics = seed, use_bn_statistics
        self.dropout = aggregation or AggregationConfig()
        self.compute = device_options or DeviceConfig()
        self.grad_channel, self.label_channel = grad_channel, label_channel
        self.weights = weights or DreamLossWeights(pred=codream.dream_pred_weight,
                                                   bn=codream.dream_bn_weight)
        self.buffer = DreamBuffer(codream.buffer_size)
        self.result = MethodResult("codream")
        self.rounds: list[RoundRecord] = []
        self.last_dreams: torch.Tensor | None = None
        self.broadcast_down = np.zeros(len(clients), np.int64)
        self._fast_steps: list[tuple[list[int], object]] | None = None
        # local training and distillation: compiled with bf16 on CUDA (replayed as CUDA graphs
        # with train_cuda_graphs="on"), eager elsewhere
        self.train_path = FastPath.optimised(device, self.compute.precision,
                                             cuda_graphs=self.compute.train_cuda_graphs == "on")
        self.members = [
            Member(k, model, data, x_test, y_test, codream=codream, seed=seed,
                   precision=self.compute.precision, train_path=self.train_path,
                   trainer=None if self.trainers is None else self.trainers[k],
                   weights=self.weights, use_bn_statistics=use_bn_statistics)
            for k, (model, data) in enumerate(zip(self.models, self.clients, strict=True))]

    @property
    def n(self) -> int:
        return len(self.clients)

    def _evaluate(self, clients: Sequence[int] | None = None) -> tuple[list[float], list[float]]:
        """Validation and test accuracy of each client's model (all by default), after
        re-estimating its BatchNorm statistics on its own training data when configured."""
        scores = [self.members[k].evaluate() for k in (range(self.n) if clients is None
                                                       else clients)]
        return [v for v, _ in scores], [t for _, t in scores]

    def epsilon(self) -> float | None:
        """Epsilon spent so far: the client-level ledger's, or the largest client's DP-SGD one."""
        ledger = self.grad_channel.ledger
        if ledger is not None:
            return ledger.epsilon()
        if self.trainers is not None:
            return max(t.epsilon() for t in self.trainers)
        return None

    def _train_locally(self, round_index: int, epochs: int,
                       clients: Sequence[int] | None = None) -> None:
        for member in self.members:
            if clients is None or member.index in clients:
                member.train(round_index, epochs)

    def warm_up(self) -> None:
        """Local training before any collaboration; recorded as round 0."""
        start = time.perf_counter()
        self._train_locally(0, self.s.warmup_epochs)
        if self.teacher_kind == "class-aware":
            self.release_histogram()
        val, test = self._evaluate()
        self.result.record(val, test)
        zeros = [0] * self.n
        self.rounds.append(RoundRecord(0, val, test, zeros, zeros,
                                       {"local": time.perf_counter() - start}, [],
                                       epsilon=self.epsilon()))

    def release_histogram(self) -> None:
        """Sum the clients' class counts through the aggregator: the one release of them."""
        assert self.histogram_channel is not None
        counts = {k: class_histogram(c.y_train, self._classes()) for k, c in
                  enumerate(self.clients)}
        self.histogram_channel.open(self._classes(), seed=(self.seed, "histogram"))
        total, included = self.histogram_channel.sum(counts)
        if len(included) != self.n:
            raise TooFewSurvivorsError("the class histogram needs every client after warm-up")
        self.pooled_histogram = np.rint(np.clip(total, 0, None))

    def _classes(self) -> int:
        """The number of classes, from the server model's output layer."""
        return int(self.server_model.num_classes)

    def _shares(self, k: int) -> np.ndarray:
        """Client k's share of each class, computed once per pooled histogram (it is released
        once, or restored once, before any round)."""
        assert self.pooled_histogram is not None
        cached = self._share_cache.get(k)
        if cached is None or cached[0] is not self.pooled_histogram:
            own = class_histogram(self.clients[k].y_train, self._classes())
            cached = (self.pooled_histogram, class_shares(own, self.pooled_histogram))
            self._share_cache[k] = cached
        return cached[1]

    def _dream_gradients(self, clients: list[int], x: torch.Tensor,
                         targets: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each client's grad_x of its dream loss: the reference fp32 path, or the fast path
        (bf16; clients sharing an architecture in one vmapped step; on CUDA compiled with CUDA
        graphs, one per group or, with dream_graph="one", one for every client). Label-
        conditioned dreams (`targets`) always take the reference path."""
        if targets is not None:
            return [dream_gradient(self.models[c], x, self.weights,
                                   use_bn_statistics=self.use_bn_statistics,
                                   targets=DreamTargets(targets, torch.from_numpy(
                                       self._shares(c)).float()))
                    for c in clients]
        if self.compute.precision == "fp32":
            return [dream_gradient(self.models[c], x, self.weights,
                                   use_bn_statistics=self.use_bn_statistics) for c in clients]
        from .gpu.fast_dream import FastDreamStep

        grads: dict[int, torch.Tensor] = {}
        for group, step in self._fast_path(tuple(x.shape)):
            if not any(c in clients for c in group):
                continue
            # the whole group runs (one vmapped pass, one graph); a member that dropped is
            # discarded
            out = step(x)
            for c, grad in zip(group, [out] if isinstance(step, FastDreamStep) else out,
                               strict=True):
                grads[c] = grad
        return [grads[c] for c in clients]

    def _fast_path(self, x_shape: tuple[int, ...]) -> list[tuple[list[int], object]]:
        """(clients, step) per architecture, or one graphed step for all clients (dream_graph
        "one"), built once: on CUDA it compiles and captures graphs."""
        if self._fast_steps is None:
            from .gpu.fast_dream import BatchedDreamStep, FastDreamStep, group_by_architecture

            options = {"use_bn_statistics": self.use_bn_statistics, "precision": "bf16"}
            if self.compute.dream_graph == "one":
                from .gpu.graphed import GraphedDreamGradients

                graphed = GraphedDreamGradients(self.models, x_shape, self.weights,
                                                groups=group_by_architecture(self.models),
                                                **options)
                self._fast_steps = [(list(range(self.n)), graphed)]
                return self._fast_steps
            self._fast_steps = []
            for group in group_by_architecture(self.models):
                models = [self.models[c] for c in group]
                step = (FastDreamStep.optimised(models[0], self.weights, **options)
                        if len(group) == 1 else
                        BatchedDreamStep.optimised(models, self.weights, **options))
                self._fast_steps.append((group, step))
        return self._fast_steps

    def _dropouts(self, round_index: int) -> dict[int, tuple[int, bool]]:
        """Client -> (dream step at which it drops, whether after its upload) for this round."""
        rng = random.Random(derived_seed(self.seed, "dropout", round_index))
        plan = {c: (1, False) for c in self.dropout.dropout_clients}
        for c in range(self.n):
            if c not in plan and rng.random() < self.dropout.dropout_rate:
                plan[c] = (rng.randint(1, self.s.dream_steps), rng.random() < 0.5)
        return plan

    def _targets(self, round_index: int) -> torch.Tensor | None:
        """The round's dream targets, drawn from the pooled histogram (label objective only)."""
        if self.s.dream_objective != "label":
            return None
        assert self.pooled_histogram is not None
        return draw_targets(self.pooled_histogram, self.s.dream_batch,
                            generator(self.seed, "targets", round_index))

    def _synthesise(self, round_index: int, plan: dict[int, tuple[int, bool]],
                    progress, seconds: dict[str, float], targets: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, frozenset[int]]:
        """Jointly optimise a dream batch; every step's gradient sum is a secure sum."""
        shape = (self.s.dream_batch, *self.clients[0].x_train.shape[1:])
        # the dreams and their Adam state live where the models do: one upload of the mean
        # gradient per step instead of the dreams going up and the optimiser running on the host
        synth = DreamSynthesizer(shape, generator=generator(self.seed, "dreams", round_index),
                                 lr=self.s.dream_lr, device=self.device)
        self.grad_channel.open(int(np.prod(shape)), seed=(self.seed, "dreams", round_index))
        active = set(range(self.n))
        task = progress.task(f"round {round_index} dreams", self.s.dream_steps) \
            if progress else None
        for step in range(1, self.s.dream_steps + 1):
            x = synth.dreams
            start = time.perf_counter()
            leaving_before = {c for c, (s, after) in plan.items() if s == step and not after}
            leaving_after = [c for c, (s, after) in plan.items() if s == step and after]
            members = sorted(active - leaving_before)
            grads = self._dream_gradients(members, x, targets)
            # device masking: the gradient is quantised and masked where it was computed
            inputs = {c: g.reshape(-1) if self.grad_channel.device_masking
                      else g.cpu().numpy().reshape(-1) for c, g in zip(members, grads, strict=True)}
            seconds["dreams"] += time.perf_counter() - start
            start = time.perf_counter()
            total, included = self.grad_channel.sum(inputs, drop_after_upload=leaving_after)
            seconds["aggregation"] += time.perf_counter() - start
            active = set(included) - set(leaving_after)
            for c in active:  # the server broadcasts the next dream batch to each active client
                self.broadcast_down[c] += x.numel() * x.element_size()
            mean = torch.from_numpy((total / len(included)).astype(np.float32)).reshape(shape)
            adaptive = None
            if round_index > self.s.adaptive_after:
                adaptive = server_entropy_gradient(self.server_model, x)
            synth.step(mean, adaptive_gradient=adaptive, adaptive_weight=self.s.adaptive_weight)
            if progress:
                progress.advance(task)
        if progress:
            progress.done(task)
        return synth.dreams.cpu(), frozenset(active)

    def _synthesise_generator(self, round_index: int, plan: dict[int, tuple[int, bool]],
                              progress, seconds: dict[str, float],
                              targets: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, frozenset[int], torch.Tensor | None]:
        """CoDream-fast: one secure sum of the clients' (generator, latent) updates per dream
        batch. A dropout planned at pixel step s falls in batch ceil(s * batches / dream_steps).
        Label-conditioned dreams aim every batch at the round's `targets`; returned with the
        dreams, they are repeated once per kept batch."""
        assert self.dreamer is not None
        batches = self.dreamer.settings.batches
        leaving = {c: (batch_of_step(step, self.s.dream_steps, batches), after)
                   for c, (step, after) in plan.items()}
        adaptive = None
        if round_index > self.s.adaptive_after and self.s.adaptive_weight > 0:
            def adaptive(x: torch.Tensor) -> torch.Tensor:
                return server_entropy_gradient(self.server_model, x)
        self.grad_channel.open(self.dreamer.vector_length,
                               seed=(self.seed, "generator", round_index))
        outcome = self.dreamer.dream(
            round_index, range(self.n), self._generator_objective(targets), self.grad_channel,
            latent_seeds=lambda batch: generator(self.seed, "latents", round_index, batch),
            leaving=leaving, adaptive=adaptive, adaptive_weight=self.s.adaptive_weight,
            seconds=seconds, progress=progress)
        for c, sent in outcome.bytes_down.items():
            self.broadcast_down[c] += sent
        if targets is not None:
            targets = targets.repeat(len(outcome.dreams) // len(targets))
        return outcome.dreams, outcome.members, targets

    def _note_skipped_batches(self, record: RoundRecord) -> None:
        """Generator mode: how many dream batches the round skipped, and why, in its record."""
        reasons = None if self.dreamer is None else self.dreamer.skipped.get(record.round)
        if reasons is None:
            return
        record.skipped_batches = len(reasons)
        if reasons:
            skipped = f"skipped dream {'; '.join(reasons)}"
            record.note = f"{record.note}; {skipped}" if record.note else skipped

    def _generator_objective(self, targets: torch.Tensor | None) -> DreamObjective:
        """Each client's loss on a batch's dreams G(z): the pixel-mode dream loss, label-
        conditioned on `targets` if given. The batch index is where per-batch targets would
        be looked up."""
        def loss(client: int, batch: int, x: torch.Tensor) -> torch.Tensor:
            conditioned = None if targets is None else DreamTargets(
                targets, torch.from_numpy(self._shares(client)).float())
            return self.members[client].dream_loss(x, conditioned)
        return loss

    def _teacher(self, round_index: int, dreams: torch.Tensor, members: frozenset[int],
                 targets: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The members' soft labels on the dreams, summed securely: their mean, or weighted
        per class by each member's share of the class; and the teacher's quality."""
        labels = {c: self.members[c].labels(dreams.to(self.device)) for c in sorted(members)}
        if self.teacher_kind == "class-aware":
            outputs = {c: np.concatenate([(p.numpy() * (a := self._shares(c))).reshape(-1),
                                          a]).astype(np.float32)
                       for c, p in labels.items()}
        else:
            outputs = {c: p.numpy().reshape(-1) for c, p in labels.items()}
        self.label_channel.open(next(iter(outputs.values())).size,
                                seed=(self.seed, "labels", round_index))
        total, included = self.label_channel.sum(outputs)
        if self.teacher_kind == "class-aware":
            classes = self._classes()
            teacher = torch.from_numpy(class_weighted_teacher(
                total, dreams.shape[0], classes).astype(np.float32))
            probs = [labels[c] for c in sorted(included)]
            return teacher, teacher_quality(teacher, probs, targets)
        teacher = self._mean_teacher(total, len(included), dreams.shape[0])
        probs = [labels[c] if self.s.soft_labels == "probs" else labels[c].softmax(dim=1)
                 for c in sorted(included)]
        shown = teacher if self.s.soft_labels == "probs" else teacher.softmax(dim=1)
        return teacher, teacher_quality(shown, probs, targets)

    def _mean_teacher(self, total: np.ndarray, included: int, dreams: int) -> torch.Tensor:
        """The plain mean of the released soft labels (onto the simplex after DP noise)."""
        mean = (total / included).reshape(dreams, -1)
        if self.label_channel.dp is not None and self.s.soft_labels == "probs":
            # post-processing of the noisy release (costs no privacy): back onto the simplex
            mean = np.clip(mean, 0.0, None)
            rows = mean.sum(axis=1, keepdims=True)
            mean = np.where(rows > 0, mean / np.where(rows > 0, rows, 1.0), 1.0 / mean.shape[1])
        return torch.from_numpy(mean.astype(np.float32))

    def _bytes_down(self) -> np.ndarray:
        return self.grad_channel.bytes_down + self.label_channel.bytes_down + self.broadcast_down

    def run_round(self, round_index: int, progress=None) -> RoundRecord:
        """One round in [codream] round_order: "local-last" (the official code's order:
        dreams, soft labels, distillation, then local training), "distill-last" (local
        training first, so the round ends with the knowledge the dreams brought) or "joint"
        (dreams, soft labels, then local training that distils in every step); then
        evaluation."""
        seconds = {"local": 0.0, "dreams": 0.0, "aggregation": 0.0, "distill": 0.0}
        up0 = self.grad_channel.bytes_up + self.label_channel.bytes_up
        down0 = self._bytes_down()
        if self.s.round_order == "distill-last":
            start = time.perf_counter()
            self._train_locally(round_index, self.s.local_epochs)
            seconds["local"] = time.perf_counter() - start
        plan = self._dropouts(round_index)
        dropped = sorted(plan)
        targets = self._targets(round_index)
        quality: dict = {}
        try:
            if self.dreamer is None:
                dreams, members = self._synthesise(round_index, plan, progress, seconds, targets)
            else:
                dreams, members, targets = self._synthesise_generator(
                    round_index, plan, progress, seconds, targets)
            start = time.perf_counter()
            teacher, quality = self._teacher(round_index, dreams, members, targets)
            seconds["aggregation"] += time.perf_counter() - start
        except (TooFewSurvivorsError, NoDreamsError) as error:
            note = f"no knowledge exchange this round: {error}"
            if progress:
                progress.log(f"round {round_index}: {note}")
            dreams, members, teacher = None, frozenset(), None
        else:
            note = ""
        kd: dict = {}
        if dreams is not None and teacher is not None:
            self.last_dreams = dreams
            self.buffer.add(dreams, teacher)
            start = time.perf_counter()
            kd = self._distill_members(round_index, sorted(members))
            seconds["distill"] = time.perf_counter() - start
        acquired = set(members) if kd else set()
        trainees = [k for k in range(self.n)
                    if trains_after_acquisition(self.s, acquired=k in acquired)]
        if trainees:
            start = time.perf_counter()
            self._train_locally(round_index, self.s.local_epochs, trainees)
            seconds["local"] = time.perf_counter() - start
        val, test = self._evaluate()
        self.result.record(val, test)
        up = self.grad_channel.bytes_up + self.label_channel.bytes_up - up0
        down = self._bytes_down() - down0
        record = RoundRecord(round_index, val, test, [int(b) for b in up], [int(b) for b in down],
                             seconds, dropped, sorted(members), note, epsilon=self.epsilon(),
                             teacher=quality, kd=kd)
        self._note_skipped_batches(record)
        self.rounds.append(record)
        return record

    def _distill_members(self, round_index: int, members: list[int]) -> dict:
        """Distil every member (and the server) on the buffer; with the validation gate a
        member whose validation accuracy dropped keeps its pre-distillation weights.
        Returns the members' validation and test accuracy before and after."""
        bx, by = self.buffer.tensors()
        bx, by = bx.to(self.device), by.to(self.device)
        options = kd_options(self.s, self.compute.precision, self.train_path)
        outcomes = [self.members[k].acquire(round_index, bx, by, options) for k in members]
        distill_model(self.server_model, bx, by, seed=self.seed, round_index=round_index,
                      key="server", options=options)
        check_finite(self.server_model, "the server's model", round_index)
        return kd_record(members, outcomes)
