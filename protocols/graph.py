"""SecAgg+ neighbour graphs (random Harary graphs) and the choice of degree k and threshold t.

The method and its bounds are explained in docs/parameters.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, cast

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ParameterError

SEED_BYTES = 32
MAX_GRAPH_CLIENTS = 2**32 - 1  # shuffle draws come from 32-bit keystream words
MAX_PARAMETER_CLIENTS = 1_000_000  # the degree search is O(k^2); larger cohorts are untested
_RELABEL_INFO = b"codream-secure/graph/harary-relabel/v1/n="
_LN2 = math.log(2.0)
_EPS = 1e-9  # rates times n within this of an integer count as that integer
# Below this many clients the complete graph costs at most 63 pairwise keys and shares per
# client and its security is exact, so it is preferred (production's cut-over is about here).
COMPLETE_GRAPH_BELOW = 65


def _keystream_words(seed: bytes, n: int) -> Iterator[int]:
    """Endless uint32 words of AES-256-CTR under a key derived from the public seed and n."""
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=_RELABEL_INFO + n.to_bytes(8, "big")
    ).derive(seed)
    # The key is unique to (seed, n) and used for this one stream, so a zero nonce is safe.
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    chunk = 8 * max(n, 64)  # two words per shuffle step: rejection takes < 2 draws on average
    while True:
        yield from np.frombuffer(encryptor.update(bytes(chunk)), dtype="<u4").tolist()


def _draw_below(bound: int, words: Iterator[int]) -> int:
    """Uniform integer in [0, bound) by masked rejection sampling, so without modulo bias."""
    mask = (1 << (bound - 1).bit_length()) - 1
    while True:
        value = next(words) & mask
        if value < bound:
            return value


def _shuffle(n: int, words: Iterator[int]) -> list[int]:
    """Fisher-Yates shuffle of 0..n-1 driven by the given words."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = _draw_below(i + 1, words)
        order[i], order[j] = order[j], order[i]
    return order


def _check_graph(n: object, degree: object, seed: object) -> None:
    """Raise ParameterError unless (n, degree, seed) describe a valid Harary or complete graph."""
    if not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= MAX_GRAPH_CLIENTS:
        raise ParameterError(f"n must be an int in [2, {MAX_GRAPH_CLIENTS}], got {n!r}")
    if not isinstance(degree, int) or isinstance(degree, bool):
        raise ParameterError(f"degree must be an int, got {degree!r}")
    if degree != n - 1 and (degree % 2 or not 2 <= degree < n - 1):
        raise ParameterError(
            f"degree must be even and in [2, n-2] (a Harary graph), or exactly n-1 = {n - 1} "
            f"(the complete graph); got {degree} for n = {n}"
        )
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ParameterError(f"seed must be {SEED_BYTES} bytes, got {seed!r:.40}")


