"""The server side of a CoDream-fast run whose clients are elsewhere, free of Flower types.

It follows `CoDreamFederation.run_round` for dream_mode "generator" step by step, with every
client's work done by that client (a ClientRole) behind a Link, and the same seeds, so the
same config gives the same run as `simulate` up to the rounding of each secure sum. A client
that gives no usable reply (dead, late past a deadline, erroring, refusing, undecodable) has
departed: the protocol's own recovery runs and the run goes on with the survivors.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from protocols.errors import TooFewSurvivorsError

from ..baselines import client_seed, flatten_state, seeded_model
from ..config import SimulationConfig
from ..dreams import DreamBuffer, server_entropy_gradient
from ..errors import ConfigError
from ..federation import RoundRecord, kd_record
from ..generator_dreams import GeneratorDreamer, GeneratorSettings, NoDreamsError
from ..member import KDOutcome, check_finite, distill_model, kd_options
from ..results import MethodResult
from ..seeds import derived_seed, generator
from ..teacher import teacher_quality
from .link import Link
from .payload import Payload, Reply, UndecodableReplyError
from .remote_channel import FLOWER_AGGREGATORS, Departure, RemoteChannel

__all__ = ["Deadlines", "RemoteFederation", "check_flower_config"]


@dataclass(frozen=True)
class Deadlines:
    """Seconds the server waits for replies: to a protocol stage (which includes computing a
    generator update) and to local work (training, distillation, evaluation)."""

    protocol: float = 30.0
    work: float = 600.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"the {name} deadline must be a positive number of seconds, "
                                  f"got {value!r}")


def check_flower_config(config: SimulationConfig) -> None:
    """Refuse what the Flower runtime does not run, naming the key and what to use instead."""
    codream, aggregation = config.codream, config.aggregation
    if codream.dream_mode != "generator":
        raise ConfigError('[codream] dream_mode = "pixel" needs one secure sum per dream step '
                          "(hundreds of round trips a round); on Flower use dream_mode = "
                          '"generator" (a few round trips per dream batch)')
    if config.teacher != "uniform":
        raise ConfigError('[codream] teacher = "class-aware" does not run on Flower yet; use '
                          '"uniform"')
    if config.privacy.dp != "off":
        raise ConfigError("[privacy] dp does not run on Flower yet; use dp = \"off\"")
    if aggregation.aggregator not in FLOWER_AGGREGATORS:
        raise ConfigError(f"[aggregation] aggregator = {aggregation.aggregator!r} does not run "
                          f"on Flower; choose one of {', '.join(FLOWER_AGGREGATORS)}")
    if aggregation.dropout_rate or aggregation.dropout_clients:
        raise ConfigError("[aggregation] dropout_rate and dropout_clients simulate dropouts; on "
                          "Flower dropouts are real (a SuperNode that does not answer): leave "
                          "them at 0 and ()")


@dataclass(frozen=True)
class ClientInfo:
    """What the clients report about the data at the start (they must all agree)."""

    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class RemoteFederation:
    """The server model, the meta-generator, the dream buffer and the round loop."""

    def __init__(self, config: SimulationConfig, link: Link, *,
                 deadlines: Deadlines | None = None, progress=None) -> None:
        check_flower_config(config)
        self.config, self.link, self.progress = config, link, progress
        self.deadlines = deadlines or Deadlines()
        self.s, self.seed = config.codream, config.run.seed
        self.n = config.data.clients
        self.alive = set(range(self.n))
        self.departures: list[dict] = []
        self.train_sizes: list[int] = [0] * self.n
        self.last_scores: dict[int, tuple[float, float]] = {}
        self.rounds: list[RoundRecord] = []
        self.result = MethodResult("codream")
        self.buffer = DreamBuffer(self.s.buffer_size)
        self.last_dreams: torch.Tensor | None = None
        self.info: ClientInfo | None = None
        self._trained_for = -1  # the round whose local training rode on an earlier request
        aggregation = config.aggregation
        self.grad_channel = RemoteChannel(aggregation, clip=self.s.generator_clip,
                                          purpose="dream", link=link,
                                          deadline=self.deadlines.protocol)
        self.label_channel = RemoteChannel(aggregation, clip=aggregation.label_clip,
                                           purpose="labels", link=link,
                                           deadline=self.deadlines.protocol)

    # -- talking to clients -------------------------------------------------------------------

    def _depart(self, round_index: int, departure: Departure) -> None:
        if departure.client not in self.alive:
            return  # departed already: the first reason is the one reported
        self.alive.discard(departure.client)
        self.departures.append({"round": round_index, **asdict(departure)})
        if self.progress:
            self.progress.log(f"round {round_index}: client {departure.client} dropped "
                              f"({departure.purpose}, {departure.stage}): {departure.reason}")

    def _call(self, round_index: int, phase: str, payloads: dict[int, Payload],
              deadline: float) -> dict[int, Reply]:
        """Replies from the clients that gave a usable one; the others depart."""
        answered = self.link.call(payloads, deadline=deadline)
        for client, why in answered.missed.items():
            self._depart(round_index, Departure(client, phase, None, phase, why))
        replies = {}
        for client, reply in answered.replies.items():
            if reply.refused:
                self._depart(round_index, Departure(client, phase, None, phase,
                                                    f"refused: {reply.refused}"))
            else:
                replies[client] = reply
        return replies

    def _collect_departures(self, round_index: int) -> None:
        for channel in (self.grad_channel, self.label_channel):
            for departure in channel.departures:
                self._depart(round_index, departure)
            channel.departures.clear()

    def _scores(self, round_index: int, replies: dict[int, Reply]) -> None:
        """Record each reply's (val, test); a malformed one departs its client."""
        for client, reply in replies.items():
            try:
                self.last_scores[client] = (float(reply.value("val", float)),
                                            float(reply.value("test", float)))
            except UndecodableReplyError as error:
                self._depart(round_index, Departure(client, "evaluate", None, "evaluate",
                                                    f"undecodable reply: {error}"))

    def _require_clients(self, round_index: int) -> None:
        if len(self.alive) < 1:
            raise TooFewSurvivorsError(needed=1, remaining=0,
                                       context=f"round {round_index}: every client departed")

    # -- the run ------------------------------------------------------------------------------

    def connect(self, hellos: dict[int, Reply] | None = None) -> None:
        """Ask every client for its partition's facts (or take the `hellos` they already
        answered, by client); build the server's model and the meta-generator from them."""
        if hellos is None:
            replies = self._call(0, "hello", {c: Payload("hello", {"client": c})
                                              for c in sorted(self.alive)}, self.deadlines.work)
        else:
            replies = {c: r for c, r in hellos.items() if c in self.alive}
            for client in sorted(self.alive - set(replies)):
                self._depart(0, Departure(client, "hello", None, "hello",
                                          "no SuperNode answered for this partition"))
        infos = set()
        for client, reply in replies.items():
            try:
                if reply.value("partition", int) != client:
                    raise UndecodableReplyError(f"answered as partition "
                                                f"{reply.values.get('partition')!r}")
                self.train_sizes[client] = int(reply.value("train_size", int))
                infos.add(ClientInfo(tuple(reply.values["input_shape"]),
                                     int(reply.value("num_classes", int)),
                                     tuple(reply.values["mean"]), tuple(reply.values["std"])))
            except (UndecodableReplyError, KeyError, TypeError) as error:
                self._depart(0, Departure(client, "hello", None, "hello",
                                          f"undecodable reply: {error}"))
        self._require_clients(0)
        if len(infos) != 1:
            raise ConfigError(f"the clients disagree about the data: {sorted(map(str, infos))}")
        self.info = info = infos.pop()
        self.server_model = seeded_model(self.config.models.server_model,
                                         input_shape=info.input_shape,
                                         num_classes=info.num_classes,
                                         seed=client_seed(self.seed, 999))
        self.dreamer = GeneratorDreamer(info.input_shape, mean=info.mean, std=info.std,
                                        settings=GeneratorSettings.from_config(self.s),
                                        init_seed=derived_seed(self.seed, "meta-generator"))

    def warm_up(self) -> RoundRecord:
        """Local training before any collaboration, then evaluation: round 0."""
        start = time.perf_counter()
        values = {"round": 0, "epochs": self.s.warmup_epochs, "evaluate": True,
                  **self._next_training(0)}
        replies = self._call(0, "train", {c: Payload("train", values)
                                          for c in sorted(self.alive)}, self.deadlines.work)
        self._scores(0, replies)
        self._require_clients(0)
        return self._record(0, {"local": time.perf_counter() - start}, [], [], "", {}, {})

    def _next_training(self, round_index: int) -> dict:
        """With round order "distill-last" round r + 1 starts with local training: it rides on
        round r's last request, after the evaluation (what simulate does next anyway)."""
        if self.s.round_order != "distill-last" or round_index >= self.s.rounds:
            return {}
        self._trained_for = round_index + 1
        return {"next_round": round_index + 1, "next_epochs": self.s.local_epochs}

    def _record(self, round_index: int, seconds: dict, dropped: list[int], members: list[int],
                note: str, teacher: dict, kd: dict, bytes_before: tuple | None = None
                ) -> RoundRecord:
        val = [self.last_scores.get(c, (0.0, 0.0))[0] for c in range(self.n)]
        test = [self.last_scores.get(c, (0.0, 0.0))[1] for c in range(self.n)]
        self.result.record(val, test)
        up, down = self._traffic()
        if bytes_before is not None:
            up, down = up - bytes_before[0], down - bytes_before[1]
        else:
            up, down = np.zeros(self.n, np.int64), np.zeros(self.n, np.int64)
        record = RoundRecord(round_index, val, test, [int(b) for b in up],
                             [int(b) for b in down], seconds, dropped, members, note,
                             teacher=teacher, kd=kd)
        self.rounds.append(record)
        return record

    def _traffic(self) -> tuple[np.ndarray, np.ndarray]:
        up = np.zeros(self.n, np.int64)
        down = np.zeros(self.n, np.int64)
        for client in range(self.n):
            up[client] = getattr(self.link, "bytes_up", {}).get(client, 0)
            down[client] = getattr(self.link, "bytes_down", {}).get(client, 0)
        return up, down

    def run_round(self, round_index: int) -> RoundRecord:
        """One round in [codream] round_order, as CoDreamFederation.run_round runs it."""
        seconds = {"local": 0.0, "dreams": 0.0, "aggregation": 0.0, "distill": 0.0}
        before = self._traffic()
        alive_before = set(self.alive)
        self._require_clients(round_index)
        if self.s.round_order == "distill-last" and self._trained_for != round_index:
            start = time.perf_counter()
            self._call(round_index, "train", {c: Payload("train", {
                "round": round_index, "epochs": self.s.local_epochs, "evaluate": False})
                for c in sorted(self.alive)}, self.deadlines.work)
            seconds["local"] = time.perf_counter() - start
        note, teacher_quality_, dreams, teacher, members = "", {}, None, None, []
        try:
            start = time.perf_counter()
            dreams, members = self._dream(round_index)
            seconds["dreams"] = time.perf_counter() - start
            start = time.perf_counter()
            teacher = self._teacher(round_index, dreams, members)
            seconds["aggregation"] = time.perf_counter() - start
        except (TooFewSurvivorsError, NoDreamsError) as error:
            note = f"no knowledge exchange this round: {error}"
            dreams, teacher, members = None, None, []
            if self.progress:
                self.progress.log(f"round {round_index}: {note}")
        finally:
            self._collect_departures(round_index)
        start = time.perf_counter()
        kd, agreement = self._finish(round_index, dreams, teacher, members)
        seconds["distill"] = time.perf_counter() - start
        if teacher is not None:
            shown = teacher if self.s.soft_labels == "probs" else teacher.softmax(dim=1)
            teacher_quality_ = teacher_quality(shown, [], None)
            teacher_quality_["client_agreement"] = float(np.mean(agreement)) if agreement \
                else None
        skipped = self.dreamer.skipped.get(round_index)
        if skipped:
            skipped_note = f"skipped dream {'; '.join(skipped)}"
            note = f"{note}; {skipped_note}" if note else skipped_note
        dropped = sorted(alive_before - self.alive)
        record = self._record(round_index, seconds, dropped,
                              sorted(m for m in members if m in self.alive), note,
                              teacher_quality_, kd, before)
        record.skipped_batches = None if skipped is None else len(skipped)
        return record

    def _dream(self, round_index: int) -> tuple[torch.Tensor, list[int]]:
        """The round's dream batches: each client adapts (G, z) at home; the sum of their
        updates is the only thing the server sees."""
        dreamer, s = self.dreamer, self.s
        members = sorted(self.alive)
        self.grad_channel.open(members, dreamer.vector_length)
        adaptive = None
        if round_index > s.adaptive_after and s.adaptive_weight > 0:
            def adaptive(x: torch.Tensor) -> torch.Tensor:
                return server_entropy_gradient(self.server_model, x)

        def remote_sum(batch: int, latents: torch.Tensor, direction: torch.Tensor | None,
                       members: list[int], after_upload: list[int]
                       ) -> tuple[np.ndarray, frozenset[int]]:
            arrays = {"meta": flatten_state(dreamer.meta),
                      "latents": latents.detach().cpu().numpy().reshape(-1)}
            if direction is not None:
                arrays["direction"] = direction.detach().cpu().numpy()
            return self.grad_channel.sum({"batch": batch, "weight": float(s.adaptive_weight)},
                                         arrays)

        outcome = dreamer.dream_batches(
            round_index, members, remote_sum,
            latent_seeds=lambda batch: generator(self.seed, "latents", round_index, batch),
            adaptive=adaptive)
        return outcome.dreams, sorted(outcome.members)

    def _teacher(self, round_index: int, dreams: torch.Tensor, members: list[int]
                 ) -> torch.Tensor:
        """The mean of the members' soft labels on the dreams, summed securely."""
        classes = self.info.num_classes if self.info else 0
        self.label_channel.open(members, dreams.shape[0] * classes)
        total, included = self.label_channel.sum({}, {"dreams": dreams.numpy()})
        mean = (total / len(included)).reshape(dreams.shape[0], -1)
        return torch.from_numpy(mean.astype(np.float32))

    def _finish(self, round_index: int, dreams: torch.Tensor | None,
                teacher: torch.Tensor | None, members: list[int]) -> tuple[dict, list[float]]:
        """Distillation for the members (and the server), local training when the round ends
        with it, and evaluation for every client still here."""
        payloads = {}
        learning = dreams is not None and teacher is not None
        if learning:
            self.last_dreams = dreams
            self.buffer.add(dreams, teacher)
            bx, by = self.buffer.tensors()
            arrays = {"buffer_x": bx.numpy(), "buffer_y": by.numpy()}
        following = self._next_training(round_index)
        for client in sorted(self.alive):
            if learning and client in members:
                payloads[client] = Payload("finish", {"round": round_index, **following,
                                                      "fresh": int(dreams.shape[0])}, arrays)
            else:
                payloads[client] = Payload("finish", {"round": round_index, **following})
        replies = self._call(round_index, "finish", payloads, self.deadlines.work)
        if learning:
            distill_model(self.server_model, bx, by, seed=self.seed, round_index=round_index,
                          key="server", options=kd_options(self.s, "fp32", None))
            check_finite(self.server_model, "the server's model", round_index)
        self._scores(round_index, replies)
        kd_members, outcomes, agreement = [], [], []
        for client in sorted(replies):
            reply = replies[client]
            if client not in members or "val_before" not in reply.values:
                continue
            try:
                outcomes.append(KDOutcome(*(float(reply.value(k, float)) for k in (
                    "val_before", "test_before", "val_after", "test_after")),
                    bool(reply.value("kept", bool))))
                agreement.append(float(reply.value("agreement", float)))
            except UndecodableReplyError:
                continue
            kd_members.append(client)
        return (kd_record(kd_members, outcomes) if kd_members else {}), agreement
