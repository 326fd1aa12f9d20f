"""Measurement core of the overhead suite: the aggregator table, timed calls, power-law fits, plots.

An aggregator is data: a name and a callable that sums n client vectors and reports bytes and
seconds. Paillier, DP and Flower rows join the table only when their feature is importable, so
the suite runs before and after they land.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codream_secure.audit.reporting import save_figure
from protocols import registry
from protocols.api import secure_sum
from protocols.graph import COMPLETE_GRAPH_BELOW, choose_parameters
from protocols.plan import majority_threshold
from protocols.session import SETUP_STAGES, Dropout, Stage

FLOAT32_BYTES = 4  # the plaintext every expansion is measured against: float32 per element


@dataclass(frozen=True)
class Point:
    """One configuration: n clients, m elements, which clients drop and at which stage."""

    n: int
    m: int
    dropout_rate: float
    stage: str
    dropped: tuple[int, ...]
    clip: float
    seed: int


@dataclass(frozen=True)
class CallResult:
    """What one aggregation returned, in the shape every aggregator shares."""

    total: np.ndarray
    included: tuple[int, ...]
    bytes_up: np.ndarray
    bytes_down: np.ndarray
    client_seconds: np.ndarray
    server_seconds: float
    degree: int
    threshold: int
    error_bound: float


Runner = Callable[[np.ndarray, Point], CallResult]


@dataclass(frozen=True)
class DPOption:
    """A DP variant: mode, noise multiplier z and L2 clip C (None: the inputs' largest norm)."""

    mode: str
    noise_multiplier: float = 1.0
    l2_clip: float | None = None

    def l2(self, point: Point) -> float:
        """C for this point: the given clip, or clip * sqrt(m), which no input exceeds."""
        return self.l2_clip if self.l2_clip is not None else point.clip * math.sqrt(point.m)


@dataclass(frozen=True)
class Aggregator:
    """A row label, who built it, and how to run it; `max_n`/`max_m` cap what it is given."""

    name: str
    system: str
    protocol: str
    run: Runner
    dp: DPOption | None = None
    max_n: int | None = None
    max_m: int | None = None
    repeats: int | None = None  # None: the section's repeat count


# -- the aggregator table ----------------------------------------------------------------------

def dropout_set(n: int, rate: float, seed: int) -> tuple[int, ...]:
    """round(rate * n) clients, a seeded public choice, so every aggregator loses the same ones."""
    count = min(round(rate * n), n - 2)
    rng = np.random.default_rng([seed, n, round(rate * 1e6)])
    return tuple(sorted(int(c) for c in rng.choice(n, size=count, replace=False)))


def secaggplus_parameters(n: int, rate: float) -> tuple[int, int] | None:
    """(degree, threshold) our SecAgg+ picks for n clients at this dropout rate; None: complete."""
    if n < COMPLETE_GRAPH_BELOW:
        return None
    params = choose_parameters(n, dropout_rate=max(rate, 0.05), corrupt_rate=0.05)
    return None if params.complete else (params.degree, params.threshold)


def threshold_for(protocol: str, point: Point) -> int:
    """The Shamir (or decryption) threshold `protocol` runs with at this point."""
    spec = registry.get(protocol)
    if not spec.pairwise_masks:  # plain: 1; Paillier: the quorum a DP session decrypts at
        return spec.plan(point.n, private=True).threshold
    chosen = secaggplus_parameters(point.n, point.dropout_rate) if spec.sparse_graph else None
    return chosen[1] if chosen else majority_threshold(point.n)


def make_dp_spec(option: DPOption, protocol: str, point: Point) -> Any:
    """The protocols.dp spec for this point; distributed noise is sized for the fewest
    contributors the protocol can ever release (its plan's min_contributors)."""
    from protocols.dp.mechanisms import DPSpec

    extra = {}
    if option.mode == "distributed":
        extra["min_contributors"] = registry.get(protocol).plan(
            point.n, threshold=threshold_for(protocol, point), private=True).min_contributors
    return DPSpec(mode=option.mode, noise_multiplier=option.noise_multiplier,
                  l2_clip=option.l2(point), **extra)


def ours(protocol: str, *, dp: DPOption | None = None, **extra: Any) -> Runner:
    """Run protocols.api.secure_sum with `protocol`; `extra` goes through to it."""

    def run(vectors: np.ndarray, point: Point) -> CallResult:
        kwargs = dict(extra)
        chosen = secaggplus_parameters(point.n, point.dropout_rate)
        if registry.get(protocol).sparse_graph and chosen is not None:
            # the graph is sized for the real dropout rate (secure_sum's own choice assumes 5%)
            kwargs["degree"], kwargs["threshold"] = chosen
        if dp is not None:
            kwargs["dp"] = make_dp_spec(dp, protocol, point)
        stage = Stage(point.stage)
        step = 0 if stage in SETUP_STAGES else 1  # setup stages happen once, at step 0
        result = secure_sum(vectors, protocol=protocol, clip=point.clip, seed=point.seed,
                            dropouts=[Dropout(c, step, stage) for c in point.dropped], **kwargs)
        return CallResult(np.asarray(result.total, np.float64), tuple(result.included),
                          np.asarray(result.bytes_up), np.asarray(result.bytes_down),
                          np.asarray(result.client_seconds, float), float(result.server_seconds),
                          int(result.degree), int(result.threshold), float(result.error_bound))

    return run


def flower_available() -> bool:
    """Whether Flower (the optional `flower` extra) imports."""
    try:
        import codream_secure.audit.overhead.flower_secaggplus  # noqa: F401
    except ImportError:
        return False
    return True


def flower_secaggplus(vectors: np.ndarray, point: Point) -> CallResult:
    """Flower 1.42's SecAgg+ with the same degree and threshold as ours at this point."""
    from codream_secure.audit.overhead.flower_secaggplus import run_flower_secaggplus

    n = point.n
    degree, threshold = secaggplus_parameters(n, point.dropout_rate) or (
        n - 1, majority_threshold(n))
    drops = {"drop_before_upload" if point.stage in ("advertise", "roster", "upload")
             else "drop_after_upload": point.dropped}
    result = run_flower_secaggplus(vectors, num_shares=degree + 1,
                                   reconstruction_threshold=threshold,
                                   clipping_range=point.clip, seed=point.seed, **drops)
    quantum = 2 * point.clip / 2**22  # Flower's default quantization_range
    return CallResult(result.sum, result.included, result.bytes_up, result.bytes_down,
                      result.client_seconds, result.server_seconds, degree, threshold,
                      1.125 * len(result.included) * quantum)


def dp_supported() -> bool:
    """Whether secure_sum takes `dp=` and protocols.dp exists."""
    try:
        import protocols.dp.mechanisms  # noqa: F401
    except ImportError:
        return False
    return "dp" in inspect.signature(secure_sum).parameters




def aggregator_table(names: Sequence[str], *, dp_variants: Sequence[tuple[str, str]] = (),
                     dp_noise_multiplier: float = 1.0, dp_l2_clip: float | None = None,
                     flower: bool = True,
                     flower_caps: tuple[int, int, int] = (32, 2**18, 2),
                     paillier_caps: tuple[int, int, int] = (16, 1024, 1),
                     ) -> tuple[list[Aggregator], list[str]]:
    """The aggregators this build offers among `names` (+ DP variants, + Flower), and notes."""
    table, notes = [], []
    for name in names:
        if name not in registry.names():
            notes.append(f"{name}: not in protocols.registry in this build; rows skipped")
            continue
        if registry.get(name).key_holder:  # slow key setup and encryption: capped
            n_cap, m_cap, reps = paillier_caps
            table.append(Aggregator(name, "codream-secure", name, ours(name),
                                    max_n=n_cap, max_m=m_cap, repeats=reps))
        else:
            table.append(Aggregator(name, "codream-secure", name, ours(name)))
    if dp_variants and not dp_supported():
        notes.append("DP rows skipped: secure_sum has no `dp=` (or protocols.dp is missing)")
    for base, mode in dp_variants if dp_supported() else ():
        plain = next((a for a in table if a.name == base), None)
        if plain is None:
            continue
        option = DPOption(mode, dp_noise_multiplier, dp_l2_clip)
        table.append(Aggregator(f"{base} +dp-{mode}", "codream-secure", base,
                                ours(base, dp=option), dp=option, max_n=plain.max_n,
                                max_m=plain.max_m, repeats=plain.repeats))
    if flower and flower_available():
        n_cap, m_cap, reps = flower_caps
        table.append(Aggregator("flower secagg+", "flower 1.42", "secagg+", flower_secaggplus,
                                max_n=n_cap, max_m=m_cap, repeats=reps))
    elif flower:
        notes.append("Flower rows skipped: flwr is not installed (pip install '.[flower]')")
    return table, notes


# -- timed calls -------------------------------------------------------------------------------

def client_inputs(n: int, m: int, clip: float, seed: int) -> np.ndarray:
    """n float32 vectors uniform in [-clip, clip] (no clipping, so the exact sum is the target)."""
    rng = np.random.default_rng([seed, n, m])
    return rng.uniform(-clip, clip, size=(n, m)).astype(np.float32)


def expansion(bytes_per_client: float, m: int) -> float:
    """Bytes a client moves per float32 byte of its m-element plaintext vector."""
    return float(bytes_per_client) / (FLOAT32_BYTES * m)


def max_abs_error(total: np.ndarray, vectors: np.ndarray, included: Sequence[int]) -> float:
    """max |total - exact sum over the included clients| (exact: float64 sum of the inputs)."""
    exact = vectors[list(included)].astype(np.float64).sum(axis=0)
    return float(np.max(np.abs(np.asarray(total, np.float64) - exact)))


@dataclass
class Timed:
    """Results of repeated calls at one point; `row` reduces them to medians."""

    calls: list[CallResult] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)

    def add(self, agg: Aggregator, vectors: np.ndarray, point: Point) -> None:
        """One timed call (perf_counter for wall, process_time for this process's CPU)."""
        wall, cpu = time.perf_counter(), time.process_time()
        result = agg.run(vectors, point)
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)
        self.errors.append(max_abs_error(result.total, vectors, result.included))
        self.calls.append(result)

    def row(self) -> dict[str, Any]:
        """Medians of the seconds; bytes (per included client) and parameters of the last call."""
        last = self.calls[-1]
        inc = list(last.included)
        up, down = float(np.mean(last.bytes_up[inc])), float(np.mean(last.bytes_down[inc]))
        m = last.total.size
        return {
            "repeats": len(self.calls), "included": len(inc),
            "degree": last.degree, "threshold": last.threshold,
            "client_s": statistics.median(float(np.mean(c.client_seconds[list(c.included)]))
                                          for c in self.calls),
            "server_s": statistics.median(c.server_seconds for c in self.calls),
            "wall_s": statistics.median(self.wall), "cpu_s": statistics.median(self.cpu),
            "bytes_up": up, "bytes_down": down,
            "expansion_up": expansion(up, m), "expansion_down": expansion(down, m),
            "max_abs_error": max(self.errors), "error_bound": last.error_bound,
        }


