"""Run a script of the benchmarks/ folder as a file, the only way its commands are documented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import codream_secure

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks"
# the folder that provides codream_secure and protocols (site-packages once installed)
PACKAGE_ROOT = str(Path(codream_secure.__file__).resolve().parents[1])


def run_script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python benchmarks/NAME.py ARGS`: its exit status and output."""
    path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *args],
                          env={**os.environ, "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=timeout)
