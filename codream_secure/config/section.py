"""The base of every config section: normalise, validate, and the JSON/TOML-ready dict."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar

from codream_secure.config.checks import Checks, normalise


class Section:
    """A frozen dataclass of one TOML table; constructing it normalises and validates it."""

    SECTION: ClassVar[str]  # the TOML table's name, e.g. "codream"
    TUPLES: ClassVar[tuple[str, ...]] = ()  # list-valued keys (a comma string is accepted)
    PATHS: ClassVar[tuple[str, ...]] = ()  # keys that take a pathlib.Path as well as a str

    def __post_init__(self) -> None:
        floats = tuple(f.name for f in fields(self)  # type: ignore[arg-type]
                       if f.type in ("float", "float | None"))
        normalise(self, tuples=self.TUPLES, floats=floats, paths=self.PATHS)
        self.validate(Checks(self.SECTION))

    def validate(self, check: Checks) -> None:
        """Raise ConfigError('[section] key: ...') for the first invalid key."""
        raise NotImplementedError

    @classmethod
    def key_names(cls) -> tuple[str, ...]:
        """The section's keys, in declaration order."""
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """JSON- and TOML-ready values (tuples become lists; None stays None)."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in ((k, getattr(self, k)) for k in self.key_names())}
