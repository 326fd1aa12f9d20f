"""One CoDream client behind a Flower ClientApp, free of Flower types.

On Flower a ClientApp may run in a fresh process for every message, so the role keeps nothing
between messages except `ClientState`: the model's weights and each open protocol session's
client state (which holds that session's secret keys; Flower keeps it in the SuperNode's
`context.state`). The data partition is rebuilt from the run's config and seed on every message,
exactly as `simulate` splits it, and only this client's part is kept.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from protocols.errors import ProtocolError
from protocols.secagg.client import SecAggClient
from protocols.secagg.messages import SessionOffer
from protocols.wire import message_type

from ..baselines import client_seed, load_flat_state, seeded_model
from ..config import SimulationConfig
from ..errors import CoDreamError, ConfigError
from ..generator_dreams import GeneratorSettings, SlimGenerator, client_update
from ..member import Member, kd_options, trains_after_acquisition
from ..results import ClientData
from ..simulation import load_run_data, split_clients
from .payload import Payload, Reply, UndecodableReplyError

__all__ = ["ClientRole", "ClientState", "PartitionError"]


class PartitionError(CoDreamError):
    """A SuperNode's node config does not name a partition of this run."""


@dataclass
class ClientState:
    """What a client keeps between messages: model weights and protocol client states."""

    model: dict[str, torch.Tensor] | None = None
    protocol: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class _Partition:
    data: ClientData
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@functools.lru_cache(maxsize=4)
def _partition(config: SimulationConfig, index: int) -> _Partition:
    """Client `index`'s part of the run's data, split as `simulate` splits it (cached per
    process: a process that serves many messages loads it once)."""
    data = load_run_data(config.data, config.run.seed)
    clients, _ = split_clients(data, config.data, config.run.seed, torch.device("cpu"))
    return _Partition(clients[index], torch.from_numpy(data.x_test),
                      torch.from_numpy(data.y_test), tuple(data.input_shape), data.num_classes,
                      tuple(data.mean), tuple(data.std))


def check_partition(config: SimulationConfig, partition: object, partitions: object) -> int:
    """The partition id, checked against the run's number of clients."""
    clients = config.data.clients
    if partitions is not None and partitions != clients:
        raise PartitionError(f"the SuperNode says num-partitions={partitions!r}, but the run "
                             f"has [data] clients = {clients}")
    if isinstance(partition, bool) or not isinstance(partition, int) \
            or not 0 <= partition < clients:
        raise PartitionError(f"partition-id must be an int in 0..{clients - 1}, got "
                             f"{partition!r}")
    return partition


