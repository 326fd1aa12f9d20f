"""The one report writer of every benchmark: JSON, Markdown, CSVs of raw arrays, PNG plots.

Every `codream-secure bench` section returns a `SectionResult`; `write_report` puts the sections,
the config, the seeds and the environment (versions, git revision, machine) into one folder an
auditor can read and re-run. The single-table benchmarks (device, overhead against Flower,
Paillier, the Fashion-MNIST and DP tables) write NAME.json and NAME.md through
`write_table_report`, `write_json` and `write_text`, with the same environment record.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SectionResult",
    "environment",
    "host",
    "save_figure",
    "write_csv",
    "write_json",
    "write_report",
    "write_table_report",
    "write_text",
]

_PACKAGES = ("numpy", "torch", "cryptography", "phe", "opacus", "flwr", "scikit-learn", "scipy")


@dataclass
class SectionResult:
    """One benchmark section: headline numbers, table rows, raw arrays and figures."""

    name: str
    title: str
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    arrays: dict[str, np.ndarray | list[dict[str, Any]]] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _git_revision() -> str | None:
    """HEAD of the checkout this package runs from (+ "-dirty"); None when installed."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():  # a wheel in site-packages: no checkout to name
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def environment() -> dict[str, Any]:
    """Versions, git revision and machine, as recorded in every report."""
    versions = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "versions": versions,
        "git_revision": _git_revision(),
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "memory_gib": _memory_gib(),
        },
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def host() -> dict[str, Any]:
    """The short machine record that overhead.json and paillier.json have always carried."""
    return {"platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "cpus": os.cpu_count()}


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays and non-finite floats -> JSON (inf/nan become strings)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any, *, indent: int = 2) -> Path:
    """data as JSON (numpy values made plain, inf and nan as strings), with a final newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=indent) + "\n")
    return path


def write_text(path: str | Path, text: str) -> Path:
    """A Markdown or text file, ending in exactly one newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")
    return path


def write_table_report(out_dir: str | Path, name: str, report: Mapping[str, Any], markdown: str,
                       *, indent: int = 2) -> Path:
    """out_dir/NAME.json (the report plus its `environment`) and out_dir/NAME.md."""
    out = Path(out_dir)
    write_json(out / f"{name}.json", {**report, "environment": environment()}, indent=indent)
    write_text(out / f"{name}.md", markdown)
    return out


def write_csv(path: Path, data: np.ndarray | Sequence[Mapping[str, Any]]) -> Path:
    """Rows of dicts (header from the union of keys) or a 1-D/2-D array, as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        if isinstance(data, np.ndarray):
            array = data.reshape(-1, 1) if data.ndim == 1 else data
            if array.ndim != 2:
                raise ValueError(f"CSV needs a 1-D or 2-D array, got shape {data.shape}")
            writer.writerows(array.tolist())
        else:
            header: list[str] = []
            for row in data:
                header += [k for k in row if k not in header]
            writer.writerow(header)
            for row in data:
                writer.writerow([_cell(row.get(k, "")) for k in header])
    return path


def _cell(value: Any) -> Any:
    value = _jsonable(value)
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def save_figure(fig: Any, out_dir: Path, name: str) -> str:
    """Save a matplotlib figure as out_dir/name (PNG), close it, return the file name."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / name, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return name


def _format(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _markdown_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    header: list[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_format(row.get(k, "")) for k in header) + " |" for row in rows]
    return lines


def _markdown(benchmark: str, config: Mapping[str, Any], env: Mapping[str, Any],
              sections: Sequence[SectionResult]) -> str:
    machine = env["machine"]
    lines = [
        f"# {benchmark} benchmark",
        "",
        f"- command: `{env['command']}`",
        f"- date: {env['date_utc']}, git {env['git_revision']}",
        f"- machine: {machine['cpu']} x {machine['cpu_count']}, {machine['memory_gib']} GiB",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "- config: `" + json.dumps(_jsonable(config)) + "`",
    ]
    for section in sections:
        lines += ["", f"## {section.title}", "", f"({section.seconds:.1f} s)", ""]
        lines += [f"- {k}: {_format(v)}" for k, v in section.summary.items()
                  if not isinstance(v, (dict, list))]
        if section.rows:
            lines += ["", *_markdown_table(section.rows)]
        lines += [""] + [f"![{name}]({name})" for name in section.figures]
        if section.notes:
            lines += ["", *(f"> {note}" for note in section.notes)]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, *, benchmark: str, config: Mapping[str, Any],
                 seeds: Any, sections: Sequence[SectionResult]) -> Path:
    """Write report.json, report.md and one CSV per table and raw array into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    files: dict[str, list[str]] = {}
    for section in sections:
        written = []
        if section.rows:
            written.append(write_csv(out / f"{section.name}.csv", section.rows).name)
        for key, data in section.arrays.items():
            target = out / f"{section.name}_{key}.csv"
            written.append(write_csv(target, data).name)
        files[section.name] = written + list(section.figures)
    report = {
        "benchmark": benchmark,
        "config": config,
        "seeds": seeds,
        "environment": env,
        "sections": {
            s.name: {"title": s.title, "summary": s.summary, "rows": s.rows, "notes": s.notes,
                     "seconds": s.seconds, "files": files[s.name]}
            for s in sections
        },
    }
    write_json(out / "report.json", report)
    write_text(out / "report.md", _markdown(benchmark, config, env, sections))
    return out
