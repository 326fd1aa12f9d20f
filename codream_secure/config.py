"""One validated simulation config, read from a TOML file and overridden by command-line flags."""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from codream_secure.data import DATASET_NAMES, PARTITION_SCHEMES
from codream_secure.errors import ConfigError
from protocols.api import PROTOCOLS
from protocols.codec import MAX_RING_BITS, MIN_RING_BITS

# Mirrors codream_secure.models.MODEL_NAMES without importing torch, so `--help` stays fast;
# tests/core/test_config.py fails if the two ever differ.
MODEL_CHOICES: tuple[str, ...] = (
    "smallcnn", "resnet8", "resnet20", "resnet18", "vgg11", "wrn16_1", "mobilenet",
)
SOFT_LABELS: tuple[str, ...] = ("probs", "logits")
BASELINES: tuple[str, ...] = ("isolated", "fedavg", "centralized")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
MASKINGS: tuple[str, ...] = ("auto", "host", "device")
TRAIN_CUDA_GRAPHS: tuple[str, ...] = ("off", "on")
DREAM_GRAPHS: tuple[str, ...] = ("per-client", "one")
DP_UNITS: tuple[str, ...] = ("off", "client", "sample")
DP_MODES: tuple[str, ...] = ("central", "distributed")
DP_NOISE_KINDS: tuple[str, ...] = ("skellam", "discrete_gaussian")
DP_ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "gdp")
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class SimulationConfig:
    """Every knob of one CoDream run; constructing it validates it (ConfigError on bad values)."""

    dataset: str = "digits"
    data_dir: str | None = None
    data_mean: tuple[float, ...] = ()  # () = data.public_normalization's constants
    data_std: tuple[float, ...] = ()
    max_train: int | None = None
    max_test: int | None = None
    clients: int = 4
    models: tuple[str, ...] = ("smallcnn", "resnet8", "wrn16_1", "smallcnn")
    server_model: str = "resnet8"
    partition: str = "dirichlet"
    alpha: float = 0.1
    val_fraction: float = 0.1
    rounds: int = 10
    warmup_epochs: int = 10
    local_epochs: int = 2
    dream_batch: int = 64
    dream_steps: int = 100
    dream_lr: float = 0.05
    distill_epochs: int = 5
    distill_lr: float = 0.05
    kd_temperature: float = 20.0
    local_lr: float = 0.05
    batch_size: int = 64
    buffer_size: int = 640
    soft_labels: str = "probs"
    adaptive_after: int = 3
    adaptive_weight: float = 10.0
    aggregator: str = "secagg"
    paillier_bits: int = 3072
    grad_clip: float = 8.0
    label_clip: float = 1.0
    ring_bits: int = 32
    dp: str = "off"
    dp_mode: str = "distributed"
    dp_noise: float | None = None
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    dp_label_clip: float | None = None
    dp_noise_kind: str = "skellam"
    dp_accountant: str = "rdp"
    dropout_rate: float = 0.0
    dropout_clients: tuple[int, ...] = ()
    baselines: tuple[str, ...] = ("isolated", "fedavg", "centralized")
    device: str = "auto"
    precision: str = "fp32"
    masking: str = "auto"
    train_cuda_graphs: str = "off"
    dream_graph: str = "per-client"
    seed: int = 0
    threads: int = 0
    out: str = "runs/latest"

    def __post_init__(self) -> None:
        for name, value in _normalised(self).items():
            object.__setattr__(self, name, value)
        self.validate()

    @property
    def client_models(self) -> tuple[str, ...]:
        """Client k's architecture: `models` cycled (or cut) to `clients` entries."""
        return tuple(self.models[k % len(self.models)] for k in range(self.clients))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists) for report.json."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field, its value and what is allowed."""
        _choice("dataset", self.dataset, DATASET_NAMES)
        for name in ("data_dir", "out"):
            value = getattr(self, name)
            if name == "data_dir" and value is None:
                continue
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{name}: expected a non-empty path, got {value!r}")
        if self.data_dir is not None:
            if self.dataset == "digits":
                raise ConfigError("data_dir: digits is embedded and takes no data_dir; "
                                  f"got {self.data_dir!r}")
            if not Path(self.data_dir).expanduser().exists():
                raise ConfigError(f"data_dir: {self.data_dir!r} does not exist")
        for name in ("max_train", "max_test"):
            if getattr(self, name) is not None:
                _count(name, getattr(self, name), minimum=1)
        _count("clients", self.clients, minimum=2)
        if not self.models:
            raise ConfigError(f"models: need at least one name from {', '.join(MODEL_CHOICES)}")
        for model in self.models:
            _choice("models", model, MODEL_CHOICES)
        _choice("server_model", self.server_model, MODEL_CHOICES)
        _choice("partition", self.partition, PARTITION_SCHEMES)
        _real("alpha", self.alpha, low=0.0)
        _real("val_fraction", self.val_fraction, low=0.0, high=1.0)
        for name in ("rounds", "dream_batch", "dream_steps", "distill_epochs", "batch_size",
                     "buffer_size"):
            _count(name, getattr(self, name), minimum=1)
        for name in ("warmup_epochs", "local_epochs", "adaptive_after"):
            _count(name, getattr(self, name), minimum=0)
        # torch takes seeds below 2^63, and baselines seed client k's generator seed * 1000 + k
        _count("seed", self.seed, minimum=0, maximum=MAX_SEED)
        # thousands of threads hang or crash torch's and OpenBLAS's thread pools
        _count("threads", self.threads, minimum=0, maximum=max_threads())
        for name in ("dream_lr", "distill_lr", "local_lr", "kd_temperature", "grad_clip",
                     "label_clip"):
            _real(name, getattr(self, name), low=0.0)
        _real("adaptive_weight", self.adaptive_weight, low=0.0, closed_low=True)
        if self.buffer_size < self.dream_batch:
            raise ConfigError(f"buffer_size: {self.buffer_size} cannot hold one dream batch "
                              f"(dream_batch={self.dream_batch}); use at least {self.dream_batch}")
        _choice("soft_labels", self.soft_labels, SOFT_LABELS)
        _choice("aggregator", self.aggregator, PROTOCOLS)
        _count("paillier_bits", self.paillier_bits, minimum=2048)
        if self.paillier_bits % 2:  # phe draws two primes of half the size: it never halts
            raise ConfigError(f"paillier_bits: must be even (2048 or 3072 are usual), got "
                              f"{self.paillier_bits}")
        _count("ring_bits", self.ring_bits, minimum=MIN_RING_BITS, maximum=MAX_RING_BITS)
        self._validate_dp()
        _real("dropout_rate", self.dropout_rate, low=0.0, high=1.0, closed_low=True)
        self._validate_dropout_clients()
        self._validate_normalization()
        for name in self.baselines:
            _choice("baselines", name, BASELINES)
        if len(set(self.baselines)) != len(self.baselines):
            raise ConfigError(f"baselines: names repeat in {list(self.baselines)}")
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("masking", self.masking, MASKINGS)
        if self.masking == "device" and self.aggregator not in ("secagg", "secagg+"):
            raise ConfigError(f"masking: 'device' masks pairwise-mask uploads; aggregator "
                              f"{self.aggregator!r} has none (use --masking auto or host)")
        if self.masking == "device" and self.dp == "client":
            raise ConfigError("masking: 'device' is not built for client-level DP yet (its L2 "
                              "clipping runs on the host); use --masking auto or host")
        if self.device == "cuda" and not _cuda_available():
            raise ConfigError("device: 'cuda' requested but torch sees no CUDA device; "
                              "use --device cpu or auto")
        _choice("train_cuda_graphs", self.train_cuda_graphs, TRAIN_CUDA_GRAPHS)
        if self.train_cuda_graphs == "on":
            self._need_cuda_bf16("train_cuda_graphs: 'on' graphs the compiled bf16 training path")
        _choice("dream_graph", self.dream_graph, DREAM_GRAPHS)
        if self.dream_graph == "one":
            self._need_cuda_bf16("dream_graph: 'one' captures every client's compiled bf16 "
                                 "dream step in one CUDA graph")

    def _need_cuda_bf16(self, what: str) -> None:
        no_cuda = self.device == "cpu" or (self.device == "auto" and not _cuda_available())
        if no_cuda or self.precision != "bf16":
            found = "no CUDA device" if no_cuda else f"precision {self.precision!r}"
            raise ConfigError(f"{what}, which needs CUDA and --precision bf16; got {found}")

    def _validate_dp(self) -> None:
        _choice("dp", self.dp, DP_UNITS)
        _choice("dp_mode", self.dp_mode, DP_MODES)
        _choice("dp_noise_kind", self.dp_noise_kind, DP_NOISE_KINDS)
        _choice("dp_accountant", self.dp_accountant, DP_ACCOUNTANTS)
        for name in ("dp_noise", "dp_epsilon", "dp_label_clip"):
            if getattr(self, name) is not None:
                _real(name, getattr(self, name), low=0.0)
        _real("dp_clip", self.dp_clip, low=0.0)
        _real("dp_delta", self.dp_delta, low=0.0, high=1.0)
        if self.dp == "off":
            if self.dp_noise is not None or self.dp_epsilon is not None:
                raise ConfigError("dp: --dp-noise/--dp-epsilon given but dp is 'off'; add "
                                  "--dp client (or sample)")
            return
        if (self.dp_noise is None) == (self.dp_epsilon is None):
            raise ConfigError(f"dp: {self.dp}-level DP needs exactly one of dp_noise (the noise "
                              "multiplier z) or dp_epsilon (a target, z calibrated from it)")
        if self.dp == "client" and self.dp_mode == "distributed" and self.dp_accountant != "rdp":
            raise ConfigError(f"dp_accountant: distributed noise ({self.dp_noise_kind}) is "
                              "integer noise, accounted with RDP only (PRV and GDP assume a "
                              "continuous Gaussian); use --dp-accountant rdp, or --dp-mode "
                              "central for PRV or GDP")

    def _validate_normalization(self) -> None:
        if len(self.data_mean) != len(self.data_std):
            raise ConfigError(f"data_std: give as many values as data_mean, one per channel; got "
                              f"{list(self.data_std)} and {list(self.data_mean)}")
        for name, values in (("data_mean", self.data_mean), ("data_std", self.data_std)):
            for value in values:
                if isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                _real(name, value, low=0.0 if name == "data_std" else -math.inf)

    def _validate_dropout_clients(self) -> None:
        for cid in self.dropout_clients:
            _count("dropout_clients", cid, minimum=0, maximum=self.clients - 1)
        dropped = set(self.dropout_clients)
        if len(dropped) != len(self.dropout_clients):
            raise ConfigError(f"dropout_clients: ids repeat in {list(self.dropout_clients)}")
        stay, need = self.clients - len(dropped), self.min_survivors()
        if stay < need:
            raise ConfigError(
                f"dropout_clients: dropping {sorted(dropped)} every round leaves {stay} of "
                f"{self.clients} clients, but a {self.aggregator} sum of {self.clients} clients "
                f"needs at least {need}: no round could exchange anything"
            )

    def min_survivors(self) -> int:
        """The fewest clients whose sum the configured aggregator releases (at least 2)."""
        from protocols.private import min_contributors
        from protocols.registry import release_threshold

        if self.aggregator in ("secagg", "secagg+") or (
                self.aggregator == "paillier" and self.dp == "client"
                and self.dp_mode == "distributed"):
            t = release_threshold(self.aggregator, self.clients,
                                  expected_dropout=self.dropout_rate)
            return max(2, min_contributors(self.aggregator, threshold=t,
                                           n_clients=self.clients))
        return 2


