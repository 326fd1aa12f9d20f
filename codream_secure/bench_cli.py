"""`codream-secure bench ...`: the privacy-audit benchmarks, each writing one report folder."""

from __future__ import annotations

from pathlib import Path

import click

from codream_secure.errors import os_reason

SETTINGS = ("tiny", "default", "full")
_SETTINGS_HELP = ("Size of the run: 'default' finishes in about 3-4 minutes on 2 CPU cores, "
                  "'tiny' in seconds (a smoke test), 'full' {full}.")
LEAKAGE_SETTINGS_HELP = _SETTINGS_HELP.format(full="in about an hour (docs/leakage.md)")
OVERHEAD_SETTINGS_HELP = _SETTINGS_HELP.format(full="in about 45 minutes (docs/overhead.md)")


def _make_out(out: Path) -> None:
    """Create the report folder before a long benchmark, not after it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise click.FileError(str(out), hint=os_reason(error)) from None


def _report(out: Path) -> None:
    click.echo(f"Report: {out / 'report.md'} (raw numbers in report.json and *.csv)")


@click.group("bench")
def bench() -> None:
    """Privacy-audit benchmarks: what an attacker learns, and what security costs.

    Each command writes a report folder: report.json (config, seeds, versions, git revision,
    machine), report.md, PNG plots and CSVs of the raw arrays. docs/leakage.md and
    docs/overhead.md explain how to read them.

    \b
    Examples:
      codream-secure bench leakage --out runs/leakage
      codream-secure bench leakage --settings tiny --sections server-view
      codream-secure bench overhead --out runs/overhead
    """


@bench.command("leakage")
@click.option("--settings", "setting", type=click.Choice(SETTINGS), default="default",
              show_default=True, help=LEAKAGE_SETTINGS_HELP)
@click.option("--sections", default=None, metavar="NAME,...",
              help="Comma-separated subset of: dreams (dreams vs private data), reconstruction "
                   "(what the server rebuilds from its view), membership (membership inference "
                   "on the final models), server-view (masked uploads and colluders). "
                   "[default: all]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("runs/bench-leakage"), show_default=True, help="Report folder.")
def leakage(setting: str, sections: str | None, out: Path) -> None:
    """Measure what an attacker learns from a CoDream run, against held-out baselines."""
    from codream_secure.audit.leakage.run import checked_sections, run_leakage
    from codream_secure.progress import RichProgress

    names = checked_sections(
        [s.strip() for s in sections.split(",") if s.strip()] if sections else None)
    _make_out(out)  # after the checks: a mistyped section leaves no empty folder behind
    with RichProgress() as progress:
        path = run_leakage(out, setting=setting, sections=names, progress=progress)
    _report(path)


@bench.command("overhead")
@click.option("--settings", "setting", type=click.Choice(SETTINGS), default="default",
              show_default=True, help=OVERHEAD_SETTINGS_HELP)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("runs/bench-overhead"), show_default=True, help="Report folder.")
def overhead(setting: str, out: Path) -> None:
    """Cost of every aggregator (with and without DP) across n, m and dropout, vs Flower."""
    _make_out(out)
    from codream_secure.audit.overhead import suite
    from codream_secure.progress import RichProgress

    with RichProgress() as progress:
        path = suite.run_overhead(getattr(suite, setting.upper()), out, progress=progress)
    _report(path)