@dataclass(frozen=True)
class NeighbourGraph:
    """A public k-regular graph on clients 0..n-1; anyone recomputes it from (n, degree, seed)."""

    n: int
    degree: int
    seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_graph(self.n, self.degree, self.seed)

    @property
    def is_complete(self) -> bool:
        """True when every client neighbours every other (the seed is then unused)."""
        return self.degree == self.n - 1

    @cached_property
    def ring_order(self) -> tuple[int, ...]:
        """Client ids in ring order: the seed's random relabelling (identity when complete)."""
        if self.is_complete:
            return tuple(range(self.n))
        return tuple(_shuffle(self.n, _keystream_words(self.seed, self.n)))

    @cached_property
    def _ring_array(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        order = np.array(self.ring_order, dtype=np.int64)
        position = np.empty_like(order)
        position[order] = np.arange(self.n)
        half = self.degree // 2
        offsets = np.concatenate([np.arange(-half, 0), np.arange(1, half + 1)])
        return order, position, offsets

    @cached_property
    def _cache(self) -> dict[int, frozenset[int]]:
        return {}

    @cached_property
    def _everyone(self) -> frozenset[int]:
        return frozenset(range(self.n))

    def neighbours(self, client_id: int) -> frozenset[int]:
        """The clients that share keys with client_id (never client_id itself)."""
        if not isinstance(client_id, (int, np.integer)) or isinstance(client_id, bool):
            raise ParameterError(f"client id must be an int, got {client_id!r}")
        client_id = int(client_id)
        if not 0 <= client_id < self.n:
            raise ParameterError(f"client id must be in [0, {self.n}), got {client_id}")
        if self.is_complete:  # not cached: n sets of n ids would cost O(n^2) memory
            return self._everyone - {client_id}
        found = self._cache.get(client_id)
        if found is None:
            order, position, offsets = self._ring_array
            found = frozenset(order[(position[client_id] + offsets) % self.n].tolist())
            self._cache[client_id] = found
        return found

    def edges(self) -> Iterator[tuple[int, int]]:
        """Every undirected edge once, as (u, v) with u < v."""
        if self.is_complete:
            for u in range(self.n):
                for v in range(u + 1, self.n):
                    yield u, v
            return
        order, n = self.ring_order, self.n
        # degree <= n-2 keeps each forward offset pair distinct from its reverse.
        for pos in range(n):
            for offset in range(1, self.degree // 2 + 1):
                u, v = order[pos], order[(pos + offset) % n]
                yield (u, v) if u < v else (v, u)


def harary_graph(n: int, degree: int, *, seed: bytes) -> NeighbourGraph:
    """Random k-regular Harary graph: ring neighbours within degree/2 after a seeded relabelling."""
    return NeighbourGraph(n, degree, seed)


def complete_graph(n: int) -> NeighbourGraph:
    """Every client neighbours every other client (classic SecAgg)."""
    return NeighbourGraph(n, n - 1, bytes(SEED_BYTES))


@dataclass(frozen=True)
class GraphParameters:
    """Degree and Shamir threshold for n clients, with the inputs and the bounds they achieve.

    Each client's secrets are shared among its degree neighbours (never itself, as in
    secagg/client.py). threshold is the smallest t meeting the security bound; any t up to
    max_threshold also meets the failure bound. Achieved bits are -log2 of the bounds (inf at 0).
    """

    n: int
    dropout_rate: float
    corrupt_rate: float
    security_bits: int
    failure_bits: int
    degree: int
    threshold: int
    max_threshold: int
    complete: bool
    corrupt_clients: int
    achieved_security_bits: float
    achieved_failure_bits: float

    @property
    def holders(self) -> int:
        """Share holders per client: its neighbours."""
        return self.degree

    def graph(self, *, seed: bytes) -> NeighbourGraph:
        """The neighbour graph these parameters describe, relabelled by the public seed."""
        if self.complete:
            return complete_graph(self.n)
        return harary_graph(self.n, self.degree, seed=seed)


@lru_cache(maxsize=4)
def _log_factorials(m: int) -> np.ndarray:
    table = np.fromiter((math.lgamma(i + 1) for i in range(m + 1)), dtype=float, count=m + 1)
    table.flags.writeable = False
    return table


def _log_comb(lf: np.ndarray, a: int | np.ndarray, b: np.ndarray) -> np.ndarray:
    """Natural log of C(a, b) elementwise, -inf where b < 0 or b > a."""
    a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
    ok = (b >= 0) & (b <= a)
    a_, b_ = np.where(ok, a, 0), np.where(ok, b, 0)
    return np.where(ok, lf[a_] - lf[b_] - lf[a_ - b_], -np.inf)


def _log_hypergeom_pmf(lf: np.ndarray, population: int, marked: int, draws: int) -> np.ndarray:
    """ln P(X = j), j = 0..draws: marked items among draws taken without replacement."""
    j = np.arange(draws + 1)
    return cast(np.ndarray, (
        _log_comb(lf, marked, j)
        + _log_comb(lf, population - marked, draws - j)
        - _log_comb(lf, population, np.array(draws))
    ))


def _times_log(count: np.ndarray, p: float) -> np.ndarray:
    """count * ln(p) elementwise, with 0 * ln(0) = 0 (no events at probability 0 is certain)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, count * np.log(p), 0.0)


def _log_binom_pmf(lf: np.ndarray, trials: int, p: float) -> np.ndarray:
    """ln P(X = j), j = 0..trials, for X ~ Binomial(trials, p)."""
    j = np.arange(trials + 1)
    return cast(np.ndarray,
                _log_comb(lf, trials, j) + _times_log(j, p) + _times_log(trials - j, 1.0 - p))


def _logsumexp(values: np.ndarray) -> float:
    return float(np.logaddexp.reduce(values)) if values.size else -math.inf


def _corrupt_count(n: int, corrupt_rate: float) -> int:
    """Corrupt clients the bound allows for: corrupt_rate * n rounded up (conservative)."""
    return min(n, math.ceil(corrupt_rate * n - _EPS)) if corrupt_rate > 0 else 0


def _log_disconnect(lf: np.ndarray, n: int, k: int, corrupt: int, dropout_rate: float) -> float:
    """ln of the union bound that the honest survivors of a random Harary graph disconnect.

    Survivors stay connected unless two separate runs of k/2 consecutive ring positions are all
    deleted (corrupt or dropped); there are n(n-k-1)/2 such pairs of runs, and the k positions
    of a pair hold a uniformly random k-subset of clients.
    """
    corrupt_in_runs = _log_hypergeom_pmf(lf, n, corrupt, k)
    all_dropped = _times_log(k - np.arange(k + 1), dropout_rate)  # every honest one must drop
    pairs = math.log(n) + math.log(n - k - 1) - _LN2
    return pairs + _logsumexp(corrupt_in_runs + all_dropped)


def _sparse_threshold(
    lf: np.ndarray, n: int, k: int, corrupt: int, dropout_rate: float, sec: int, fail: int
) -> tuple[int, int, float, float] | None:
    """(t, t_max, ln security bound, ln failure bound) for degree k, or None if no t works."""
    budget = -(sec + 1) * _LN2  # two bad events share the 2^-sec budget equally
    log_disc = _log_disconnect(lf, n, k, corrupt, dropout_rate)
    if log_disc > budget:
        return None
    # An honest client's k neighbours are a uniform k-subset of the n-1 others.
    leak_pmf = _log_hypergeom_pmf(lf, n - 1, corrupt, k)
    log_leak_ge = np.append(np.logaddexp.accumulate(leak_pmf[::-1])[::-1], -np.inf) + math.log(n)
    # A client's secret is lost when fewer than t of its k neighbours survive, whatever its fate.
    survive_pmf = _log_binom_pmf(lf, k, 1.0 - dropout_rate)
    log_fail_lt = np.insert(np.logaddexp.accumulate(survive_pmf), 0, -np.inf) + math.log(n)
    t = max(2, int(np.argmax(log_leak_ge <= budget)))
    ok_fail = np.nonzero(log_fail_lt <= -fail * _LN2)[0]
    t_max = int(ok_fail[-1]) if ok_fail.size else 0
    if t > t_max:
        return None
    return t, t_max, float(np.logaddexp(log_leak_ge[t], log_disc)), float(log_fail_lt[t])


def _bits(log_prob: float) -> float:
    return math.inf if log_prob == -math.inf else max(0.0, -log_prob / _LN2)


def _check_rates(
    n: object, dropout_rate: float, corrupt_rate: float, sec: object, fail: object
) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= MAX_PARAMETER_CLIENTS:
        raise ParameterError(f"n must be an int in [2, {MAX_PARAMETER_CLIENTS}], got {n!r}")
    for name, rate in (("dropout_rate", dropout_rate), ("corrupt_rate", corrupt_rate)):
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate < 1:
            raise ParameterError(f"{name} must be a number in [0, 1), got {rate!r}")
    for name, bits in (("security_bits", sec), ("failure_bits", fail)):
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 256:
            raise ParameterError(f"{name} must be an int in [1, 256], got {bits!r}")
    if dropout_rate + corrupt_rate >= 1:
        raise ParameterError(
            f"dropout_rate + corrupt_rate = {dropout_rate + corrupt_rate:g} >= 1: no threshold "
            "can exceed the corrupt holders and still be met by the surviving ones"
        )


def _complete_threshold(
    lf: np.ndarray, n: int, corrupt: int, dropout_rate: float, fail: int
) -> tuple[int, int, float]:
    """(t, t_max, ln failure bound) for the complete graph; t > t_max means infeasible.

    Every honest client's holders include all corrupt clients, so security needs t > corrupt,
    exactly. With S survivors a survivor has S-1 surviving holders and a dropped client S, so
    some secret is lost exactly when S <= t: one event, no union bound.
    """
    t = max(2, corrupt + 1)
    survive_pmf = _log_binom_pmf(lf, n, 1.0 - dropout_rate)
    log_fail_le = np.logaddexp.accumulate(survive_pmf)
    ok_fail = np.nonzero(log_fail_le <= -fail * _LN2)[0]
    t_max = int(ok_fail[-1]) if ok_fail.size else 0
    return t, t_max, float(log_fail_le[min(t, n)])


def choose_parameters(
    n: int,
    *,
    dropout_rate: float,
    corrupt_rate: float,
    security_bits: int = 40,
    failure_bits: int = 20,
) -> GraphParameters:
    """Smallest even Harary degree k and threshold t meeting both bounds, else the complete graph.

    Below COMPLETE_GRAPH_BELOW clients the complete graph is preferred when it meets the bounds.
    Raises ParameterError when no graph meets them, saying why.
    """
    _check_rates(n, dropout_rate, corrupt_rate, security_bits, failure_bits)
    dropout_rate, corrupt_rate = float(dropout_rate), float(corrupt_rate)
    corrupt = _corrupt_count(n, corrupt_rate)
    lf = _log_factorials(n)
    common: dict[str, Any] = dict(
        n=n,
        dropout_rate=dropout_rate,
        corrupt_rate=corrupt_rate,
        security_bits=security_bits,
        failure_bits=failure_bits,
        corrupt_clients=corrupt,
    )
    t, t_max, log_fail = _complete_threshold(lf, n, corrupt, dropout_rate, failure_bits)
    complete = GraphParameters(
        degree=n - 1,
        threshold=t,
        max_threshold=t_max,
        complete=True,
        achieved_security_bits=math.inf,
        achieved_failure_bits=_bits(log_fail),
        **common,
    )
    if n < COMPLETE_GRAPH_BELOW and t <= t_max:
        return complete
    for k in range(2, n - 1, 2):
        found = _sparse_threshold(lf, n, k, corrupt, dropout_rate, security_bits, failure_bits)
        if found is not None:
            t_k, t_max_k, log_sec, log_fail_k = found
            return GraphParameters(
                degree=k,
                threshold=t_k,
                max_threshold=t_max_k,
                complete=False,
                achieved_security_bits=_bits(log_sec),
                achieved_failure_bits=_bits(log_fail_k),
                **common,
            )
    if t <= t_max:
        return complete
    if t > n:
        raise ParameterError(
            f"no parameters for n = {n}, corrupt_rate = {corrupt_rate:g}: all {corrupt} clients "
            "may be corrupt, so no threshold keeps an honest client's shares from them; add "
            "clients or lower corrupt_rate"
        )
    raise ParameterError(
        f"no parameters for n = {n}, corrupt_rate = {corrupt_rate:g}, dropout_rate = "
        f"{dropout_rate:g}: no sparse degree works, and the complete graph needs a threshold "
        f"t >= {t} (above corrupt_clients = {corrupt}, and at least 2), but at this dropout "
        f"rate fewer than {t} of the {n} clients survive with probability above "
        f"2^-{failure_bits}; add clients, lower the rates, or accept a larger failure "
        "probability (smaller failure_bits)"
    )
