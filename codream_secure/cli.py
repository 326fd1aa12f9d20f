"""The `codream-secure` command line: parse, validate, call the library, print a summary."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import rich_click

from codream_secure import __version__
from codream_secure.bench_cli import bench
from codream_secure.cli_options import option_panels, simulate_options
from codream_secure.config import build_config, load_config
from codream_secure.errors import CoDreamError
from codream_secure.out_folder import check_output_folder
from protocols.errors import ProtocolError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class CoDreamGroup(click.Group):
    """A click group whose bad-input errors are one `Error:` line and exit status 2."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError" and error.ctx:  # click >= 8.2
                click.echo(error.ctx.get_help())  # a bare command: its help, as in click < 8.2
                sys.exit(0)
            hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
            _fail(error.format_message() + hint)
        except click.ClickException as error:
            _fail(error.format_message())
        except (CoDreamError, ProtocolError) as error:
            _fail(str(error))
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (MemoryError, RuntimeError) as error:
            if not _out_of_memory(error):
                raise
            lines = str(error).split("DefaultCPUAllocator: ")[-1].splitlines()
            _fail(f"out of memory ({lines[0] if lines else type(error).__name__}); lower "
                  "[codream] dream_batch, buffer_size or batch_size, or [data] max_train")
        sys.exit(code if isinstance(code, int) else 0)


def _out_of_memory(error: BaseException) -> bool:
    """Whether torch or Python ran out of host or device memory (torch raises RuntimeError)."""
    text = str(error)
    return isinstance(error, MemoryError) or "can't allocate memory" in text or (
        "out of memory" in text)


def _fail(message: str) -> None:
    click.echo("Error: " + " ".join(message.split()), err=True)
    sys.exit(EXIT_BAD_INPUT)


@click.group("codream-secure", cls=CoDreamGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="codream-secure")
def main() -> None:
    """CoDream under real secure aggregation.

    Clients with different model architectures learn together without sharing weights: they
    jointly optimise random inputs ("dreams") and distil knowledge from them. Every sum that
    crosses client boundaries (dream gradients, soft labels) runs through a secure aggregation
    protocol, so the server learns only totals.

    \b
    Quick start:
      codream-secure simulate --rounds 3 --out runs/quick
      codream-secure report runs/quick
    """


@main.command(cls=rich_click.RichCommand, panels=option_panels(),
              context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML file with [data], [models], [codream], [aggregation], [privacy], "
                   "[device] and [run] tables (e.g. [codream] dream_steps = 50), or a "
                   "report.json to repeat its run; flags given here override it. Every key: "
                   "docs/configuration.md.")
@click.option("--resume", is_flag=True,
              help="Continue a killed run from the checkpoints in --out instead of starting over.")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress or summary table; print only the path of report.json.")
@simulate_options
def simulate(config_file: str | None, resume: bool, quiet: bool, **overrides: Any) -> None:
    """Run one CoDream simulation, with baselines, and write its report.

    The data set is split among --clients clients (--partition, --alpha), each with its own
    model (--models). After a warm-up of local training, every round the server draws a batch
    of random dreams and runs --dream-steps steps, each summing the clients' dream gradients
    with --aggregator (--dream-mode generator optimises a shared generator instead); the
    clients' soft labels on the final dreams are summed the same way; the clients distil from
    the dream buffer and train on their own data; everyone is evaluated. Baselines run on the
    same split.

    [codream] round_order sets how distillation and local training share a round: local
    training, then distillation (distill-last, the default); distillation, then local training
    (local-last); or both in every step (joint, which did best on Fashion-MNIST with label
    skew). docs/learning-quality.md compares them.

    The flags below are the keys a run usually changes. Every other key (learning rates,
    clips, ring size, DP accounting, CUDA graphs, masking placement, threads, baselines...) is
    set in the --config file, in the table named after each panel; docs/configuration.md lists
    them all, with their defaults.

    \b
    Writes into --out once the config, the data, the models and any --resume
    checkpoint have passed every check (a refused run leaves --out as it was):
      report.json   every number of the run (schema: docs/report-schema.md)
      report.md     human summary: config, accuracy, aggregator error, per round
      accuracy.png  test accuracy per round, CoDream vs baselines
      dreams.png    the final dreams as images (dreams.npz holds the raw tensors)

    \b
    Examples:
      codream-secure simulate --clients 6 --models smallcnn,resnet8 --alpha 0.5
      codream-secure simulate --config paper.toml --aggregator secagg+
      codream-secure simulate --config runs/latest/report.json --out runs/again
    """
    config = build_config(load_config(config_file) if config_file else {}, overrides)
    check_output_folder(Path(config.run.out))  # reads only: a run writes once it is prepared
    from codream_secure.progress import NullProgress, RichProgress
    from codream_secure.report import write_report
    from codream_secure.simulation import run_simulation  # lazy: torch loads only for a run

    if quiet:
        outcome = run_simulation(config, progress=NullProgress(), resume=resume)
    else:
        with RichProgress() as progress:
            outcome = run_simulation(config, progress=progress, resume=resume)
    paths = write_report(outcome, Path(config.run.out))
    if quiet:
        click.echo(str(paths["json"]))
    else:
        _print_summary(outcome.report, Path(config.run.out), paths)


