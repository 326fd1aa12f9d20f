"""Isolated, FedAvg and centralized reference methods on tiny synthetic client splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codream_secure.baselines import (
    flatten_state,
    load_flat_state,
    run_centralized,
    run_fedavg,
    run_isolated,
    seeded_model,
    weighted_mean,
)
from codream_secure.distill import evaluate, train_local
from codream_secure.errors import ConfigError
from codream_secure.results import ClientData

SHAPE = (1, 8, 8)
COMMON = dict(
    input_shape=SHAPE, num_classes=2, warmup_epochs=3, rounds=2, local_epochs=1, lr=0.05,
    batch_size=32, seed=7,
)  # fmt: skip



def _toy(labels: list[int], seed: int, noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c lights column block c (4 columns wide) of an 8x8 image, plus Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels, dtype=torch.int64)
    x = noise * torch.randn(len(labels), *SHAPE, generator=gen)
    for c in (0, 1):
        x[y == c, :, :, 4 * c : 4 * c + 4] += 1.0
    return x, y


def _client(labels: list[int], seed: int, noise: float = 0.5) -> ClientData:
    x, y = _toy(labels, seed, noise)
    xv, yv = _toy(labels[: max(len(labels) // 3, 2)], seed + 100, noise)
    return ClientData(x, y, xv, yv)


def _test_set(n0: int, n1: int, noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    return _toy([0] * n0 + [1] * n1, 999, noise)


def _mixed(n: int) -> list[int]:
    return [i % 2 for i in range(n)]


# --- state vectors and averaging ----------------------------------------------------------


def test_flatten_load_round_trip_is_exact_and_skips_integer_buffers():
    a = seeded_model("smallcnn", input_shape=SHAPE, num_classes=2, seed=1)
    b = seeded_model("smallcnn", input_shape=SHAPE, num_classes=2, seed=2)
    x, y = _toy(_mixed(40), 0)
    train_local(a, x, y, epochs=1, lr=0.05, batch_size=16, generator=torch.Generator())
    flat = flatten_state(a)
    floats = [t for t in a.state_dict().values() if t.is_floating_point()]
    assert flat.dtype == np.float32 and flat.shape == (sum(t.numel() for t in floats),)
    assert not np.array_equal(flat, flatten_state(b))
    load_flat_state(b, flat)
    np.testing.assert_array_equal(flatten_state(b), flat)
    for name, t in a.state_dict().items():
        if t.is_floating_point():
            assert torch.equal(b.state_dict()[name], t), name
        else:  # counters are not part of the vector: b's stay at 0
            assert int(b.state_dict()[name]) == 0 and int(t) > 0
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))  # running stats came across too
    with pytest.raises(ConfigError, match="state vector"):
        load_flat_state(b, flat[:-1])


def test_weighted_mean_values_and_identical_inputs_exact():
    v = flatten_state(seeded_model("smallcnn", input_shape=SHAPE, num_classes=2, seed=3))
    np.testing.assert_array_equal(weighted_mean([v, v, v], [37.0, 5.0, 120.0]), v)
    got = weighted_mean([np.array([0.0, 0.0]), np.array([3.0, 6.0])], [2.0, 1.0])
    np.testing.assert_array_equal(got, np.array([1.0, 2.0], dtype=np.float32))
    assert got.dtype == np.float32
    with pytest.raises(ConfigError):
        weighted_mean([v], [0.0])
    with pytest.raises(ConfigError):
        weighted_mean([v, v], [1.0])


# --- isolated ---------------------------------------------------------------------------


def test_isolated_records_every_round_and_missing_class_caps_test_accuracy():
    clients = [_client([0] * 60, 1), _client(_mixed(60), 2)]
    x_test, y_test = _test_set(30, 70)  # client 0 can only ever be right on the 30% of class 0
    res = run_isolated(clients, x_test, y_test, models=["smallcnn", "resnet8"], **COMMON)
    assert res.name == "isolated"
    assert len(res.val) == len(res.test) == COMMON["rounds"] + 1
    assert all(len(row) == 2 for row in res.val + res.test)
    t0 = [row[0] for row in res.test]
    assert all(t <= 0.30 + 0.02 for t in t0), t0  # predicts class 0 everywhere
    assert all(t >= 0.28 for t in t0), t0
    assert [row[0] for row in res.val] == [1.0] * 3  # its own validation split is all class 0
    assert res.test[-1][1] >= 0.9  # the client that sees both classes learns the task


def test_isolated_rejects_bad_config():
    clients = [_client(_mixed(20), 1)]
    x_test, y_test = _test_set(5, 5)
    with pytest.raises(ConfigError, match="one model name per client"):
        run_isolated(clients, x_test, y_test, models=["smallcnn", "smallcnn"], **COMMON)
    with pytest.raises(ConfigError, match="rounds"):
        run_isolated(clients, x_test, y_test, models=["smallcnn"], **{**COMMON, "rounds": -1})
    empty = ClientData(clients[0].x_train, clients[0].y_train, x_test[:0], y_test[:0])
    with pytest.raises(ConfigError, match="validation split"):
        run_isolated([empty], x_test, y_test, models=["smallcnn"], **COMMON)


def test_deterministic_for_a_seed_and_independent_of_global_rng():
    clients = [_client(_mixed(40), 1, noise=1.2), _client(_mixed(40), 2, noise=1.2)]
    x_test, y_test = _test_set(50, 50, noise=1.2)  # noisy: accuracies are not all 1.0
    kw = dict(models=["smallcnn", "smallcnn"], **COMMON)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = run_isolated(clients, x_test, y_test, **kw)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG was never consumed
    torch.manual_seed(12345)
    again = run_isolated(clients, x_test, y_test, **kw)
    assert (first.val, first.test) == (again.val, again.test)
    other = run_isolated(clients, x_test, y_test, **{**kw, "seed": 8})
    assert (first.val, first.test) != (other.val, other.test)


def test_progress_counts_epochs_and_closes_tasks():
    events: list[tuple] = []

    class Recorder:
        def task(self, name, total):
            events.append(("task", name, total))
            return name

        def advance(self, task_id, n=1):
            events.append(("advance", task_id, n))

        def done(self, task_id):
            events.append(("done", task_id))

    clients = [_client(_mixed(20), 1), _client(_mixed(20), 2)]
    x_test, y_test = _test_set(5, 5)
    run_fedavg(clients, x_test, y_test, model="smallcnn", progress=Recorder(), **COMMON)
    total = 2 * (COMMON["warmup_epochs"] + COMMON["rounds"] * COMMON["local_epochs"])
    assert events[0] == ("task", "fedavg", total)
    assert sum(e[2] for e in events if e[0] == "advance") == total
    assert events[-1] == ("done", "fedavg")


# --- FedAvg -----------------------------------------------------------------------------


def test_fedavg_with_one_client_equals_isolated_training():
    clients = [_client(_mixed(50), 3, noise=1.5)]
    x_test, y_test = _test_set(40, 40, noise=1.5)
    kw = {**COMMON, "warmup_epochs": 1, "rounds": 3}
    fed = run_fedavg(clients, x_test, y_test, model="smallcnn", **kw)
    iso = run_isolated(clients, x_test, y_test, models=["smallcnn"], **kw)
    # Averaging one vector is exact (n*v/n in float64) and the seeds match, so every record does.
    assert (fed.val, fed.test) == (iso.val, iso.test)
    assert len({r[0] for r in fed.test}) > 1  # training really moved the model between rounds


def test_fedavg_hook_called_per_round_with_vectors_and_sizes():
    clients = [_client(_mixed(30), 1), _client(_mixed(50), 2), _client([0] * 20, 3)]
    x_test, y_test = _test_set(20, 20)
    size = flatten_state(seeded_model("smallcnn", input_shape=SHAPE, num_classes=2, seed=0)).size
    calls: list[tuple[list[np.ndarray], list[float]]] = []

    def spy(vectors, weights):
        calls.append((vectors, weights))
        return weighted_mean(vectors, weights)

    res = run_fedavg(clients, x_test, y_test, model="smallcnn", aggregate=spy,
                     bn_statistics="running", **COMMON)
    assert len(calls) == COMMON["rounds"] + 1  # warm-up round 0 is averaged too
    for vectors, weights in calls:
        assert weights == [30.0, 50.0, 20.0]
        assert len(vectors) == 3 and all(
            v.shape == (size,) and v.dtype == np.float32 for v in vectors
        )
        assert not np.array_equal(vectors[0], vectors[1])  # each client trained on its own data
    assert all(len(set(row)) == 1 for row in res.test)  # one global model, one test accuracy
    # re-estimated statistics: each client normalises the global weights with its own data
    recalibrated = run_fedavg(clients, x_test, y_test, model="smallcnn", **COMMON)
    assert any(len(set(row)) > 1 for row in recalibrated.test)
    calls.clear()
    run_fedavg(
        clients, x_test, y_test, model="smallcnn", aggregate=spy, **{**COMMON, "warmup_epochs": 0}
    )
    assert len(calls) == COMMON["rounds"]  # nothing to average before any training


def test_fedavg_evaluates_what_the_hook_returns():
    clients = [_client(_mixed(30), 1), _client(_mixed(30), 2)]
    x_test, y_test = _test_set(30, 10)
    ref = seeded_model("smallcnn", input_shape=SHAPE, num_classes=2, seed=5)
    x, y = _toy(_mixed(80), 50)  # trained on swapped labels: wrong where the clients are right
    train_local(ref, x, 1 - y, epochs=3, lr=0.05, batch_size=32, generator=torch.Generator())
    fixed = flatten_state(ref)
    res = run_fedavg(
        clients, x_test, y_test, model="smallcnn", aggregate=lambda v, w: fixed, **COMMON
    )
    want_test = evaluate(ref, x_test, y_test)
    want_val = [evaluate(ref, c.x_val, c.y_val) for c in clients]
    assert want_test <= 0.1 and max(want_val) <= 0.1
    assert res.test == [[want_test] * 2] * 3
    assert res.val == [want_val] * 3
    seen: list[list[np.ndarray]] = []

    def fixed_spy(vectors, weights):
        seen.append(vectors)
        return fixed

    kw = {**COMMON, "local_epochs": 0}  # rounds after warm-up train nothing
    run_fedavg(clients, x_test, y_test, model="smallcnn", aggregate=fixed_spy, **kw)
    assert len(seen) == 3
    for vectors in seen[1:]:  # so every client hands back exactly the global model it was sent
        for v in vectors:
            np.testing.assert_array_equal(v, fixed)
    with pytest.raises(ConfigError, match="aggregate returned"):
        run_fedavg(
            clients, x_test, y_test, model="smallcnn", aggregate=lambda v, w: fixed[:-1], **COMMON
        )


def test_fedavg_needs_one_architecture():
    clients = [_client(_mixed(20), 1), _client(_mixed(20), 2)]
    x_test, y_test = _test_set(5, 5)
    with pytest.raises(ConfigError, match="same architecture"):
        run_fedavg(clients, x_test, y_test, model=["smallcnn", "resnet8"], **COMMON)
    with pytest.raises(ConfigError, match="one model name per client"):
        run_fedavg(clients, x_test, y_test, model=["smallcnn"], **COMMON)
    same = run_fedavg(clients, x_test, y_test, model=["smallcnn", "smallcnn"], **COMMON)
    plain = run_fedavg(clients, x_test, y_test, model="smallcnn", **COMMON)
    assert (same.val, same.test) == (plain.val, plain.test)


# --- centralized ------------------------------------------------------------------------


def test_centralized_pools_training_and_validation_data():
    a, b = _client(_mixed(30), 1, noise=1.0), _client([0] * 20 + [1] * 6, 2, noise=1.0)
    pooled = ClientData(
        torch.cat([a.x_train, b.x_train]), torch.cat([a.y_train, b.y_train]),
        torch.cat([a.x_val, b.x_val]), torch.cat([a.y_val, b.y_val]),
    )  # fmt: skip
    x_test, y_test = _test_set(25, 25, noise=1.0)
    cen = run_centralized([a, b], x_test, y_test, models=["smallcnn", "resnet8"], **COMMON)
    ref = run_isolated([pooled], x_test, y_test, models=["smallcnn"], **COMMON)
    assert cen.name == "centralized" and len(cen.val) == COMMON["rounds"] + 1
    assert [row[0] for row in cen.val] == [row[0] for row in ref.val]
    assert [row[0] for row in cen.test] == [row[0] for row in ref.test]


def test_centralized_beats_isolated_on_a_one_class_per_client_split():
    clients = [_client([0] * 40, 1), _client([1] * 40, 2)]
    x_test, y_test = _test_set(50, 50)
    kw = dict(models=["smallcnn", "smallcnn"], **COMMON)
    iso = run_isolated(clients, x_test, y_test, **kw)
    cen = run_centralized(clients, x_test, y_test, **kw)
    assert iso.mean_accuracy <= 0.55  # each client predicts its one class: half the test set
    assert cen.mean_accuracy >= 0.9


def test_fedavg_clients_train_from_the_global_model_with_their_own_seeds():
    clients = [_client(_mixed(30), 1), _client(_mixed(40), 2)]
    x_test, y_test = _test_set(10, 10)
    seen: list[list[np.ndarray]] = []
    glob = flatten_state(seeded_model("smallcnn", input_shape=SHAPE, num_classes=2, seed=0)) + 0.01

    def spy(vectors, weights):
        seen.append(vectors)
        return glob

    kw = {**COMMON, "rounds": 1}
    run_fedavg(clients, x_test, y_test, model="smallcnn", aggregate=spy, **kw)
    seed = kw["seed"]
    for k, c in enumerate(clients):  # replay client k by hand: the documented seeding scheme
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        net = seeded_model("smallcnn", input_shape=SHAPE, num_classes=2, seed=seed * 1000)
        opts = dict(lr=kw["lr"], batch_size=kw["batch_size"], generator=gen)
        train_local(net, c.x_train, c.y_train, epochs=kw["warmup_epochs"], **opts)
        np.testing.assert_array_equal(seen[0][k], flatten_state(net))
        load_flat_state(net, glob)  # round 1 starts from what the server sent
        train_local(net, c.x_train, c.y_train, epochs=kw["local_epochs"], **opts)
        np.testing.assert_array_equal(seen[1][k], flatten_state(net))
