"""The `codream-secure` command line: parse, validate, call the library, print a summary."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from codream_secure import __version__
from codream_secure.bench_cli import bench
from codream_secure.config import (
    BASELINES,
    DEFAULTS,
    DEVICES,
    DP_ACCOUNTANTS,
    DP_MODES,
    DP_NOISE_KINDS,
    DP_UNITS,
    DREAM_GRAPHS,
    FIELD_NAMES,
    MASKINGS,
    MODEL_CHOICES,
    PRECISIONS,
    SOFT_LABELS,
    TRAIN_CUDA_GRAPHS,
    build_config,
    load_config,
)
from codream_secure.data import DATASET_NAMES, PARTITION_SCHEMES
from codream_secure.errors import CoDreamError, os_reason
from protocols.api import PROTOCOLS
from protocols.errors import ProtocolError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class CommaList(click.ParamType):
    """'a,b,c' -> ('a', 'b', 'c'), each item checked by `item`; 'none' or '' -> ()."""

    def __init__(self, item: click.ParamType, metavar: str) -> None:
        self.item, self.name = item, metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return self.name

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple:
        if isinstance(value, tuple):
            return value
        parts = [p.strip() for p in str(value).split(",")]
        if [p.lower() for p in parts] in (["none"], [""]):
            return ()
        if "" in parts:
            self.fail(f"empty item in {value!r}", param, ctx)
        return tuple(self.item.convert(p, param, ctx) for p in parts)


def _names(values: tuple[str, ...]) -> str:
    return ", ".join(values)


# One entry per SimulationConfig field: (click type, help). The default is appended from config.
OPTIONS: dict[str, tuple[Any, str]] = {
    "dataset": (click.Choice(DATASET_NAMES), "Dataset to federate. 'digits' is embedded "
                "(8x8 scikit-learn digits); fashion-mnist reads the Debian package or --data-dir; "
                "mnist, cifar10, cifar100 and npz need --data-dir."),
    "data_dir": (click.Path(exists=True, path_type=str), "Folder with the dataset's files "
                 "(IDX for (fashion-)mnist, python batches for CIFAR), or the .npz file for "
                 "--dataset npz."),
    "data_mean": (CommaList(click.FLOAT, "X[,X...]"), "Per-channel mean to normalise inputs "
                  "with (with --data-std); default: fixed public constants per dataset, never "
                  "statistics of the clients' data (docs/privacy.md)."),
    "data_std": (CommaList(click.FLOAT, "X[,X...]"), "Per-channel standard deviation, with "
                 "--data-mean."),
    "max_train": (click.INT, "Keep a stratified sample of at most N training images, "
                  "for quick-look runs."),
    "max_test": (click.INT, "Keep a stratified sample of at most N test images."),
    "clients": (click.INT, "Number of clients K (>= 2). Each keeps a private data shard and its "
                "own model, and contributes to every secure sum."),
    "models": (CommaList(click.Choice(MODEL_CHOICES), "NAME[,NAME...]"),
               "Client architectures, comma-separated; client k gets name number k mod the list "
               "length, so one name gives a homogeneous federation. CoDream never shares weights, "
               f"so these may all differ. Names: {_names(MODEL_CHOICES)}."),
    "server_model": (click.Choice(MODEL_CHOICES), "Architecture of the server's own model: it "
                     "learns only from dreams and aggregated soft labels, and drives adaptive "
                     "teaching (see --adaptive-after)."),
    "partition": (click.Choice(PARTITION_SCHEMES), "How training data is split among clients: "
                  "iid, Dirichlet label skew (sizes vary), or balanced-Dirichlet (equal sizes)."),
    "alpha": (click.FLOAT, "Dirichlet concentration (> 0): small values (0.1) give each client "
              "few classes, large values (100) approach iid."),
    "val_fraction": (click.FLOAT, "Share of the training data held out (stratified, before "
                     "partitioning) as the validation set, in (0, 1). Validation picks each "
                     "client's reported round; test never does."),
    "rounds": (click.INT, "CoDream rounds: each trains locally, synthesises a dream batch "
               "together, aggregates soft labels and distils."),
    "warmup_epochs": (click.INT, "Local epochs before round 1, so client models have "
                      "BatchNorm statistics worth dreaming from (0 = none)."),
    "local_epochs": (click.INT, "Local training epochs on private data in each round (0 = none)."),
    "dream_batch": (click.INT, "Dreams synthesised per round (random inputs x ~ N(0, 1) that all "
                    "clients jointly optimise)."),
    "dream_steps": (click.INT, "Optimisation steps on each dream batch; every step is one secure "
                    "sum of the clients' dream gradients."),
    "dream_lr": (click.FLOAT, "Learning rate of the server's optimiser on the dreams."),
    "distill_epochs": (click.INT, "Knowledge-distillation epochs on the dream buffer per round."),
    "distill_lr": (click.FLOAT, "Learning rate of knowledge distillation."),
    "kd_temperature": (click.FLOAT, "Distillation temperature T (KL loss scaled by T^2)."),
    "local_lr": (click.FLOAT, "Learning rate of local training on private data."),
    "batch_size": (click.INT, "Mini-batch size for local training and distillation."),
    "buffer_size": (click.INT, "Dreams kept (FIFO, with their soft labels) for distillation; at "
                    "least --dream-batch. Older dreams keep being rehearsed."),
    "soft_labels": (click.Choice(SOFT_LABELS), "What clients send on the final dreams: "
                    "softmax probabilities or raw logits (summed securely, then averaged)."),
    "adaptive_after": (click.INT, "Rounds after which adaptive teaching starts: the dream "
                       "objective also pushes dreams to where the server model is unsure."),
    "adaptive_weight": (click.FLOAT, "Weight of the adaptive-teaching term (0 disables it)."),
    "aggregator": (click.Choice(PROTOCOLS), "How cross-client sums are computed: 'plain' "
                   "(server sees each vector, the insecure baseline), 'secagg' (pairwise masks, "
                   "complete graph), 'secagg+' (masks over a sparse neighbour graph) or "
                   "'paillier' (packed Paillier: the server adds ciphertexts, a separate key "
                   "holder decrypts only the sum; seconds per step, see docs/paillier.md)."),
    "paillier_bits": (click.INT, "Paillier modulus size for --aggregator paillier: 3072 "
                      "(128-bit security) or 2048; smaller or odd sizes are refused."),
    "grad_clip": (click.FLOAT, "Each client clips every element of its dream gradient to "
                  "[-c, c] before fixed-point encoding; the secure sum's range is declared from "
                  "it."),
    "label_clip": (click.FLOAT, "Element clip for the soft labels before encoding (probabilities "
                   "already lie in [0, 1])."),
    "ring_bits": (click.INT, "Size k of the ring Z_2^k that masked sums live in (8..64). More "
                  "bits leave more room for fixed-point precision; a ring too small for K clipped "
                  "inputs is refused up front."),
    "dp": (click.Choice(DP_UNITS), "Differential privacy: 'client' protects each client's whole "
           "contribution (every dream-gradient and soft-label sum is a release), 'sample' "
           "protects each training example (DP-SGD local training through Opacus; models use "
           "GroupNorm and the dream loss drops its BatchNorm term). See docs/privacy.md."),
    "dp_mode": (click.Choice(DP_MODES), "Client-level DP: 'distributed' (clients add integer "
                "noise before masking: nobody sees an un-noised sum) or 'central' (the server "
                "noises the sum after unmasking: trusts the server)."),
    "dp_noise": (click.FLOAT, "Noise multiplier z: each release carries N(0, (z C)^2) per "
                 "coordinate. Give this or --dp-epsilon."),
    "dp_epsilon": (click.FLOAT, "Target epsilon for the whole run; z is calibrated with Opacus "
                   "over every release (client) or DP-SGD step (sample)."),
    "dp_delta": (click.FLOAT, "Target delta, below 1/(clients) for client level and below "
                 "1/(client data size) for sample level."),
    "dp_clip": (click.FLOAT, "L2 clip C: of each client's dream-gradient vector (client level) "
                "or of each example's gradient (sample level, Opacus' max_grad_norm)."),
    "dp_label_clip": (click.FLOAT, "L2 clip of each client's soft-label matrix (client level). "
                      "Default sqrt(dream batch), which never clips probabilities."),
    "dp_noise_kind": (click.Choice(DP_NOISE_KINDS), "Integer noise for distributed mode: "
                      "Skellam (RDP accounting) or discrete Gaussian."),
    "dp_accountant": (click.Choice(DP_ACCOUNTANTS), "Opacus accountant: rdp, prv or gdp. PRV "
                      "and GDP model a continuous Gaussian: central mode only (distributed "
                      "integer noise is accounted with RDP)."),
    "dropout_rate": (click.FLOAT, "Chance in [0, 1) that a client drops out of a round's "
                     "aggregation; secure aggregation must still finish with the survivors."),
    "dropout_clients": (CommaList(click.INT, "ID[,ID...]"), "Client ids (0-based) that drop "
                        "out of every round, e.g. 1,3. Enough must remain for the aggregator "
                        "to release a sum: secagg/secagg+ need threshold + 1 survivors (3 of "
                        "the default 4 clients), the others 2."),
    "baselines": (CommaList(click.Choice(BASELINES), "NAME[,NAME...]|none"), "Baselines run "
                  "on the same split for comparison: isolated (local data only), fedavg "
                  "(weight averaging, homogeneous models), centralized (all data pooled)."),
    "device": (click.Choice(DEVICES), "Where torch computes; 'auto' picks CUDA when available."),
    "precision": (click.Choice(PRECISIONS), "fp32 (exact, what the CPU uses) or bf16: autocast "
                  "for dream steps, local training and distillation, and on CUDA also "
                  "channels_last and torch.compile: with CUDA graphs for the dream step, with "
                  "a fused optimiser for local training and distillation (docs/gpu.md). "
                  "Secure sums are unaffected: gradients are summed in fp32. On the default "
                  "digits setup bf16 cost CoDream 1.7 points of accuracy on average over 3 "
                  "seeds."),
    "masking": (click.Choice(MASKINGS), "Where a SecAgg client quantises and masks its dream "
                "gradient: 'host' (numpy, AES-256-CTR masks), 'device' (on the gradient's "
                "device, ChaCha20 masks, bit-identical to a host client using ChaCha20; the "
                "gradient never leaves the GPU unmasked; on CUDA the server also sums and "
                "unmasks the uploads there); 'auto' = device on CUDA with secagg/secagg+, "
                "else host."),
    "train_cuda_graphs": (click.Choice(TRAIN_CUDA_GRAPHS), "'on' replays local training and "
                          "distillation steps as CUDA graphs (needs CUDA and --precision bf16). "
                          "On an H100 a ResNet-18 training step took 4.45 ms with graphs "
                          "against 11.89 ms without; a short simulation with them gained "
                          "nothing over their compile time, so they are opt-in (docs/gpu.md)."),
    "dream_graph": (click.Choice(DREAM_GRAPHS), "How the bf16 dream steps replay on CUDA: "
                    "'per-client' (one CUDA graph per architecture group, launched in turn) or "
                    "'one' (every client's step captured in one CUDA graph, one launch per "
                    "dream step; needs CUDA and --precision bf16). In the device benchmark on "
                    "an H100 one graph took a plain 4-client round from 12.66 to 8.06 ms/step "
                    "in one run and left it as it was in another (7.99 against 7.95); a short "
                    "simulation with it gained nothing over its capture time, so it is opt-in "
                    "(docs/gpu.md)."),
    "seed": (click.INT, "Seed of partitions, model initialisation, dreams and dropouts, in "
             "[0, 2^32 - 1]. Masks never derive from it: they come from fresh cryptographic "
             "keys."),
    "threads": (click.INT, "CPU threads for torch (0 = torch's default), at most the "
                "machine's CPUs."),
    "out": (click.Path(file_okay=False, path_type=str), "Output folder for report.json, "
            "report.md, accuracy.png, dreams.png, dreams.npz and resume checkpoints."),
}


def _default_text(name: str) -> str:
    value = DEFAULTS[name]
    if value is None:
        return {"data_dir": "none", "max_train": "all", "max_test": "all",
                "dp_label_clip": "sqrt(dream batch)"}.get(name, "none")
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def config_options(command: Callable) -> Callable:
    """Add one --kebab-case flag per config field; unset flags stay None so TOML values apply."""
    for name in reversed(FIELD_NAMES):
        kind, text = OPTIONS[name]
        flag = "--" + name.replace("_", "-")
        command = click.option(flag, name, type=kind, default=None,
                               help=f"{text} [default: {_default_text(name)}]")(command)
    return command


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
                  "--dream-batch, --buffer-size, --batch-size or --max-train")
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


@main.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML file of config keys (snake_case, e.g. dream_steps = 50); flags given "
                   "on the command line override it.")
@click.option("--resume", is_flag=True,
              help="Continue a killed run from the checkpoints in --out instead of starting over.")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress or summary table; print only the path of report.json.")
@config_options
def simulate(config_file: str | None, resume: bool, quiet: bool, **overrides: Any) -> None:
    """Run one CoDream simulation, with baselines, and write its report.

    The data set is split among --clients clients (--partition, --alpha), each with its own
    model (--models). After --warmup-epochs of local training, every round: clients train
    locally; the server draws --dream-batch random dreams and runs --dream-steps steps, each
    summing the clients' dream gradients with --aggregator; the clients' soft labels on the
    final dreams are summed the same way; clients and the server model distil from the dream
    buffer; everyone is evaluated. Baselines run on the same split.

    \b
    Writes into --out:
      report.json   every number of the run (schema: docs/report-schema.md)
      report.md     human summary: config, accuracy, aggregator error, per round
      accuracy.png  test accuracy per round, CoDream vs baselines
      dreams.png    the final dreams as images (dreams.npz holds the raw tensors)

    \b
    Examples:
      codream-secure simulate --clients 6 --models smallcnn,resnet8,wrn16_1 --alpha 0.5
      codream-secure simulate --config paper.toml --aggregator secagg+ --dropout-rate 0.1
    """
    config = build_config(load_config(config_file) if config_file else {}, overrides)
    try:  # fail before a long run, not after it, if the output folder cannot be made
        Path(config.out).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise click.FileError(config.out, hint=os_reason(error)) from None
    from codream_secure.progress import NullProgress, RichProgress
    from codream_secure.report import write_report
    from codream_secure.simulation import run_simulation  # lazy: torch loads only for a run

    if quiet:
        outcome = run_simulation(config, progress=NullProgress(), resume=resume)
    else:
        with RichProgress() as progress:
            outcome = run_simulation(config, progress=progress, resume=resume)
    paths = write_report(outcome, Path(config.out))
    if quiet:
        click.echo(str(paths["json"]))
    else:
        _print_summary(outcome.report, Path(config.out), paths)


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
