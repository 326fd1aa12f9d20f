"""Validation helpers shared by the config sections: each error names `[section] key`."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from codream_secure.errors import ConfigError


class Checks:
    """Raise ConfigError('[section] key: ...') for a value outside what `key` allows."""

    def __init__(self, section: str) -> None:
        self.section = section

    def fail(self, key: str, message: str) -> ConfigError:
        """The error for `key` (raise it): '[section] key: message'."""
        return ConfigError(f"[{self.section}] {key}: {message}")

    def choice(self, key: str, value: Any, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            raise self.fail(key, f"unknown value {value!r}; choose from {', '.join(allowed)}")

    def count(self, key: str, value: Any, *, minimum: int, maximum: int | None = None) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, f"expected an integer, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise self.fail(key, f"must be an integer {allowed}, got {value}")

    def real(self, key: str, value: Any, *, low: float, high: float | None = None,
             closed_low: bool = False) -> None:
        if not isinstance(value, float) or not math.isfinite(value):
            raise self.fail(key, f"expected a finite number, got {value!r}")
        too_low = value < low if closed_low else value <= low
        if too_low or (high is not None and value >= high):
            left = "[" if closed_low else "("
            allowed = f"> {low:g}" if high is None and not closed_low else (
                f">= {low:g}" if high is None else f"in {left}{low:g}, {high:g})")
            raise self.fail(key, f"must be {allowed}, got {value:g}")

    def path(self, key: str, value: Any) -> None:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty path, got {value!r}")

    def unique(self, key: str, values: tuple) -> None:
        if len(set(values)) != len(values):
            raise self.fail(key, f"entries repeat in {list(values)}")


def normalise(section: object, *, tuples: tuple[str, ...] = (), floats: tuple[str, ...] = (),
              paths: tuple[str, ...] = ()) -> None:
    """In place on a frozen section: lists/comma strings -> tuples, ints -> floats,
    Paths -> str; the types themselves are checked by the section's validation."""
    name = type(section).__name__
    for key in tuples:
        value = getattr(section, key)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"[{getattr(section, 'SECTION', name)}] {key}: expected a list, "
                              f"got {value!r}")
        object.__setattr__(section, key, tuple(value))
    for key in floats:
        value = getattr(section, key)
        if isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(section, key, float(value))
    for key in paths:
        if isinstance(getattr(section, key), Path):
            object.__setattr__(section, key, str(getattr(section, key)))


def max_threads() -> int:
    """The most CPU threads a run may ask torch for: the CPUs this machine has."""
    return os.cpu_count() or 1


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (imports torch: only configs that ask for CUDA pay)."""
    import torch

    return bool(torch.cuda.is_available())
