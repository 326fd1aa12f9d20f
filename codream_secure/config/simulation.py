"""The whole run's config: one section per TOML table, and the checks that span sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from codream_secure.config.aggregation import AggregationConfig
from codream_secure.config.checks import Checks
from codream_secure.config.codream import CoDreamConfig
from codream_secure.config.data import DataConfig
from codream_secure.config.device import DeviceConfig
from codream_secure.config.models import ModelsConfig
from codream_secure.config.privacy import PrivacyConfig
from codream_secure.config.run import RunConfig
from codream_secure.config.section import Section
from codream_secure.errors import ConfigError
from protocols.plan import AggregationPlan

# table name -> section class, in the order of report.json's config and the docs
SECTIONS: dict[str, type[Section]] = {
    cls.SECTION: cls for cls in (DataConfig, ModelsConfig, CoDreamConfig, AggregationConfig,
                                 PrivacyConfig, DeviceConfig, RunConfig)
}
# every key names its table: key names are unique across sections
KEY_SECTION: dict[str, str] = {key: name for name, cls in SECTIONS.items()
                               for key in cls.key_names()}
assert len(KEY_SECTION) == sum(len(cls.key_names()) for cls in SECTIONS.values()), "a key repeats"


@dataclass(frozen=True)
class SimulationConfig:
    """Every knob of one CoDream run, as sections; constructing it validates it."""

    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    codream: CoDreamConfig = field(default_factory=CoDreamConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"[{name}]: expected a {cls.__name__}, got "
                                  f"{type(getattr(self, name)).__name__}")
        self._validate_masking()
        self._validate_dropout_clients()
        self._validate_teacher()
        self._validate_dream_mode()
        self._validate_round_order()

    @classmethod
    def from_keys(cls, **keys: Any) -> SimulationConfig:
        """Defaults with these keys replaced, each routed to its section by name
        (`from_keys(dream_steps=5)` sets [codream] dream_steps)."""
        return cls().replace(**keys)

    @classmethod
    def from_dict(cls, tables: dict[str, dict[str, Any]]) -> SimulationConfig:
        """From the sectioned dict that to_dict() writes and a TOML file holds (missing keys
        take their defaults); unknown tables or keys raise ConfigError."""
        for name, values in tables.items():
            if name not in SECTIONS:
                raise ConfigError(f"unknown config table [{name}]; tables: {', '.join(SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"[{name}] must be a table of keys, got {values!r}")
            for key in values:
                if KEY_SECTION.get(key) != name:
                    raise ConfigError(unknown_key_message(key, name))
        return cls(**{name: SECTIONS[name](**values) for name, values in tables.items()})

    def replace(self, **keys: Any) -> SimulationConfig:
        """A copy with these keys changed (each routed to its section), validated again."""
        changes: dict[str, dict[str, Any]] = {}
        for key, value in keys.items():
            if key not in KEY_SECTION:
                raise ConfigError(unknown_key_message(key, None))
            changes.setdefault(KEY_SECTION[key], {})[key] = value
        return dataclasses.replace(self, **{
            name: dataclasses.replace(getattr(self, name), **values)
            for name, values in changes.items()})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{table: {key: value}}, JSON-ready, for report.json and checkpoints (TOML's shape)."""
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    @property
    def client_models(self) -> tuple[str, ...]:
        """Client k's architecture, for each of the [data] clients."""
        return self.models.client_models(self.data.clients)

    def _validate_masking(self) -> None:
        check, aggregator = Checks("device"), self.aggregation.aggregator
        if self.device.masking == "device" and not self.aggregation.spec().pairwise_masks:
            raise check.fail("masking", f"'device' masks pairwise-mask uploads; aggregator "
                                        f"{aggregator!r} has none (use masking = \"auto\" or "
                                        "\"host\")")
        if self.device.masking == "device" and self.privacy.dp == "client":
            raise check.fail("masking", "'device' is not built for client-level DP yet (its L2 "
                                        "clipping runs on the host); use masking = \"auto\" or "
                                        "\"host\"")

    def _validate_round_order(self) -> None:
        if self.codream.round_order == "joint" and self.privacy.dp == "sample":
            raise Checks("codream").fail(
                "round_order", "'joint' trains on the private data in steps that add a "
                               "distillation term, outside DP-SGD; use round_order = "
                               "\"distill-last\" or \"local-last\" with dp = \"sample\"")

    def _validate_dream_mode(self) -> None:
        if self.codream.dream_mode == "generator" and self.privacy.dp == "client":
            raise Checks("codream").fail(
                "dream_mode", "'generator' is not built for client-level DP yet (its updates "
                              "would need their own L2 clip and accounting); use dream_mode = "
                              "\"pixel\", or dp = \"sample\" or \"off\"")

    def _validate_dropout_clients(self) -> None:
        check, clients = Checks("aggregation"), self.data.clients
        dropped = self.aggregation.dropout_clients
        for cid in dropped:
            check.count("dropout_clients", cid, minimum=0, maximum=clients - 1)
        stay, need = clients - len(dropped), self.min_survivors()
        if stay < need:
            raise check.fail(
                "dropout_clients",
                f"dropping {sorted(dropped)} every round leaves {stay} of {clients} clients, but "
                f"a {self.aggregation.aggregator} sum of {clients} clients needs at least "
                f"{need}: no round could exchange anything")

    @property
    def teacher(self) -> str:
        """The soft-label weighting a run uses ([codream] teacher)."""
        return self.codream.teacher

    def _validate_teacher(self) -> None:
        check = Checks("codream")
        if self.privacy.dp != "off" and self.teacher == "class-aware":
            raise check.fail("teacher", "'class-aware' releases the clients' pooled class "
                                        "histogram, which the DP accounting does not cover; use "
                                        "teacher = \"uniform\" with [privacy] dp")
        if self.teacher == "class-aware" and self.codream.soft_labels != "probs":
            raise check.fail("teacher", "'class-aware' weights probabilities per class and "
                                        "needs soft_labels = \"probs\"")
        if self.codream.dream_objective == "label" and self.teacher != "class-aware":
            raise check.fail("dream_objective", "'label' draws targets from the pooled class "
                                                "histogram and needs teacher = \"class-aware\" "
                                                "(not available with [privacy] dp)")

    def aggregation_plan(self) -> AggregationPlan:
        """Threshold, degree and release floor of the run's sessions.

        Planned as private under distributed DP, whose noise is sized for the release floor
        (Paillier's key holder then decrypts only majority sums).
        """
        private = self.privacy.dp == "client" and self.privacy.dp_mode == "distributed"
        return self.aggregation.spec().plan(
            self.data.clients, expected_dropout=self.aggregation.dropout_rate,
            ring_bits=self.aggregation.ring_bits, private=private)

    def min_survivors(self) -> int:
        """The fewest clients whose sum the configured aggregator releases (at least 2)."""
        return max(2, self.aggregation_plan().min_contributors)


def unknown_key_message(key: Any, table: str | None) -> str:
    """Why `key` is refused in `table` (None: at the top level, where only tables belong)."""
    import difflib

    home = KEY_SECTION.get(key)
    if home is not None and table is None:
        return f"`{key}` is now `[{home}] {key}`"
    if home is not None:
        return f"[{table}] {key}: `{key}` belongs in the [{home}] table, not [{table}]"
    where = f"[{table}] " if table else ""
    candidates = SECTIONS[table].key_names() if table else tuple(KEY_SECTION)
    close = difflib.get_close_matches(str(key).replace("-", "_"), candidates, n=1)
    hint = ""
    if close:
        hint = f" (did you mean {close[0]!r}?)" if table else (
            f" (did you mean `[{KEY_SECTION[close[0]]}] {close[0]}`?)")
    return f"{where}unknown key {key!r}{hint}; valid keys: {', '.join(candidates)}"
