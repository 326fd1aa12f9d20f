"""Flower 1.42's SecAgg+ run in one process, as a same-run baseline for our secure aggregation.

What runs is Flower's own code, end to end, with only the network replaced:

* Server: the real ``flwr.server.workflow.SecAggPlusWorkflow`` (its four stage methods,
  unmodified) inside a ``LegacyContext`` with a ``FedAvg`` strategy and ``GridClientProxy``
  objects, exactly as ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` drives it.
* Clients: one real ``flwr.clientapp.ClientApp(client_fn, mods=[secaggplus_mod])`` per node,
  whose ``NumPyClient.fit`` returns that node's row of ``vectors``. Every stage therefore goes
  through Flower's mod (state decode/encode, key generation, Shamir sharing, Fernet envelopes,
  quantisation, masking) and the legacy FitIns/FitRes conversion, as on a SuperNode.
* Network: an in-process ``Grid`` subclass stands in for the SuperLink. It does what
  ``HttpGrid.push_messages``/``pull_messages`` and the SuperNode do to a message: set its
  ``message_id`` from ``object_id``, deflate it into Flower's content-addressed objects, and
  inflate those on the other side (``inflate_object_from_contents``); the client's ``Context``
  is round-tripped through ``context_to_proto`` between messages, as the SuperNode hands it to
  the ClientApp process.

Bytes are the protobuf sizes (``ByteSize()``) of the Fleet API calls one SuperNode makes for one
message: ``PullMessages`` (metadata + object tree), one ``PullObject`` per object,
``ConfirmMessageReceived``, then ``PushMessages`` and one ``PushObject`` per object the SuperLink
does not already hold (its store is modelled as the stage's instruction objects plus the replies
pushed so far in that stage, so identical empty records are pushed once). Requests count as uplink,
responses as downlink. Not counted: HTTP/TLS framing, heartbeats, node registration, and the
ServerApp<->SuperLink leg (server-local). The FitIns carries no global model (empty
``Parameters``), so downlink is protocol overhead only; uplink includes Flower's int64 masked
vector (8 bytes per element, plus the weight factor element).

Timing: ``clock`` (default ``time.perf_counter``, wall seconds, as ``protocols.network`` times
our protocol; pass ``time.process_time`` for CPU seconds, which a busy shared machine does not
inflate), one process, clients run one after another:

* ``client_seconds[i]``: for each message node i answers, inflating it, decoding its Context, the
  ClientApp call (mod + FitRes conversion), encoding the Context and deflating the reply.
* ``server_seconds``: the whole workflow call minus the client sections and minus the byte
  metering above, i.e. the workflow's own logic plus the ServerApp-side deflate/inflate of
  messages. SuperLink-side costs (object store, hashing on receipt) are not included.
* ``FedAvg.aggregate_fit`` is replaced by a pass-through (``_PassThroughFedAvg``): the workflow
  hands it n copies of the already-aggregated vector, which FedAvg would re-average (an identity
  costing O(n m) float work that belongs to the strategy, not to SecAgg+). Its cost is excluded.

Weights and the returned sum: SecAggPlusWorkflow computes a weighted *average*. Each client
uploads ``[q_ratio, quantize(params * dq_ratio)]`` with ``q_ratio = round(num_examples /
max_weight * quantization_range)``; the server divides by ``sum(q_ratio) / quantization_range``.
Every client here reports ``num_examples = max_weight = 1000`` (Flower's default max_weight), so
``dq_ratio = 1`` exactly (no precision lost to weighting) and Flower outputs the plain mean of the
included vectors. ``FlowerRunResult.sum`` is that output times ``len(included)``, the one
rescaling undone.

Quantisation error of ``sum`` (what the tests check): with clipping range c and quantisation
range Q, one quantum is ``2c/Q`` (3.8e-6 for the defaults c = 8, Q = 2**22). Flower computes
``(clip(x, -c, c) + c) * Q/(2c)`` in the input's dtype, float32 here. With the defaults the
``+ c`` rounds by at most 1/8 quantum (half a float32 ulp below 16), the product is exact (Q/(2c)
is a power of two), and stochastic rounding moves the result by less than 1 quantum: each client
is off by less than 1.125 quanta, the sum by less than ``1.125 * n * 2c/Q`` (the tests' bound;
for other c and Q <= 2**22 the two float32 roundings can reach 1/4 quantum each, so 1.5 quanta).
Inputs outside [-c, c] are clipped (that error is not bounded). ``n * Q`` must stay below
``modulus_range`` or the sum wraps; Flower's own check compares ``num_shares`` (not n) with
``modulus_range / quantization_range``.

Beyond the requested API, ``drop_before_upload`` lists clients that answer setup and share_keys
and then vanish before uploading: they are left out of the sum and Flower rebuilds their ``sk1``
from shares and regenerates their pairwise masks (its expensive recovery path; a client that drops
after upload costs Flower nothing extra, as it rebuilds every included client's self-mask anyway).

What is not faithful, or only approximated:

* One process, clients sequential: no concurrency, no network latency or bandwidth limits.
* Keys, mask seeds and Shamir shares come from ``os.urandom`` inside Flower, so runs differ in
  their cryptographic values; ``seed`` fixes node IDs, the run ID, Flower's neighbour shuffle and
  client sampling (Python's ``random``), and its stochastic rounding (NumPy's global RandomState).
  Both global generators are restored afterwards.
* A client that drops is modelled as the SuperLink answering its instruction with a
  ``NODE_UNAVAILABLE`` error reply, which the workflow treats as a failure (as it does when a node
  stops heartbeating); the dropped node pulls nothing in that stage and costs no bytes or time.
* Flower's own quirks are kept, not fixed: masks come from ``np.random.RandomState`` seeded with
  32 bits of the key and drawn from [0, modulus_range - 2]; uploads are int64; Shamir runs in
  pure-Python GF(2^128) arithmetic (PyCryptodome) on 16-byte chunks of the padded secret (3 chunks
  for the mask seed, 20 for the 306-byte PEM ``sk1``), and the server interpolates with every share
  it received, not just ``reconstruction_threshold`` of them.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import context_from_proto, context_to_proto, message_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.proto.fleet_pb2 import (
    PullMessagesRequest,
    PullMessagesResponse,
    PushMessagesRequest,
    PushMessagesResponse,
    Reconnect,
)
from flwr.proto.message_pb2 import (
    ConfirmMessageReceivedRequest,
    ConfirmMessageReceivedResponse,
    ObjectTree,
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
    PushObjectResponse,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.node_pb2 import Node
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    iterate_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from numpy.typing import NDArray

MAX_WEIGHT = 1000.0
"""Flower's default ``max_weight``; every client reports this many examples (weight ratio 1)."""


