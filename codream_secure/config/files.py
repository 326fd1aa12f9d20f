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

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few dozen lines


def load_config(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read {table: {key: value}} from a TOML file, or from a .json file holding that dict or a
    whole report.json (its `config`); flat keys, unknown tables and unknown keys raise
    ConfigError naming them."""
    path = Path(path)
    name = f"config file {str(path)!r}"
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{name} does not exist") from None
    except OSError as error:
        raise ConfigError(f"cannot read {name}: {error.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{name} is larger than {MAX_CONFIG_BYTES:,} bytes; not a config")
    values = _parse_json(raw, name) if path.suffix.lower() == ".json" else parse_toml(raw, name)
    check_tables(values, name)
    return values


def parse_toml(raw: bytes, name: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    text = _utf8(raw, name, "TOML")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # tomllib names the line, except at the very end of the file
        reason = str(error).replace("(at end of document)",
                                    f"(at line {text.count(chr(10)) + 1}, the end of the file)")
        raise ConfigError(f"{name} is not valid TOML: {reason}") from None
    except RecursionError:
        raise ConfigError(f"{name} is not valid TOML: arrays or tables nested too "
                          "deeply") from None


def _utf8(raw: bytes, name: str, kind: str) -> str:
    """The file's text; ConfigError naming the first line that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConfigError(f"{name} is not valid {kind}: line {line} is not UTF-8 text "
                          f"(byte 0x{raw[error.start]:02x})") from None


def _parse_json(raw: bytes, name: str) -> dict[str, Any]:
    try:
        values = json.loads(_utf8(raw, name, "JSON"))
    except (json.JSONDecodeError, RecursionError) as error:
        reason = error if isinstance(error, json.JSONDecodeError) else "nested too deeply"
        raise ConfigError(f"{name} is not valid JSON: {reason}") from None
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


def toml_string(text: str) -> str:
    """Any text as a TOML basic string: quotes, backslashes and control characters escaped."""
    escaped = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F
                      else "\\" + c if c in '"\\' else c for c in text)
    return f'"{escaped}"'


def toml_literal(value: Any) -> str:
    """A bool, number, string or list of them as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    raise ConfigError(f"a config value of type {type(value).__name__} has no TOML form")


def config_toml(config: SimulationConfig) -> str:
    """The config as the TOML tables `simulate --config` reads (keys that are None, i.e. unset,
    are left out: they read back as their defaults)."""
    lines = []
    for table, keys in config.to_dict().items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {toml_literal(value)}" for key, value in keys.items()
                  if value is not None]
        lines.append("")
    return "\n".join(lines)
