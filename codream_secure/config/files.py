"""Config files (TOML tables, or a report.json's config) and flags over them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from codream_secure.config.simulation import (
    KEY_SECTION,
    SECTIONS,
    SimulationConfig,
    unknown_key_message,
)
from codream_secure.errors import ConfigError


def load_config(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read {table: {key: value}} from a TOML file, or from a .json file holding that dict or a
    whole report.json (its `config`); flat keys, unknown tables and unknown keys raise
    ConfigError naming them."""
    path = Path(path)
    name = f"config file {str(path)!r}"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{name} does not exist") from None
    except OSError as error:
        raise ConfigError(f"cannot read {name}: {error.strerror}") from None
    values = _parse_json(raw, name) if path.suffix.lower() == ".json" else _parse_toml(raw, name)
    check_tables(values, name)
    return values


def _parse_toml(raw: bytes, name: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{name} is not valid TOML: {error}") from None


def _parse_json(raw: bytes, name: str) -> dict[str, Any]:
    try:
        values = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{name} is not valid JSON: {error}") from None
    if isinstance(values, dict) and "schema_version" in values and "config" in values:
        values = values["config"]  # a whole report.json: repeat its run
    if not isinstance(values, dict):
        raise ConfigError(f"{name} must hold an object of config tables")
    return values


def check_tables(values: dict[str, Any], where: str) -> None:
    """ConfigError unless `values` is {known table: {that table's keys}}."""
    flat = [key for key, value in values.items()
            if key in KEY_SECTION and not (key in SECTIONS and isinstance(value, dict))]
    if flat:  # keys of the single-table format: name every one's new home at once
        raise ConfigError(f"{where}: keys now live in tables: "
                          + "; ".join(unknown_key_message(key, None) for key in flat))
    for table, keys in values.items():
        if table not in SECTIONS:
            if not isinstance(keys, dict):
                raise ConfigError(f"{where}: {unknown_key_message(table, None)}")
            raise ConfigError(f"{where}: unknown table [{table}]; tables: "
                              f"{', '.join(SECTIONS)}")
        if not isinstance(keys, dict):
            raise ConfigError(f"{where}: [{table}] must be a table of keys, got {keys!r}")
        for key in keys:
            if key not in SECTIONS[table].key_names():
                raise ConfigError(f"{where}: {unknown_key_message(key, table)}")


def build_config(file_values: dict[str, dict[str, Any]], overrides: dict[str, Any]
                 ) -> SimulationConfig:
    """Defaults, then the file's tables, then every flat override that is not None (flags win;
    each flag's key names its table)."""
    check_tables(file_values, "config file")
    return SimulationConfig.from_dict(file_values).replace(
        **{key: value for key, value in overrides.items() if value is not None})