@main.command("deploy-local", cls=rich_click.RichCommand, panels=option_panels(),
              context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML file with simulate's tables; flags given here override it.")
@click.option("--supernodes", type=click.IntRange(min=2),
              help="SuperNodes to start, one per client (sets [data] clients; default: its "
                   "value).")
@click.option("--deadline-protocol", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True,
              help="Seconds the server waits for replies to a secure-aggregation stage "
                   "(including a client's generator update); a SuperNode that misses it drops "
                   "out. Keep it well under Flower's heartbeat window (about 60 s).")
@click.option("--deadline-work", type=click.FloatRange(min=0, min_open=True), default=600.0,
              show_default=True,
              help="Seconds the server waits for local training, distillation and evaluation.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True),
              default=3600.0, show_default=True, help="Seconds the whole run may take.")
@click.option("--simulation-runtime", is_flag=True,
              help="Run the SuperNodes in Flower's simulation runtime (one Ray instance inside "
                   "the SuperLink) instead of one process each; needs flwr[simulation].")
@simulate_options
def deploy_local(config_file: str | None, supernodes: int | None, deadline_protocol: float,
                 deadline_work: float, timeout_s: float, simulation_runtime: bool,
                 **overrides: Any) -> None:
    """Run CoDream-fast on a Flower deployment on this machine and write its report.

    Starts a Flower SuperLink and one SuperNode per client on loopback (free ports, a private
    FLWR_HOME, nothing downloaded), runs the project's ServerApp and ClientApp on them, writes
    simulate's report folder into --out (CoDream only: baselines need every client's data in
    one place) and stops every process it started, also on Ctrl-C or failure. Each SuperNode
    loads only its own partition. Needs the `flower` extra: pip install -e ".[flower]".

    Dreams come from a shared generator (dream_mode "generator", the default here): a few
    round trips per dream batch, where pixel mode would need one per dream step. A SuperNode
    that dies or misses a deadline drops out; the protocol recovers its masks and the run
    goes on with the survivors. The same config and seed give simulate's rounds. To run on
    several machines, see docs/flower.md.

    \b
    Examples:
      codream-secure deploy-local --supernodes 3 --rounds 2 --out runs/flower
      codream-secure deploy-local --config run.toml --aggregator secagg+ --out runs/flower
    """
    file_values = load_config(config_file) if config_file else {}
    if "dream_mode" not in file_values.get("codream", {}) and overrides.get("dream_mode") is None:
        overrides["dream_mode"] = "generator"
    if "baselines" not in file_values.get("run", {}):
        overrides["baselines"] = ()
    if supernodes is not None:
        if overrides.get("clients") not in (None, supernodes):
            raise click.UsageError(f"--supernodes {supernodes} and --clients "
                                   f"{overrides['clients']} disagree: one SuperNode serves "
                                   "one client")
        overrides["clients"] = supernodes
    config = build_config(file_values, overrides)
    from codream_secure.flower.local_run import deploy_local as run_deployment
    from codream_secure.flower.server_role import Deadlines

    out = run_deployment(config, deadlines=Deadlines(deadline_protocol, deadline_work),
                         timeout_s=timeout_s, echo=click.echo,
                         simulation=simulation_runtime)
    from codream_secure.report import load_report

    _print_summary(load_report(out), out, {p.name: p for p in sorted(out.glob("*.*"))})


@main.command("report")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report_command(out_dir: Path) -> None:
    """Re-render report.md and the plots of a finished run from OUT_DIR/report.json.

    Useful for auditors: report.json is the record; report.md and accuracy.png are rebuilt
    from it alone, dreams.png only if OUT_DIR/dreams.npz is present.
    """
    from codream_secure.report import load_report, render_from_json

    paths = render_from_json(out_dir)
    _print_summary(load_report(out_dir), out_dir, paths)


def _print_summary(report: dict, out_dir: Path, paths: dict[str, Path]) -> None:
    """Final table (method | mean | per client), then aggregator error, folder and run time."""
    from rich.console import Console
    from rich.table import Table

    from codream_secure.report import ordered_methods, pct

    table = Table(title="Final test accuracy (%)",
                  caption="each client at its best-validation round")
    table.add_column("method")
    table.add_column("mean accuracy", justify="right")
    table.add_column("per-client accuracy", overflow="fold")
    for method in ordered_methods(report["final"]):
        res = report["final"][method]
        table.add_row(method, pct(res.get("mean_accuracy")),
                      " / ".join(pct(a) for a in res.get("per_client_accuracy") or []))
    console = Console(highlight=False)
    console.print(table)
    agg = report.get("aggregator") or {}
    measured = agg.get("measured") or {}
    error = measured.get("max_abs_error_vs_plain")
    detail = ("no secure-vs-plain comparison recorded" if error is None else
              f"max |secure - plain| = {error:.3g}, mean = "
              f"{measured.get('mean_abs_error_vs_plain') or 0:.3g} over "
              f"{measured.get('steps_compared')} sums")
    if measured.get("clipped_values"):
        detail += f"; {measured['clipped_values']} values clipped before encoding"
    console.print(f"Aggregator: {agg.get('name')} ({detail})", markup=False)
    files = ", ".join(sorted(p.name for p in paths.values()))
    console.print(f"Output: {out_dir} ({files})", markup=False)
    seconds = (report.get("timing") or {}).get("total_seconds")
    if seconds is not None:
        console.print(f"Run time: {seconds:.1f} s", markup=False)


main.add_command(bench)

if __name__ == "__main__":
    main()