def warm_up(table: Sequence[Aggregator], *, clip: float, seed: int) -> None:
    """One untimed call per aggregator on a tiny input (imports, caches, key-size tables)."""
    vectors = client_inputs(3, 64, clip, seed)
    for agg in table:
        agg.run(vectors, Point(3, 64, 0.0, "upload", (), clip, seed))


# -- power-law fits and plots ------------------------------------------------------------------

@dataclass(frozen=True)
class PowerFit:
    """y = coefficient * x ** exponent, fitted by least squares on (log x, log y)."""

    exponent: float
    coefficient: float
    r2: float
    points: int


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerFit:
    """Least-squares line through (log x, log y); non-positive points are left out.

    Fewer than two distinct usable x values give NaN exponent and coefficient.
    """
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    keep = (xs > 0) & (ys > 0) & np.isfinite(xs) & np.isfinite(ys)
    lx, ly = np.log(xs[keep]), np.log(ys[keep])
    if np.unique(lx).size < 2:
        return PowerFit(math.nan, math.nan, math.nan, int(keep.sum()))
    slope, intercept = np.polyfit(lx, ly, 1)
    residual = ly - (slope * lx + intercept)
    spread = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / spread if spread > 0 else 1.0
    return PowerFit(float(slope), float(math.exp(intercept)), r2, int(keep.sum()))


