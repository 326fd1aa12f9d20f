"""A Flower run config as simulate's sectioned config plus the Flower runtime's own options.

Flower's run config is flat (`--run-config "key=value ..."`, `[tool.flwr.app.config]`). The
key `config` holds a whole TOML config (the tables `simulate --config` reads); a key
`section.key` (e.g. `codream.rounds`) overrides one value; `deadline-protocol` and
`deadline-work` are the seconds the server waits for replies (see Deadlines), `wait-for-nodes`
how long it waits for every partition's SuperNode to connect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import SimulationConfig
from ..config.files import build_config, check_tables, parse_toml
from ..config.simulation import KEY_SECTION, SECTIONS
from ..errors import ConfigError
from .server_role import Deadlines

__all__ = ["FlowerRunOptions", "simulation_config"]

_RUNTIME_KEYS = ("config", "deadline-protocol", "deadline-work", "wait-for-nodes")


def simulation_config(run_config: Mapping[str, Any]) -> SimulationConfig:
    """The sectioned config a run config describes (defaults, then `config`, then the
    `section.key` overrides); unknown keys raise ConfigError naming them."""
    text = run_config.get("config", "")
    if not isinstance(text, str):
        raise ConfigError(f"run config 'config' must be TOML text, got {type(text).__name__}")
    tables = parse_toml(text.encode(), "run config 'config'") if text.strip() else {}
    check_tables(tables, "run config 'config'")
    overrides: dict[str, Any] = {}
    for name, value in run_config.items():
        if name in _RUNTIME_KEYS:
            continue
        section, _, key = name.partition(".")
        if section not in SECTIONS or KEY_SECTION.get(key) != section:
            raise ConfigError(f"unknown run config key {name!r}: use 'config' (a TOML config), "
                              f"'<table>.<key>' (e.g. 'codream.rounds') or one of "
                              f"{', '.join(_RUNTIME_KEYS[1:])}")
        overrides[key] = value
    return build_config(tables, overrides)


@dataclass(frozen=True)
class FlowerRunOptions:
    """Everything the ServerApp reads from the run config."""

    config: SimulationConfig
    deadlines: Deadlines
    wait_for_nodes: float

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerRunOptions:
        defaults = Deadlines()
        deadlines = Deadlines(protocol=run_config.get("deadline-protocol", defaults.protocol),
                              work=run_config.get("deadline-work", defaults.work))
        wait = run_config.get("wait-for-nodes", 120.0)
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait <= 0:
            raise ConfigError(f"wait-for-nodes must be a positive number of seconds, got "
                              f"{wait!r}")
        return cls(simulation_config(run_config), deadlines, float(wait))
