"""Tests for SecAgg+ neighbour graphs and the (k, t) parameter choice."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocols import graph
from protocols.errors import ParameterError
from protocols.graph import (
    COMPLETE_GRAPH_BELOW,
    GraphParameters,
    NeighbourGraph,
    choose_parameters,
    complete_graph,
    harary_graph,
)

SEED = hashlib.sha256(b"test seed").digest()
OTHER_SEED = hashlib.sha256(b"other seed").digest()

# (n, corrupt, dropout) -> (k, t) of Google federated-compute (shared/reference.md).
PRODUCTION = {
    (100, 0.05, 0.05): (12, 6),
    (1000, 0.05, 0.05): (30, 17),
    (10000, 0.05, 0.05): (34, 20),
    (1_000_000, 0.05, 0.05): (38, 22),
    (100, 0.05, 0.33): (28, 6),
    (1000, 0.05, 0.33): (72, 24),
    (100, 0.33, 0.33): (68, 34),
    (1000, 0.33, 0.33): (286, 150),
}


def seed_for(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest()


# --- graphs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(5, 2), (10, 4), (11, 8), (100, 12), (1000, 30)])
def test_harary_graph_is_regular_symmetric_and_loop_free(n: int, k: int) -> None:
    g = harary_graph(n, k, seed=SEED)
    for u in range(n):
        nb = g.neighbours(u)
        assert len(nb) == k
        assert u not in nb
        assert all(0 <= v < n and u in g.neighbours(v) for v in nb)


def test_neighbours_are_ring_windows_of_the_relabelling() -> None:
    n, k = 50, 6
    g = harary_graph(n, k, seed=SEED)
    order = g.ring_order
    assert sorted(order) == list(range(n))
    for pos, client in enumerate(order):
        window = {order[(pos + o) % n] for o in range(-k // 2, k // 2 + 1) if o}
        assert g.neighbours(client) == window


def test_edges_match_neighbours() -> None:
    g = harary_graph(200, 10, seed=SEED)
    edges = list(g.edges())
    assert len(edges) == len(set(edges)) == 200 * 10 // 2
    assert all(u < v for u, v in edges)
    assert {(u, v) for u in range(200) for v in g.neighbours(u) if u < v} == set(edges)


def test_relabelling_is_deterministic_and_seed_dependent() -> None:
    a = harary_graph(1000, 30, seed=SEED)
    b = harary_graph(1000, 30, seed=bytes(SEED))
    c = harary_graph(1000, 30, seed=OTHER_SEED)
    assert a == b and a.ring_order == b.ring_order
    assert all(a.neighbours(u) == b.neighbours(u) for u in range(1000))
    assert a.ring_order != c.ring_order
    assert sum(a.neighbours(u) != c.neighbours(u) for u in range(1000)) > 900


def reference_ring_order(seed: bytes, n: int) -> list[int]:
    """The relabelling as docs/parameters.md specifies it, written independently."""
    info = b"codream-secure/graph/harary-relabel/v1/n=" + n.to_bytes(8, "big")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(64 * n))
    words = (int.from_bytes(stream[i : i + 4], "little") for i in range(0, len(stream), 4))
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        mask = (1 << i.bit_length()) - 1
        j = next(w & mask for w in words if w & mask <= i)
        order[i], order[j] = order[j], order[i]
    return order


@pytest.mark.parametrize("n", [2, 3, 10, 257, 1000])
def test_relabelling_matches_the_documented_derivation(n: int) -> None:
    degree = 2 if n > 3 else n - 1
    if degree == n - 1:
        assert harary_graph(n, degree, seed=SEED).ring_order == tuple(range(n))
    else:
        assert list(harary_graph(n, degree, seed=SEED).ring_order) == reference_ring_order(SEED, n)


def test_relabelling_known_answer() -> None:
    # Pinned so that a change of derivation (which would split clients' views) is noticed.
    assert harary_graph(10, 4, seed=bytes(32)).ring_order == KNOWN_ORDER_10


KNOWN_ORDER_10 = (3, 2, 5, 7, 1, 9, 8, 0, 6, 4)


@pytest.mark.parametrize("bound", [*range(1, 40), 1000, 2**31 + 1])
def test_draw_below_keeps_each_value_once_and_rejects_the_rest(bound: int) -> None:
    # Masked rejection: of the 2^bits low-bit patterns exactly the values below bound are kept,
    # each once, whatever the high bits, so every value is equally likely.
    bits = (bound - 1).bit_length()
    patterns = range(1 << bits) if bits <= 12 else [0, 1, bound - 1, bound, (1 << bits) - 1]
    for value in patterns:
        for high in (0, 1 << 31) if bits < 32 else (0,):
            stream = iter([value | high, 7 % bound])
            out = graph._draw_below(bound, stream)
            if value < bound:
                assert out == value and next(stream) == 7 % bound
            else:
                assert out == 7 % bound  # rejected: the next word was drawn


def test_relabelling_is_not_biased() -> None:
    # Chi-square over the 24 permutations of 4 clients, 2400 seeds (deterministic, not flaky):
    # 23 degrees of freedom, 70 is far beyond the 1e-6 quantile (about 62).
    counts = Counter(harary_graph(4, 2, seed=seed_for(i)).ring_order for i in range(2400))
    assert set(counts) == set(itertools.permutations(range(4)))
    chi2 = sum((c - 100) ** 2 / 100 for c in counts.values())
    assert chi2 < 70
    # Where client 0 lands in a ring of 10, over 1000 seeds: 9 degrees of freedom, 1e-6 ~ 41.
    where = Counter(harary_graph(10, 2, seed=seed_for(i)).ring_order.index(0) for i in range(1000))
    assert sum((where[p] - 100) ** 2 / 100 for p in range(10)) < 45


def test_complete_graph() -> None:
    for n in (2, 3, 8, 9):
        g = complete_graph(n)
        assert g.is_complete and g.degree == n - 1
        assert all(g.neighbours(u) == set(range(n)) - {u} for u in range(n))
        assert len(list(g.edges())) == n * (n - 1) // 2
    assert harary_graph(8, 7, seed=SEED).is_complete  # odd degree allowed only as n - 1
    assert harary_graph(9, 8, seed=SEED).is_complete
    assert not harary_graph(10, 8, seed=SEED).is_complete


@pytest.mark.parametrize(
    ("n", "degree", "seed"),
    [
        (10, 3, SEED),  # odd, not n - 1
        (10, 0, SEED),
        (10, 10, SEED),
        (10, 12, SEED),
        (10, -2, SEED),
        (1, 0, SEED),
        (0, 0, SEED),
        (True, 0, SEED),
        (10.0, 4, SEED),
        (10, 4.0, SEED),
        (10, 4, SEED[:31]),
        (10, 4, SEED + b"\x00"),
        (10, 4, SEED.hex()),
        (10, 4, None),
    ],
)
def test_bad_graph_parameters_raise(n: object, degree: object, seed: object) -> None:
    with pytest.raises(ParameterError):
        harary_graph(n, degree, seed=seed)  # type: ignore[arg-type]
    with pytest.raises(ParameterError):
        NeighbourGraph(n, degree, seed)  # type: ignore[arg-type]


def test_bad_client_id_raises() -> None:
    g = harary_graph(10, 4, seed=SEED)
    for bad in (-1, 10, "1", 1.0, True):
        with pytest.raises(ParameterError):
            g.neighbours(bad)  # type: ignore[arg-type]
    assert g.neighbours(np.int64(3)) == g.neighbours(3)


def test_protocol_layer_rules() -> None:
    source = Path(graph.__file__).read_text()
    for banned in ("np.random", "numpy.random", "import torch", "pickle", "import random"):
        assert banned not in source


# --- parameters: independent recomputation of the bounds --------------------------------------


def hyper(population: int, marked: int, draws: int, j: int) -> Fraction:
    return Fraction(
        math.comb(marked, j) * math.comb(population - marked, draws - j),
        math.comb(population, draws),
    )


def binom(trials: int, p: Fraction, j: int) -> Fraction:
    return math.comb(trials, j) * p**j * (1 - p) ** (trials - j)


def exact_bounds(n: int, k: int, t: int, c: float, d: float) -> tuple[Fraction, Fraction, Fraction]:
    """(key leak, disconnection, failure) union bounds, exactly, for a sparse graph."""
    corrupt = math.ceil(c * n - 1e-9)
    dropout = Fraction(d)
    leak = n * sum(hyper(n - 1, corrupt, k, j) for j in range(t, k + 1))
    runs = Fraction(n * (n - k - 1), 2)
    disconnect = runs * sum(hyper(n, corrupt, k, j) * dropout ** (k - j) for j in range(k + 1))
    fail = n * sum(binom(k, 1 - dropout, j) for j in range(t))
    return leak, disconnect, fail


def sparse_feasible(n: int, k: int, c: float, d: float, sec: int = 40, fail: int = 20) -> bool:
    for t in range(2, k + 1):
        leak, disconnect, failure = exact_bounds(n, k, t, c, d)
        if leak <= Fraction(1, 2 ** (sec + 1)):
            return disconnect <= Fraction(1, 2 ** (sec + 1)) and failure <= Fraction(1, 2**fail)
    return False


@pytest.mark.parametrize(
    ("n", "c", "d"),
    [(100, 0.05, 0.05), (1000, 0.05, 0.05), (100, 0.05, 0.33), (1000, 0.05, 0.33), (300, 0.1, 0.2)],
)
def test_chosen_parameters_meet_the_bounds_exactly(n: int, c: float, d: float) -> None:
    p = choose_parameters(n, dropout_rate=d, corrupt_rate=c)
    assert not p.complete and p.degree % 2 == 0 and 2 <= p.threshold <= p.holders == p.degree
    leak, disconnect, fail = exact_bounds(n, p.degree, p.threshold, c, d)
    assert leak <= Fraction(1, 2**41) and disconnect <= Fraction(1, 2**41)
    assert fail <= Fraction(1, 2**20)
    assert math.isclose(p.achieved_security_bits, -math.log2(leak + disconnect), rel_tol=1e-6)
    assert math.isclose(p.achieved_failure_bits, -math.log2(fail), rel_tol=1e-6)
    # threshold is the smallest secure t; max_threshold the largest correct one.
    assert exact_bounds(n, p.degree, p.threshold - 1, c, d)[0] > Fraction(1, 2**41)
    assert exact_bounds(n, p.degree, p.max_threshold, c, d)[2] <= Fraction(1, 2**20)
    assert exact_bounds(n, p.degree, p.max_threshold + 1, c, d)[2] > Fraction(1, 2**20)
    # and no smaller even degree works.
    assert not any(sparse_feasible(n, k, c, d) for k in range(max(2, p.degree - 6), p.degree, 2))


def test_complete_graph_below_cutover_and_exact_security() -> None:
    p = choose_parameters(COMPLETE_GRAPH_BELOW - 1, dropout_rate=0.05, corrupt_rate=0.05)
    assert p.complete and p.degree == p.holders == p.n - 1
    assert p.corrupt_clients == 4 and p.threshold == 5 and p.achieved_security_bits == math.inf
    # Some secret is lost exactly when at most t clients survive (one event, no union bound).
    fail = sum(binom(p.n, 1 - Fraction(0.05), j) for j in range(p.threshold + 1))
    assert math.isclose(p.achieved_failure_bits, -math.log2(fail), rel_tol=1e-6)
    assert p.graph(seed=SEED) == complete_graph(p.n)
    assert not choose_parameters(
        COMPLETE_GRAPH_BELOW, dropout_rate=0.05, corrupt_rate=0.05
    ).complete


def test_complete_graph_when_no_sparse_degree_works() -> None:
    p = choose_parameters(70, dropout_rate=0.33, corrupt_rate=0.33)
    assert p.complete and p.threshold == math.ceil(0.33 * 70) + 1 <= p.max_threshold
    assert not any(sparse_feasible(70, k, 0.33, 0.33) for k in range(62, 68, 2))


def test_infeasible_parameters_explain_why() -> None:
    with pytest.raises(ParameterError, match="all 2 clients may be corrupt"):
        choose_parameters(2, dropout_rate=0.0, corrupt_rate=0.6)
    with pytest.raises(ParameterError, match=r"complete graph.*failure_bits"):
        choose_parameters(10, dropout_rate=0.33, corrupt_rate=0.33)
    with pytest.raises(ParameterError, match="dropout_rate \\+ corrupt_rate"):
        choose_parameters(1000, dropout_rate=0.5, corrupt_rate=0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 1},
        {"n": 0},
        {"n": 100.0},
        {"n": True},
        {"n": graph.MAX_PARAMETER_CLIENTS + 1},
        {"dropout_rate": 1.0},
        {"dropout_rate": -0.1},
        {"corrupt_rate": 1.0},
        {"corrupt_rate": float("nan")},
        {"corrupt_rate": "0.1"},
        {"security_bits": 0},
        {"failure_bits": 2.5},
    ],
)
def test_bad_parameter_inputs_raise(kwargs: dict) -> None:
    args = {"n": 100, "dropout_rate": 0.05, "corrupt_rate": 0.05} | kwargs
    with pytest.raises(ParameterError):
        choose_parameters(args.pop("n"), **args)


def test_no_corruption_no_dropout_is_a_ring() -> None:
    p = choose_parameters(1000, dropout_rate=0.0, corrupt_rate=0.0)
    assert (p.degree, p.threshold, p.complete) == (2, 2, False)
    assert p.achieved_security_bits == p.achieved_failure_bits == math.inf


# --- parameters: shape of the choice ----------------------------------------------------------


def test_degree_grows_logarithmically() -> None:
    ns = [1000, 10_000, 100_000, 1_000_000]
    degrees = [choose_parameters(n, dropout_rate=0.05, corrupt_rate=0.05).degree for n in ns]
    assert degrees == sorted(degrees)
    assert degrees[-1] - degrees[0] <= 16  # x1000 clients, a few more neighbours
    assert all(k / math.log(n) < 5 for k, n in zip(degrees, ns, strict=True))


def test_more_dropout_needs_larger_degree() -> None:
    rates = [0.0, 0.05, 0.1, 0.2, 0.33]
    degrees = [choose_parameters(1000, dropout_rate=d, corrupt_rate=0.05).degree for d in rates]
    assert degrees == sorted(degrees) and degrees[0] < degrees[-1]


def test_more_corruption_needs_larger_threshold() -> None:
    rates = [0.01, 0.05, 0.1, 0.2, 0.33]
    ps = [choose_parameters(1000, dropout_rate=0.05, corrupt_rate=c) for c in rates]
    assert [p.threshold for p in ps] == sorted({p.threshold for p in ps})  # strictly increasing
    assert all(p.threshold > p.corrupt_rate * p.degree for p in ps)


def test_side_by_side_with_production() -> None:
    print("\n   n  corrupt dropout | ours k/t  | production k/t")
    for (n, c, d), (k_prod, t_prod) in PRODUCTION.items():
        p = choose_parameters(n, dropout_rate=d, corrupt_rate=c)
        print(f"{n:>8} {c:>6} {d:>6} | {p.degree:>4}/{p.threshold:<4} | {k_prod:>4}/{t_prod}")
        assert isinstance(p, GraphParameters) and not p.complete
        # Same method; on these rows uncapped dropouts ask for as much or more (parameters.md).
        assert 1.0 <= p.degree / k_prod <= 1.35
        assert 1.0 <= p.threshold / t_prod <= 1.1