@dataclass(frozen=True)
class FlowerRunResult:
    """Outcome and costs of one Flower SecAgg+ round."""

    sum: np.ndarray
    included: tuple[int, ...]
    client_seconds: np.ndarray
    server_seconds: float
    bytes_up: np.ndarray
    bytes_down: np.ndarray


class _VectorClient(NumPyClient):
    """NumPyClient whose ``fit`` returns one fixed vector with weight ``MAX_WEIGHT``."""

    def __init__(self, vector: NDArray[np.float32]) -> None:
        self._vector = vector

    def fit(
        self, parameters: list[NDArray[Any]], config: dict[str, Scalar]
    ) -> tuple[list[NDArray[Any]], int, dict[str, Scalar]]:
        """Return the client's vector as its single parameter array."""
        return [self._vector], int(MAX_WEIGHT), {}


def _make_client_app(vector: NDArray[np.float32]) -> ClientApp:
    """Build the ClientApp a Flower user writes for SecAgg+: legacy client_fn + secaggplus_mod."""

    def client_fn(context: Context) -> Client:
        """Return the node's client."""
        return _VectorClient(vector).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


class _PassThroughFedAvg(FedAvg):
    """FedAvg whose ``aggregate_fit`` returns the SecAgg+ aggregate as is (no re-averaging)."""

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Return the parameters the workflow put in every result (all equal)."""
        if not results:
            return None, {}
        return results[0][1].parameters, {}


def _tree_ids(tree: ObjectTree) -> list[str]:
    """Return the distinct object IDs of a tree, children before parents."""
    return list(dict.fromkeys(node.object_id for node in iterate_object_tree(tree)))


def _deflate(msg: Message) -> tuple[Any, ObjectTree, dict[str, bytes]]:
    """Set the message ID and deflate a message the way HttpGrid / the SuperNode push it."""
    with no_object_id_recompute():
        msg.metadata.__dict__["_message_id"] = msg.object_id
        contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
        return message_to_proto(remove_content_from_message(msg)), get_object_tree(msg), contents


def _inflate(msg_id: str, contents: dict[str, bytes]) -> Message:
    """Rebuild a message from its object contents, as HttpGrid.pull_messages does."""
    msg = inflate_object_from_contents(msg_id, contents)
    assert isinstance(msg, Message)
    msg.metadata.__dict__["_message_id"] = msg_id
    return msg


class _InProcessGrid(Grid):
    """Grid that delivers each message to an in-process ClientApp and meters Fleet API bytes."""

    def __init__(
        self,
        run_id: int,
        vectors: NDArray[np.float32],
        node_ids: list[int],
        drop_at: dict[int, str],
        rng: np.random.Generator,
        clock: Callable[[], float],
    ) -> None:
        self._clock = clock
        self._run = Run.create_empty(run_id)
        self._node_ids = node_ids
        self._index = {nid: i for i, nid in enumerate(node_ids)}
        self._apps = {nid: _make_client_app(vectors[i]) for i, nid in enumerate(node_ids)}
        self._contexts = {
            nid: context_to_proto(Context(run_id, nid, {}, RecordDict(), {})).SerializeToString()
            for nid in node_ids
        }
        self._drop_at = drop_at
        self._rng = rng
        self.dropped: set[int] = set()
        self.uploaded: set[int] = set()
        n = len(node_ids)
        self.client_seconds = np.zeros(n)
        self.bytes_up = np.zeros(n, dtype=np.int64)
        self.bytes_down = np.zeros(n, dtype=np.int64)
        self.metering_seconds = 0.0

    def set_run(self, run: Run) -> None:
        """Set the run."""
        self._run = run

    @property
    def run(self) -> Run:
        """Run information."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create a message (deprecated in Flower; kept for the abstract interface)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Return the node IDs."""
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not used by SecAggPlusWorkflow."""
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not used by SecAggPlusWorkflow."""
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver every message to its node's ClientApp and return the replies."""
        messages = list(messages)
        # ServerApp side (server compute): IDs and deflation, as HttpGrid.push_messages.
        outgoing: list[tuple[Message, Any, ObjectTree]] = []
        link_store: dict[str, bytes] = {}
        for msg in messages:
            proto, tree, contents = _deflate(msg)
            link_store.update(contents)
            outgoing.append((msg, proto, tree))
        replies: list[Message] = []
        for msg, proto, tree in outgoing:
            nid = msg.metadata.dst_node_id
            stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if nid in self.dropped or self._drop_at.get(nid) == stage:
                self.dropped.add(nid)
                error = Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node dropped out")
                replies.append(Message(error, reply_to=msg))
                continue
            replies.append(self._deliver(nid, msg.metadata.message_id, proto, tree, link_store))
            if stage == Stage.COLLECT_MASKED_VECTORS:
                self.uploaded.add(nid)
        return replies

    def _deliver(
        self,
        nid: int,
        msg_id: str,
        proto: Any,
        tree: ObjectTree,
        link_store: dict[str, bytes],
    ) -> Message:
        """Run one node's ClientApp on one message; meter its bytes and time."""
        i = self._index[nid]
        ids = _tree_ids(tree)
        t0 = self._clock()
        self._meter_pull(i, nid, msg_id, proto, tree, ids, link_store)
        t1 = self._clock()
        msg = _inflate(msg_id, {oid: link_store[oid] for oid in ids})
        context = context_from_proto(ProtoContext.FromString(self._contexts[nid]))
        reply = self._apps[nid](msg, context)
        self._contexts[nid] = context_to_proto(context).SerializeToString()
        reply_proto, reply_tree, reply_contents = _deflate(reply)
        t2 = self._clock()
        self.client_seconds[i] += t2 - t1
        self._meter_push(i, nid, t2 - t1, reply_proto, reply_tree, reply_contents, link_store)
        self.metering_seconds += (t1 - t0) + (self._clock() - t2)
        # SuperLink -> ServerApp: the server inflates the reply (server compute).
        return _inflate(reply.metadata.message_id, reply_contents)

    def _meter_pull(
        self,
        i: int,
        nid: int,
        msg_id: str,
        proto: Any,
        tree: ObjectTree,
        ids: list[str],
        link_store: dict[str, bytes],
    ) -> None:
        """Count the Fleet API calls a SuperNode makes to receive one message."""
        node = Node(node_id=nid)
        run_id = self._run.run_id
        up = PullMessagesRequest(node=node).ByteSize()
        down = PullMessagesResponse(messages_list=[proto], message_object_trees=[tree]).ByteSize()
        for oid in ids:
            up += PullObjectRequest(node=node, run_id=run_id, object_id=oid).ByteSize()
            down += PullObjectResponse(
                object_found=True, object_available=True, object_content=link_store[oid]
            ).ByteSize()
        up += ConfirmMessageReceivedRequest(
            node=node, run_id=run_id, message_object_id=msg_id
        ).ByteSize()
        down += ConfirmMessageReceivedResponse().ByteSize()
        self.bytes_up[i] += up
        self.bytes_down[i] += down

    def _meter_push(
        self,
        i: int,
        nid: int,
        runtime: float,
        proto: Any,
        tree: ObjectTree,
        contents: dict[str, bytes],
        link_store: dict[str, bytes],
    ) -> None:
        """Count the Fleet API calls a SuperNode makes to send one reply."""
        node = Node(node_id=nid)
        run_id = self._run.run_id
        session_id = str(uuid.UUID(int=int(self._rng.integers(2**63)), version=4))
        to_push = [oid for oid in _tree_ids(tree) if oid not in link_store]
        up = PushMessagesRequest(
            node=node,
            messages_list=[proto],
            message_object_trees=[tree],
            clientapp_runtime_list=[runtime],
        ).ByteSize()
        down = PushMessagesResponse(
            reconnect=Reconnect(reconnect=5),
            results={proto.metadata.message_id: 0},
            objects_to_push=to_push,
            session_id=session_id,
        ).ByteSize()
        for oid in to_push:
            up += PushObjectRequest(
                node=node,
                run_id=run_id,
                object_id=oid,
                object_content=contents[oid],
                session_id=session_id,
            ).ByteSize()
            down += PushObjectResponse(stored=True).ByteSize()
            link_store[oid] = contents[oid]
        self.bytes_up[i] += up
        self.bytes_down[i] += down