def max_threads() -> int:
    """The most CPU threads a run may ask torch for: the CPUs this machine has."""
    return os.cpu_count() or 1


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(SimulationConfig))
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(SimulationConfig)}
_TUPLE_FIELDS = ("models", "dropout_clients", "baselines", "data_mean", "data_std")
_FLOAT_FIELDS = tuple(f.name for f in fields(SimulationConfig)
                      if f.type in ("float", "float | None"))


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML table of config keys; unknown keys and bad TOML raise ConfigError."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None
    _check_keys(values, f"config file {str(path)!r}")
    return values


def build_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> SimulationConfig:
    """Defaults, then file values, then every override that is not None (flags win)."""
    _check_keys(file_values, "config file")
    _check_keys(overrides, "overrides")
    merged = {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
    return SimulationConfig(**merged)


def _check_keys(values: dict[str, Any], where: str) -> None:
    for key in values:
        if key not in FIELD_NAMES:
            close = difflib.get_close_matches(str(key).replace("-", "_"), FIELD_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys: "
                              f"{', '.join(FIELD_NAMES)}")


def _normalised(config: SimulationConfig) -> dict[str, Any]:
    """Lists/comma strings -> tuples, ints -> floats, paths -> str; types are checked later."""
    out: dict[str, Any] = {}
    for name in _TUPLE_FIELDS:
        value = getattr(config, name)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            out[name] = tuple(value)
        else:
            raise ConfigError(f"{name}: expected a list, got {value!r}")
    for name in _FLOAT_FIELDS:
        value = getattr(config, name)
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
    for name in ("data_dir", "out"):
        if isinstance(getattr(config, name), Path):
            out[name] = str(getattr(config, name))
    return out


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: unknown value {value!r}; choose from {', '.join(allowed)}")


def _count(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{name}: must be an integer {allowed}, got {value}")


def _real(name: str, value: Any, *, low: float, high: float | None = None,
          closed_low: bool = False) -> None:
    if not isinstance(value, float) or not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    too_low = value < low if closed_low else value <= low
    if too_low or (high is not None and value >= high):
        left = "[" if closed_low else "("
        allowed = f"> {low:g}" if high is None and not closed_low else (
            f">= {low:g}" if high is None else f"in {left}{low:g}, {high:g})")
        raise ConfigError(f"{name}: must be {allowed}, got {value:g}")


def _cuda_available() -> bool:
    import torch  # lazy: only a config that asks for CUDA pays for the torch import

    return bool(torch.cuda.is_available())
