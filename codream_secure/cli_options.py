"""`simulate`'s flags: the keys a run usually sets, grouped by config section; every other key
lives in the --config file, and its old flag fails with the key that replaces it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

import click
import rich_click

from codream_secure.config import (
    DEVICES,
    DP_UNITS,
    DREAM_MODES,
    KEY_SECTION,
    MODEL_CHOICES,
    PRECISIONS,
    SECTIONS,
)
from codream_secure.data import DATASET_NAMES, PARTITION_SCHEMES
from protocols import registry
from protocols.secagg.messages import THREAT_MODELS


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


# config key -> (click type, help); the default is appended from the section's dataclass
FLAGS: dict[str, tuple[Any, str]] = {
    "dataset": (click.Choice(DATASET_NAMES), "Dataset to federate. 'digits' is embedded "
                "(8x8 scikit-learn digits); fashion-mnist reads the Debian package or --data-dir; "
                "mnist, cifar10, cifar100 and npz need --data-dir."),
    "data_dir": (click.Path(exists=True, path_type=str), "Folder with the dataset's files "
                 "(IDX for (fashion-)mnist, python batches for CIFAR), or the .npz file for "
                 "--dataset npz."),
    "clients": (click.INT, "Number of clients K (>= 2). Each keeps a private data shard and its "
                "own model, and contributes to every secure sum."),
    "partition": (click.Choice(PARTITION_SCHEMES), "How training data is split among clients: "
                  "iid, Dirichlet label skew (sizes vary), or balanced-Dirichlet (equal sizes)."),
    "alpha": (click.FLOAT, "Dirichlet concentration (> 0): small values give each client few "
              "classes, large values approach iid."),
    "models": (CommaList(click.Choice(MODEL_CHOICES), "NAME[,NAME...]"),
               "Client architectures, comma-separated; client k gets name number k mod the list "
               "length, so one name gives a homogeneous federation. CoDream never shares weights, "
               f"so these may all differ. Names: {', '.join(MODEL_CHOICES)}."),
    "rounds": (click.INT, "CoDream rounds: each trains locally, synthesises a dream batch "
               "together, aggregates soft labels and distils."),
    "dream_steps": (click.INT, "Optimisation steps on each dream batch; every step is one secure "
                    "sum of the clients' dream gradients."),
    "dream_mode": (click.Choice(DREAM_MODES), "How dreams are made: 'pixel' optimises the "
                   "dream pixels (one secure sum per step), 'generator' (CoDream-fast) has "
                   "clients adapt a shared generator and its latent codes (one secure sum per "
                   "dream batch). See docs/dream-modes.md."),
    "aggregator": (click.Choice(registry.names()), "How cross-client sums are computed: 'plain' "
                   "(server sees each vector, the insecure baseline), 'secagg' (pairwise masks, "
                   "complete graph), 'secagg+' (masks over a sparse neighbour graph) or "
                   "'paillier' (packed Paillier: a separate key holder decrypts only the sum; "
                   "slow, see docs/paillier.md)."),
    "threat_model": (click.Choice(THREAT_MODELS), "What a secagg/secagg+ server is trusted to "
                     "do: 'active' adds a consistency round so that a server lying about who "
                     "dropped still needs t colluding clients to unmask an input; "
                     "'semi-honest' skips it and is safe only if the server follows the "
                     "protocol (docs/protocol.md)."),
    "dropout_rate": (click.FLOAT, "Chance in [0, 1) that a client drops out of a round's "
                     "aggregation; secure aggregation must still finish with the survivors."),
    "dp": (click.Choice(DP_UNITS), "Differential privacy: 'client' protects each client's whole "
           "contribution (every dream-gradient and soft-label sum is a release), 'sample' "
           "protects each training example (DP-SGD through Opacus). See docs/privacy.md."),
    "dp_epsilon": (click.FLOAT, "Target epsilon for the whole run; the noise multiplier is "
                   "calibrated with Opacus. Give this or --dp-noise."),
    "dp_noise": (click.FLOAT, "Noise multiplier z: each release carries N(0, (z C)^2) per "
                 "coordinate. Give this or --dp-epsilon."),
    "device": (click.Choice(DEVICES), "Where torch computes; 'auto' picks CUDA when available."),
    "precision": (click.Choice(PRECISIONS), "fp32 (exact) or bf16 (autocast; on CUDA also "
                  "compiled, see docs/gpu.md). Secure sums are unaffected: gradients are summed "
                  "in fp32."),
    "seed": (click.INT, "Seed of partitions, model initialisation, dreams and dropouts, in "
             "[0, 2^32 - 1]. Masks never derive from it: they come from fresh cryptographic "
             "keys."),
    "out": (click.Path(file_okay=False, path_type=str), "Output folder for report.json, "
            "report.md, the plots, dreams.npz and resume checkpoints."),
}
# (panel title, flags): one panel per config section, the run's own switches last
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Data [data]", ("--dataset", "--data-dir", "--clients", "--partition", "--alpha")),
    ("Models [models]", ("--models",)),
    ("CoDream [codream]", ("--rounds", "--dream-steps", "--dream-mode")),
    ("Aggregation [aggregation]", ("--aggregator", "--threat-model", "--dropout-rate")),
    ("Privacy [privacy]", ("--dp", "--dp-epsilon", "--dp-noise")),
    ("Device [device]", ("--device", "--precision")),
    ("Run [run]", ("--seed", "--out", "--config", "--resume", "--quiet", "--help")),
)
DEFAULTS: dict[str, Any] = {f.name: f.default for cls in SECTIONS.values() for f in fields(cls)}
# keys that had a flag before the config was sectioned: the flag now names the key
MOVED: tuple[str, ...] = tuple(key for key in KEY_SECTION if key not in FLAGS)


def flag(key: str) -> str:
    """The command-line spelling of a config key: dream_steps -> --dream-steps."""
    return "--" + key.replace("_", "-")


def _default_text(key: str) -> str:
    value = DEFAULTS[key]
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _moved_flag(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value is not None:
        key = str(param.name)
        raise click.ClickException(
            f"{flag(key)} is no longer a flag: set `[{KEY_SECTION[key]}] {key}` in a --config "
            "TOML file (docs/configuration.md lists every key)")


def simulate_options(command: Callable) -> Callable:
    """One flag per key of FLAGS (unset flags stay None, so the file's values apply), a hidden
    flag per moved key that fails naming its table."""
    for key in reversed(MOVED):
        command = click.option(flag(key), key, hidden=True, expose_value=False, default=None,
                               callback=_moved_flag)(command)
    for key in reversed(FLAGS):
        kind, text = FLAGS[key]
        command = click.option(flag(key), key, type=kind, default=None,
                               help=f"{text} [default: {_default_text(key)}]")(command)
    return command


def option_panels() -> list[rich_click.RichOptionPanel]:
    """`simulate --help`'s panels, one per config section (rich-click)."""
    return [rich_click.RichOptionPanel(title, options=list(options)) for title, options in PANELS]