def _random_ids(rng: np.random.Generator, count: int) -> list[int]:
    """Draw distinct random 64-bit IDs (> 1) like Flower's node and run IDs."""
    ids: set[int] = set()
    while len(ids) < count:
        value = int(rng.integers(2, 2**64, dtype=np.uint64))
        ids.add(value)
    return list(ids)


def run_flower_secaggplus(
    vectors: np.ndarray,
    *,
    drop_after_upload: Collection[int] = (),
    num_shares: int,
    reconstruction_threshold: int,
    clipping_range: float = 8.0,
    quantization_range: int = 2**22,
    modulus_range: int = 2**32,
    seed: int = 0,
    drop_before_upload: Collection[int] = (),
    clock: Callable[[], float] = time.perf_counter,
) -> FlowerRunResult:
    """Run one round of Flower 1.42's SecAgg+ on ``vectors`` (n x m float32) in-process."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise ValueError("vectors must be a 2-D float32 array (one row per client)")
    n = vectors.shape[0]
    after, before = set(drop_after_upload), set(drop_before_upload)
    if after & before or not (after | before) <= set(range(n)):
        raise ValueError("dropout sets must be disjoint subsets of range(n)")

    rng = np.random.default_rng(seed)
    run_id, *node_ids = _random_ids(rng, n + 1)
    drop_at = {node_ids[i]: Stage.UNMASK for i in after}
    drop_at |= {node_ids[i]: Stage.COLLECT_MASKED_VECTORS for i in before}

    saved_identity = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    saved_random, saved_np_random = random.getstate(), np.random.get_state()
    flwr_logger = logging.getLogger("flwr")
    saved_level = flwr_logger.level
    try:
        TaskIdentity.run_id, TaskIdentity.node_id = run_id, SUPERLINK_NODE_ID
        TaskIdentity.task_id = int(rng.integers(2**63))
        random.seed(seed)
        np.random.seed(seed % 2**32)
        flwr_logger.setLevel(logging.WARNING)

        grid = _InProcessGrid(run_id, vectors, node_ids, drop_at, rng, clock)
        client_manager = SimpleClientManager()
        for nid in node_ids:
            client_manager.register(GridClientProxy(nid, grid, run_id))
        strategy = _PassThroughFedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
        )
        context = LegacyContext(
            Context(run_id, SUPERLINK_NODE_ID, {}, RecordDict(), {}),
            config=ServerConfig(num_rounds=1),
            strategy=strategy,
            client_manager=client_manager,
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: 1}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        workflow = SecAggPlusWorkflow(
            num_shares=num_shares,
            reconstruction_threshold=reconstruction_threshold,
            max_weight=MAX_WEIGHT,
            clipping_range=clipping_range,
            quantization_range=quantization_range,
            modulus_range=modulus_range,
        )
        start = clock()
        workflow(grid, context)
        total = clock() - start
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved_identity
        random.setstate(saved_random)
        np.random.set_state(saved_np_random)
        flwr_logger.setLevel(saved_level)

    params = compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
    )
    arrays = parameters_to_ndarrays(params)
    if len(arrays) != 1:
        raise RuntimeError("Flower's SecAgg+ workflow halted without an aggregate")
    included = tuple(sorted(grid._index[nid] for nid in grid.uploaded))
    return FlowerRunResult(
        sum=np.asarray(arrays[0], dtype=np.float64) * len(included),
        included=included,
        client_seconds=grid.client_seconds,
        server_seconds=total - float(grid.client_seconds.sum()) - grid.metering_seconds,
        bytes_up=grid.bytes_up,
        bytes_down=grid.bytes_down,
    )