def plot_metrics(rows: Sequence[dict[str, Any]], *, x_key: str, metrics: Sequence[tuple[str, str]],
                 out_dir: Path, name: str, title: str, log_x: bool = True,
                 fits: dict[tuple[str, str], PowerFit] | None = None,
                 tail_fits: dict[tuple[str, str], PowerFit] | None = None) -> str:
    """One panel per metric, one line per aggregator; fitted exponents go in the legend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * len(metrics), 4.2))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    labels = sorted(dict.fromkeys(r["aggregator"] for r in rows), key=lambda label: _order(
        next(r for r in rows if r["aggregator"] == label)))
    xs = sorted({r[x_key] for r in rows})
    for ax, (metric, axis_label) in zip(axes, metrics, strict=True):
        for index, label in enumerate(labels):
            mine = [r for r in rows if r["aggregator"] == label and r[metric] > 0]
            if not mine:
                continue
            legend = label + _exponents((fits or {}).get((label, metric)),
                                        (tail_fits or {}).get((label, metric)))
            style = ":" if mine[0]["system"] != "codream-secure" else \
                "--" if mine[0]["dp"] != "none" else "-"
            pts = sorted((r[x_key], r[metric]) for r in mine)
            ax.plot(*zip(*pts, strict=True), style, marker="o", color=f"C{index % 10}",
                    label=legend + _fixed_label(rows, label, x_key))
        ax.set_yscale("log")
        if log_x:
            ax.set_xscale("log")
            ax.set_xticks(xs, [_tick(x) for x in xs])
            ax.minorticks_off()
        ax.set_xlabel(x_key)
        ax.set_ylabel(axis_label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, out_dir, name)


def _exponents(fit: PowerFit | None, tail: PowerFit | None) -> str:
    """' (a=0.21, tail 0.48)': the exponent over all points, then over the largest x."""
    if fit is None or math.isnan(fit.exponent):
        return ""
    if tail is None or math.isnan(tail.exponent) or tail.points == fit.points:
        return f" (a={fit.exponent:.2f})"
    return f" (a={fit.exponent:.2f}, tail {tail.exponent:.2f})"


def _order(row: dict[str, Any]) -> tuple:
    """Ours before others, without DP before with, then the protocol registry's order."""
    known = [*registry.names(), row["protocol"]]
    return (row["system"] != "codream-secure", row["dp"] != "none",
            known.index(row["protocol"]), row["aggregator"])


def _tick(x: float) -> str:
    """Powers of two from 2^10 up as 2^k, the rest as numbers."""
    k = math.log2(x) if x > 0 else 0.5
    return f"$2^{{{int(k)}}}$" if k == int(k) and k >= 10 else f"{x:g}"


def _fixed_label(rows: Sequence[dict[str, Any]], label: str, x_key: str) -> str:
    """' [m=1024]' when a capped aggregator ran at another n or m than the other rows."""
    parts = []
    for other in ("n", "m"):
        if other == x_key:
            continue
        mine = {r[other] for r in rows if r["aggregator"] == label}
        everyone = [r[other] for r in rows]
        usual = max(set(everyone), key=everyone.count)
        if len(mine) == 1 and usual not in mine:
            parts.append(f"{other}={mine.pop()}")
    return f" [{', '.join(parts)}]" if parts else ""