class ClientRole:
    """Client `partition` of a run: builds its member from the config and `state`, handles
    one payload, and leaves in `state` what the next message needs."""

    def __init__(self, config: SimulationConfig, partition: int, state: ClientState) -> None:
        torch.set_num_threads(config.device.threads or torch.get_num_threads())
        self.config, self.index, self.state = config, partition, state
        self.part = _partition(config, partition)
        codream = config.codream
        model = seeded_model(config.models.client_models(config.data.clients)[partition],
                             input_shape=self.part.input_shape,
                             num_classes=self.part.num_classes,
                             seed=client_seed(config.run.seed, partition))
        if state.model is not None:
            model.load_state_dict(state.model)
        self.member = Member(partition, model, self.part.data, self.part.x_test,
                             self.part.y_test, codream=codream, seed=config.run.seed)

    def handle(self, payload: Payload) -> Reply:
        """The reply to one request; a refusal names why (the server counts it as missing)."""
        handler = getattr(self, f"_on_{payload.action}", None)
        if handler is None:
            return Reply(refused=f"unknown action {payload.action!r}")
        try:
            return handler(Reply(payload.values, payload.arrays))
        except (ProtocolError, UndecodableReplyError, ConfigError) as error:
            return Reply(refused=f"{type(error).__name__}: {error}")

    def _save_model(self) -> None:
        self.state.model = {k: v.detach().clone() for k, v in
                            self.member.model.state_dict().items()}

    # -- actions ------------------------------------------------------------------------------

    def _on_hello(self, request: Reply) -> Reply:
        part = self.part
        return Reply({"partition": self.index, "input_shape": list(part.input_shape),
                      "num_classes": part.num_classes, "mean": list(part.mean),
                      "std": list(part.std), "train_size": int(part.data.y_train.shape[0])})

    def _on_train(self, request: Reply) -> Reply:
        self.member.train(int(request.value("round", int)), int(request.value("epochs", int)))
        self._save_model()
        return self._scores(request) if request.values.get("evaluate") is True else Reply()

    def _scores(self, request: Reply) -> Reply:
        """Validation and test accuracy; then the next round's local training when the request
        asks for it (the round order "distill-last" starts each round with it: one round trip
        fewer)."""
        val, test = self.member.evaluate()
        if "next_round" in request.values:
            self.member.train(int(request.value("next_round", int)),
                              int(request.value("next_epochs", int)))
        self._save_model()  # re-estimated BatchNorm statistics are part of the model
        return Reply({"val": val, "test": test})

    def _on_finish(self, request: Reply) -> Reply:
        """Distil on the buffer (if sent), train locally when the round ends with it, and
        evaluate: the rest of a round after the dreams."""
        round_index = int(request.value("round", int))
        values: dict = {}
        if "buffer_x" in request.arrays:
            bx = torch.from_numpy(request.array("buffer_x", dtype=np.float32).copy())
            by = torch.from_numpy(request.array("buffer_y", dtype=np.float32).copy())
            fresh = int(request.value("fresh", int))
            if not 0 < fresh <= bx.shape[0] or by.shape[0] != bx.shape[0]:
                raise UndecodableReplyError("buffer and fresh dreams disagree")
            mine = self.member.labels(bx[-fresh:])
            teacher = by[-fresh:]
            if self.config.codream.soft_labels == "logits":
                mine, teacher = mine.softmax(dim=1), teacher.softmax(dim=1)
            values["agreement"] = float((mine.argmax(dim=1) == teacher.clamp_min(0)
                                         .argmax(dim=1)).float().mean())
            outcome = self.member.acquire(round_index, bx, by,
                                          kd_options(self.config.codream, "fp32", None))
            values.update(val_before=outcome.val_before, test_before=outcome.test_before,
                          val_after=outcome.val_after, test_after=outcome.test_after,
                          kept=outcome.kept)
        if trains_after_acquisition(self.config.codream, acquired="buffer_x" in request.arrays):
            self.member.train(round_index, self.config.codream.local_epochs)
        scores = self._scores(request)
        return Reply({**values, **scores.values})

    def _on_plain(self, request: Reply) -> Reply:
        return Reply(arrays={"vector": self._vector(request)})

    def _on_secure(self, request: Reply) -> Reply:
        purpose = str(request.value("purpose", str))
        data = request.value("request", bytes)
        assert isinstance(data, bytes)
        def provider(step: int) -> np.ndarray:
            return self._vector(request)

        saved = self.state.protocol.get(purpose)
        if saved is None or message_type(data) == SessionOffer.TYPE:
            client = SecAggClient(provider, threat_model=self.config.aggregation.threat_model)
        else:
            client = SecAggClient.from_state(saved, provider)
        reply = client.handle(data)
        self.state.protocol[purpose] = client.to_state()
        return Reply({"reply": b"" if reply is None else reply})

    def _vector(self, request: Reply) -> np.ndarray:
        """This client's input to a sum: its generator update or its soft labels."""
        purpose = request.value("purpose", str)
        if purpose == "labels":
            dreams = torch.from_numpy(request.array("dreams", dtype=np.float32).copy())
            return self.member.labels(dreams).numpy().reshape(-1)
        if purpose != "dream":
            raise UndecodableReplyError(f"unknown purpose {purpose!r}")
        part, settings = self.part, GeneratorSettings.from_config(self.config.codream)
        with torch.random.fork_rng(devices=[]):  # its first weights are overwritten below
            generator = SlimGenerator(part.input_shape, latent_dim=settings.latent_dim,
                                      mean=part.mean, std=part.std)
        load_flat_state(generator, request.array("meta", dtype=np.float32))
        latents = torch.from_numpy(request.array(
            "latents", dtype=np.float32, size=settings.dream_batch * settings.latent_dim)
            .reshape(settings.dream_batch, settings.latent_dim).copy())
        direction = None
        if "direction" in request.arrays:
            direction = torch.from_numpy(request.array("direction", dtype=np.float32).copy())
        return client_update(generator, latents, self.member.dream_loss, settings=settings,
                             direction=direction,
                             weight=float(request.value("weight", float)))
