"""Compose the leakage sections into one report folder (`codream-secure bench leakage`)."""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codream_secure.audit.reporting import SectionResult, write_report
from codream_secure.errors import CoDreamError

# section name -> module exposing run(settings, out_dir, progress) and TINY / DEFAULT / FULL
SECTIONS: dict[str, str] = {
    "dreams": "codream_secure.audit.leakage.dreams_vs_data",
    "reconstruction": "codream_secure.audit.leakage.reconstruction",
    "membership": "codream_secure.audit.leakage.membership",
    "server-view": "codream_secure.audit.leakage.server_view",
}
SETTINGS = ("tiny", "default", "full")


class BenchmarkError(CoDreamError):
    """A benchmark asked for something that does not exist (bad section or settings name)."""


def section_settings(name: str, setting: str) -> tuple[Any, Any]:
    """(module, settings instance) of one section at one setting."""
    if name not in SECTIONS:
        raise BenchmarkError(f"unknown leakage section {name!r}; choose from "
                             f"{', '.join(SECTIONS)}")
    if setting not in SETTINGS:
        raise BenchmarkError(f"unknown settings {setting!r}; choose from {', '.join(SETTINGS)}")
    module = importlib.import_module(SECTIONS[name])
    return module, getattr(module, setting.upper())


def _seeds(settings: Any) -> dict[str, Any]:
    values = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else {}
    return {k: v for k, v in values.items() if "seed" in k}


def checked_sections(sections: Sequence[str] | None) -> list[str]:
    """The sections to run (all when none are named); an unknown name is a BenchmarkError.

    Called before any section's module is imported and before the report folder is made.
    """
    names = list(sections) if sections else list(SECTIONS)
    for name in names:
        if name not in SECTIONS:
            raise BenchmarkError(f"unknown leakage section {name!r}; choose from "
                                 f"{', '.join(SECTIONS)}")
    return names


def run_leakage(out_dir: str | Path, *, setting: str = "default",
                sections: Sequence[str] | None = None, progress: Any = None) -> Path:
    """Run the chosen sections (all by default) and write report.json/md, CSVs and plots."""
    names = checked_sections(sections)
    chosen = [(name, *section_settings(name, setting)) for name in names]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[SectionResult] = []
    config: dict[str, Any] = {"settings": setting, "sections": {}}
    seeds: dict[str, Any] = {}
    for name, module, settings in chosen:
        if progress is not None:
            progress.log(f"leakage: {name} ({setting})")
        start = time.perf_counter()
        result = module.run(settings, out, progress=progress)
        result.seconds = result.seconds or time.perf_counter() - start
        results.append(result)
        config["sections"][name] = (dataclasses.asdict(settings)
                                    if dataclasses.is_dataclass(settings) else repr(settings))
        seeds[name] = _seeds(settings)
    return write_report(out, benchmark="leakage", config=config, seeds=seeds, sections=results)
