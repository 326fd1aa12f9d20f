"""Overhead of secure aggregation across aggregators, n, m and dropout rate, and one CoDream round.

    codream-secure bench overhead --settings default --out runs/bench-overhead
    python -m codream_secure.audit.overhead.suite --settings default --no-flower

Writes a report folder (report.json, report.md, CSVs, log-log PNGs) through
codream_secure.audit.reporting.
Timings: one untimed warm-up call per aggregator, then repeats interleaved across aggregators at
each point, medians reported; compare rows as ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codream_secure.audit.overhead.scaling import (
    Aggregator,
    Point,
    Timed,
    aggregator_table,
    client_inputs,
    dropout_set,
    fit_power_law,
    plot_metrics,
    warm_up,
)
from codream_secure.audit.reporting import SectionResult, write_report

FITTED = (("client_s", "client seconds"), ("server_s", "server seconds"),
          ("bytes_up", "bytes up per client"))


@dataclass(frozen=True)
class OverheadSettings:
    """Grids and budgets of the overhead suite (every field lands in report.json's config)."""

    name: str = "default"
    seed: int = 0
    clip: float = 8.0  # inputs are uniform in [-clip, clip]; 8 is Flower's clipping_range
    repeats: int = 3
    aggregators: tuple[str, ...] = ("plain", "secagg", "secagg+", "paillier")
    dp_variants: tuple[tuple[str, str], ...] = (
        ("plain", "central"), ("secagg", "distributed"), ("secagg+", "distributed"))
    dp_noise_multiplier: float = 1.0
    dp_l2_clip: float | None = None  # None: clip * sqrt(m), so DP scales no input down
    flower: bool = True
    flower_caps: tuple[int, int, int] = (32, 2**18, 2)  # max n, max m, repeats
    paillier_caps: tuple[int, int, int] = (8, 1024, 1)  # 3072-bit keys: small n and m only
    n_values: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    n_sweep_m: int = 2**14
    m_values: tuple[int, ...] = (2**8, 2**10, 2**12, 2**14, 2**16, 2**18)
    m_sweep_n: int = 16
    dropout_rates: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    dropout_n: int = 24
    dropout_m: int = 2**14
    dropout_stage: str = "upload"  # before the masked upload: the server must recover masks
    codream_variants: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = (
        ("plain", (("aggregator", "plain"),)), ("secagg", (("aggregator", "secagg"),)),
        ("secagg +dp-client", (("aggregator", "secagg"), ("dp", "client"), ("dp_noise", 1.0))))
    codream_repeats: int = 2  # runs per variant, in alternating order
    codream: tuple[tuple[str, Any], ...] = (
        ("dataset", "digits"), ("clients", 4), ("models", ("smallcnn", "resnet8")),
        ("server_model", "smallcnn"), ("rounds", 4), ("warmup_epochs", 2), ("local_epochs", 1),
        ("dream_batch", 64), ("dream_steps", 50), ("distill_epochs", 1), ("buffer_size", 128),
        ("threads", 1), ("device", "cpu"))
    session_step_m: tuple[int, ...] = (4096, 786_432)
    session_steps: int = 10


TINY = OverheadSettings(
    name="tiny", repeats=1, aggregators=("plain", "secagg", "secagg+"),
    dp_variants=(("secagg+", "distributed"),), flower_caps=(5, 256, 1),
    paillier_caps=(4, 64, 1), n_values=(3, 5), n_sweep_m=128, m_values=(64, 256), m_sweep_n=3,
    dropout_rates=(0.0, 0.25), dropout_n=5, dropout_m=128,
    codream=(("dataset", "digits"), ("clients", 2), ("models", ("smallcnn",)),
             ("server_model", "smallcnn"), ("rounds", 1), ("warmup_epochs", 0),
             ("local_epochs", 1), ("dream_batch", 4), ("dream_steps", 2), ("distill_epochs", 1),
             ("buffer_size", 4), ("max_train", 120), ("max_test", 60), ("threads", 1),
             ("device", "cpu")),
    codream_variants=(("plain", (("aggregator", "plain"),)),
                      ("secagg", (("aggregator", "secagg"),))),
    codream_repeats=1, session_step_m=(256,), session_steps=2,
)
DEFAULT = OverheadSettings()
FULL = OverheadSettings(
    name="full", repeats=5, flower_caps=(64, 2**20, 3), paillier_caps=(32, 4096, 2),
    dp_variants=(("plain", "central"), ("secagg", "distributed"), ("secagg+", "distributed"),
                 ("secagg+", "central"), ("paillier", "distributed")),
    n_values=(4, 8, 16, 32, 64, 128, 256, 512), m_values=tuple(2**k for k in range(8, 21, 2)),
    dropout_rates=(0.0, 0.1, 0.2, 0.3, 0.4), dropout_n=64,
    codream_repeats=3,
)
SETTINGS = {"tiny": TINY, "default": DEFAULT, "full": FULL}


def _log(progress: Any, message: str) -> None:
    if progress is not None:
        progress.log(message)


def measure_grid(table: Sequence[Aggregator], grid: Sequence[tuple[int, int, float]],
                 settings: OverheadSettings, *, section: str, progress: Any = None
                 ) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows for every aggregator at every (n, m, dropout rate), n and m capped per aggregator.

    Repeats are interleaved across aggregators at each point, so a slow spell of the shared
    machine hits all of them alike.
    """
    plan: dict[tuple[int, int, float], list[Aggregator]] = {}
    for agg in table:
        for n, m, rate in grid:
            key = (min(n, agg.max_n or n), min(m, agg.max_m or m), rate)
            if agg not in plan.setdefault(key, []):
                plan[key].append(agg)
    rows, notes = [], []
    for (n, m, rate), aggs in sorted(plan.items()):
        vectors = client_inputs(n, m, settings.clip, settings.seed)
        point = Point(n, m, rate, settings.dropout_stage,
                      dropout_set(n, rate, settings.seed), settings.clip, settings.seed)
        timed = {agg.name: Timed() for agg in aggs}
        failed: set[str] = set()
        for rep in range(max(agg.repeats or settings.repeats for agg in aggs)):
            for agg in aggs:
                if rep >= (agg.repeats or settings.repeats) or agg.name in failed:
                    continue
                try:
                    timed[agg.name].add(agg, vectors, point)
                except (ValueError, RuntimeError) as error:  # ProtocolError is a ValueError
                    failed.add(agg.name)
                    notes.append(f"{agg.name} at n={n} m={m} rate={rate}: {error}")
        for agg in aggs:
            if agg.name in failed:
                continue
            rows.append({"aggregator": agg.name, "system": agg.system,
                         "protocol": agg.protocol, "dp": agg.dp.mode if agg.dp else "none",
                         "dp_sigma": agg.dp.noise_multiplier * agg.dp.l2(point) if agg.dp
                         else 0.0, "n": n, "m": m,
                         "dropout_rate": rate, "dropout_stage": settings.dropout_stage,
                         "dropped": len(point.dropped), **timed[agg.name].row()})
        _log(progress, f"{section}: n={n} m={m} rate={rate} done ({len(aggs)} aggregators)")
    _add_ratios(rows)
    return rows, notes


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """wall_vs_plain on every row; Flower rows also get Flower / ours (SecAgg+) ratios."""
    by_point = {(r["n"], r["m"], r["dropout_rate"], r["aggregator"]): r for r in rows}
    for row in rows:
        key = (row["n"], row["m"], row["dropout_rate"])
        plain = by_point.get((*key, "plain"))
        row["wall_vs_plain"] = row["wall_s"] / plain["wall_s"] if plain else None
        ours = by_point.get((*key, "secagg+"))
        if row["system"] != "codream-secure" and ours is not None:
            for metric in ("client_s", "server_s", "bytes_up", "max_abs_error"):
                row[f"{metric}_vs_ours"] = row[metric] / ours[metric] if ours[metric] else None


def _fit_rows(rows: list[dict[str, Any]], x_key: str, tail: int = 3
              ) -> tuple[dict, dict, list[dict[str, Any]]]:
    """Fit cost = c * x^a per aggregator and metric, over all points and over the `tail`
    largest x (fixed costs flatten the small end); write exp_* and exp_tail_* into each row."""
    fits, tails, table = {}, {}, []
    for label in dict.fromkeys(r["aggregator"] for r in rows):
        mine = sorted((r for r in rows if r["aggregator"] == label), key=lambda r: r[x_key])
        for metric, _ in (*FITTED, ("wall_s", "wall seconds")):
            fit = fit_power_law([r[x_key] for r in mine], [r[metric] for r in mine])
            end = fit_power_law([r[x_key] for r in mine[-tail:]],
                                [r[metric] for r in mine[-tail:]])
            fits[(label, metric)], tails[(label, metric)] = fit, end
            table.append({"aggregator": label, "x": x_key, "metric": metric, **vars(fit),
                          "tail_exponent": end.exponent, "tail_points": end.points})
            for r in mine:
                r[f"exp_{metric}"], r[f"exp_tail_{metric}"] = fit.exponent, end.exponent
    return fits, tails, table


def scaling_section(settings: OverheadSettings, out_dir: Path, table: Sequence[Aggregator],
                    x_key: str, progress: Any = None) -> SectionResult:
    """Cost vs n (fixed m) or vs m (fixed n), no dropouts, with log-log fits."""
    start = time.perf_counter()
    if x_key == "n":
        grid = [(n, settings.n_sweep_m, 0.0) for n in settings.n_values]
        fixed = f"m={settings.n_sweep_m}"
    else:
        grid = [(settings.m_sweep_n, m, 0.0) for m in settings.m_values]
        fixed = f"n={settings.m_sweep_n}"
    rows, notes = measure_grid(table, grid, settings, section=f"scaling_{x_key}",
                               progress=progress)
    fits, tails, fit_table = _fit_rows(rows, x_key)
    name = f"scaling_{x_key}"
    figure = plot_metrics(rows, x_key=x_key, metrics=FITTED, out_dir=out_dir,
                          name=f"{name}.png", fits=fits, tail_fits=tails,
                          title=f"cost vs {x_key} ({fixed}, no dropouts); a = fitted exponent "
                                f"over all points, tail = over the 3 largest {x_key}")
    summary = {f"{label} {metric} exponent (all; 3 largest {x_key})":
               f"{fit.exponent:.2f}; {tails[(label, metric)].exponent:.2f}"
               for (label, metric), fit in fits.items() if metric != "wall_s"}
    return SectionResult(name, f"Scaling with {x_key} ({fixed})", summary, rows,
                         {"fits": fit_table}, [figure], notes, time.perf_counter() - start)


def dropout_section(settings: OverheadSettings, out_dir: Path, table: Sequence[Aggregator],
                    progress: Any = None) -> SectionResult:
    """Cost vs dropout rate at fixed n and m (clients drop at `dropout_stage`)."""
    start = time.perf_counter()
    grid = [(settings.dropout_n, settings.dropout_m, r) for r in settings.dropout_rates]
    rows, notes = measure_grid(table, grid, settings, section="dropout", progress=progress)
    figure = plot_metrics(rows, x_key="dropout_rate", metrics=FITTED[:2], out_dir=out_dir,
                          name="dropout.png", log_x=False,
                          title=f"cost vs dropout rate (n={settings.dropout_n}, "
                                f"m={settings.dropout_m}, stage {settings.dropout_stage})")
    summary = {}
    for label in dict.fromkeys(r["aggregator"] for r in rows):
        mine = sorted((r["dropout_rate"], r["server_s"]) for r in rows if r["aggregator"] == label)
        if len(mine) > 1 and mine[0][1] > 0:
            summary[f"{label} server s, max rate / no dropout"] = mine[-1][1] / mine[0][1]
    title = f"Dropout rate (n={settings.dropout_n}, m={settings.dropout_m})"
    return SectionResult("dropout", title, summary, rows, {}, [figure], notes,
                         time.perf_counter() - start)


class _RoundClock:
    """A progress sink for run_simulation that stamps wall and CPU time as each round ends."""

    ROUNDS_TASK = "CoDream rounds"

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.stamps: list[tuple[float, float]] = []

    def task(self, name: str, total: int) -> int:
        self.names[len(self.names) + 1] = name
        return len(self.names)

    def advance(self, task_id: int, amount: int = 1) -> None:
        if self.names.get(task_id) == self.ROUNDS_TASK:  # amount 0: the rounds start
            self.stamps.append((time.perf_counter(), time.process_time()))

    def done(self, task_id: int) -> None:
        pass

    def log(self, message: str) -> None:
        pass


def _round_samples(label: str, report: dict, clock: _RoundClock) -> list[dict[str, Any]]:
    """One sample per CoDream round: wall and CPU from the clock, phases and bytes from report."""
    records = report["rounds"][1:]  # round 0 is the local warm-up
    stamped = len(clock.stamps) == len(records) + 1
    samples = []
    for i, record in enumerate(records):
        phases = record["seconds"]
        wall = clock.stamps[i + 1][0] - clock.stamps[i][0] if stamped else sum(phases.values())
        cpu = clock.stamps[i + 1][1] - clock.stamps[i][1] if stamped else None
        samples.append({"variant": label, "round": record["round"], "wall_s": wall,
                        "cpu_s": cpu, **{f"{k}_s": v for k, v in phases.items()},
                        "bytes_up": statistics.mean(record["bytes_up"]),
                        "bytes_down": statistics.mean(record["bytes_down"])})
    return samples


def codream_section(settings: OverheadSettings, out_dir: Path, progress: Any = None
                    ) -> SectionResult:
    """Small CoDream federations, one per variant (plain, secagg, ...), in the same process.

    Runs go A B C, then C B A, ... after an untimed warm-up run, so drift of the shared
    machine cancels to first order; CPU seconds are this process's, which other jobs barely move.
    """
    from codream_secure.audit.overhead.versus_flower import session_step_ms
    from codream_secure.config import SimulationConfig
    from codream_secure.errors import ConfigError
    from codream_secure.simulation import run_simulation

    start = time.perf_counter()
    base = {**dict(settings.codream), "baselines": (), "seed": settings.seed}
    configs, notes = {}, []
    for label, overrides in settings.codream_variants:
        try:
            configs[label] = {**base, **dict(overrides)}
            SimulationConfig.from_keys(**configs[label])
        except (TypeError, ConfigError) as error:  # a field this build does not have yet
            configs.pop(label)
            notes.append(f"CoDream variant {label!r} skipped: {error}")
    labels, order = list(configs), []
    for rep in range(settings.codream_repeats):
        order += labels if rep % 2 == 0 else labels[::-1]
    samples: list[dict[str, Any]] = []
    extra: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = {**base, "rounds": 1, "dream_steps": 1, "warmup_epochs": 0}
        run_simulation(SimulationConfig.from_keys(**warm, aggregator="plain", out=f"{tmp}/warm"))
        for i, label in enumerate(order):
            clock = _RoundClock()
            try:
                config = SimulationConfig.from_keys(**configs[label], out=f"{tmp}/{i}")
                report = run_simulation(config, progress=clock).report
            except ValueError as error:  # ProtocolError and friends: record, go on
                notes.append(f"CoDream variant {label!r} failed: {error}")
                continue
            samples += _round_samples(label, report, clock)
            extra[label] = {"max_abs_error_vs_plain":
                            report["aggregator"]["measured"]["max_abs_error_vs_plain"],
                            "final_mean_accuracy": report["final"]["codream"]["mean_accuracy"]}
            _log(progress, f"codream: {label} run {i + 1}/{len(order)} done")
    rows = [_codream_row(label, [s for s in samples if s["variant"] == label], extra[label])
            for label in configs if label in extra]
    plain = next((r for r in rows if r["variant"] == "plain"), None)
    for row in rows:
        for metric in ("wall_s", "cpu_s", "aggregation_s", "bytes_up", "bytes_down"):
            ok = plain and plain[metric] and row[metric] is not None
            row[f"{metric}_vs_plain"] = row[metric] / plain[metric] if ok else None
    steps = [session_step_ms(base["clients"], m, steps=settings.session_steps)
             for m in settings.session_step_m]
    summary = {f"{r['variant']} {k}": r[k] for r in rows if r["variant"] != "plain"
               for k in ("wall_s_vs_plain", "cpu_s_vs_plain", "bytes_up_vs_plain")}
    notes += ["medians over all measured rounds of every run; wall_s/cpu_s: one round from end "
              "to end (local training, dreams, aggregation, distillation, evaluation, "
              "checkpoint); bytes per client per round, the dream broadcast included",
              "session_step: secure per-step cost inside one session (setup excluded) vs a "
              "plain numpy float sum of the same vectors"]
    return SectionResult("codream_round", "One CoDream round, secure vs plain", summary, rows,
                         {"rounds": samples, "session_step": steps}, [], notes,
                         time.perf_counter() - start)


def _codream_row(label: str, samples: list[dict[str, Any]], extra: dict[str, Any]
                 ) -> dict[str, Any]:
    """Medians over rounds of each phase's seconds and of the bytes per client."""
    keys = ("wall_s", "cpu_s", "local_s", "dreams_s", "aggregation_s", "distill_s",
            "bytes_up", "bytes_down")
    row = {"variant": label, "rounds_measured": len(samples)}
    for key in keys:
        values = [s[key] for s in samples if s.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    return row | extra


def run_overhead(settings: OverheadSettings, out_dir: str | Path, progress: Any = None) -> Path:
    """Run every section and write the report folder; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, notes = aggregator_table(
        settings.aggregators, dp_variants=settings.dp_variants,
        dp_noise_multiplier=settings.dp_noise_multiplier, dp_l2_clip=settings.dp_l2_clip,
        flower=settings.flower, flower_caps=settings.flower_caps,
        paillier_caps=settings.paillier_caps)
    _log(progress, "overhead: aggregators " + ", ".join(a.name for a in table))
    warm_up(table, clip=settings.clip, seed=settings.seed)
    sections = [scaling_section(settings, out, table, "n", progress),
                scaling_section(settings, out, table, "m", progress),
                dropout_section(settings, out, table, progress)]
    sections[0].notes[:0] = notes
    if settings.codream_variants:
        sections.append(codream_section(settings, out, progress))
    config = {**dataclasses.asdict(settings), "codream": dict(settings.codream),
              "aggregators_run": [a.name for a in table]}
    return write_report(out, benchmark="overhead", config=config,
                        seeds={"inputs": settings.seed, "dropouts": settings.seed,
                               "codream": settings.seed}, sections=sections)


class _Printer:
    def log(self, message: str) -> None:
        print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: pick a settings preset and an output folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", choices=sorted(SETTINGS), default="default")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-overhead"))
    parser.add_argument("--no-flower", action="store_true", help="skip Flower's SecAgg+ rows")
    args = parser.parse_args(argv)
    settings = SETTINGS[args.settings]
    if args.no_flower:
        settings = dataclasses.replace(settings, flower=False)
    start = time.perf_counter()
    out = run_overhead(settings, args.out, _Printer())
    print(f"report: {out / 'report.md'} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
