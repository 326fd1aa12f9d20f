"""`codream-secure bench` as an installed wheel runs it: no `benchmarks` module of the checkout.

opacus installs a top-level package named `benchmarks`, so the checkout's benchmarks/ folder
must never be what the CLI imports. The command runs in a subprocess whose working folder is
outside the checkout and whose PYTHONPATH is only the folder that provides codream_secure
(site-packages for a wheel; the checkout root in a development tree).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import codream_secure

PACKAGE_ROOT = Path(codream_secure.__file__).resolve().parents[1]
CHECKOUT_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# Runs the CLI in-process, then prints every loaded module named benchmarks* and its file.
PROBE = """
import json, sys
preload = sys.argv.pop(1)
if preload:  # the control: load a checkout script as benchmarks.<name>, as a bad import would
    import importlib.util
    spec = importlib.util.spec_from_file_location("benchmarks." + preload.rsplit("/", 1)[-1][:-3],
                                                  preload)
    sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
from codream_secure.cli import main
try:
    main(sys.argv[1:], prog_name="codream-secure")
    code = 0
except SystemExit as exit_:
    code = exit_.code or 0
loaded = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())
          if name == "benchmarks" or name.startswith("benchmarks.")}
print("MODULES=" + json.dumps(loaded))
sys.exit(code)
"""


def _bench(tmp_path: Path, *args: str, preload: str = "") -> tuple[int, str, dict]:
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", PROBE, preload, "bench", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    line = next(li for li in done.stdout.splitlines()[::-1] if li.startswith("MODULES="))
    return done.returncode, done.stdout + done.stderr, json.loads(line.removeprefix("MODULES="))


def _from_checkout(loaded: dict) -> list[str]:
    """The loaded benchmarks* modules whose file lies in the checkout's benchmarks/ folder."""
    return [name for name, file in loaded.items()
            if file and Path(file).resolve().is_relative_to(CHECKOUT_BENCHMARKS)]


def test_bench_help_imports_nothing_from_the_checkouts_benchmarks(tmp_path):
    code, output, loaded = _bench(tmp_path, "--help")
    assert code == 0, output
    assert "leakage" in output and "overhead" in output
    assert _from_checkout(loaded) == []


@pytest.mark.slow
def test_tiny_leakage_run_imports_nothing_from_the_checkouts_benchmarks(tmp_path):
    out = tmp_path / "report"
    code, output, loaded = _bench(tmp_path, "leakage", "--settings", "tiny", "--out", str(out))
    assert code == 0, output[-2000:]
    assert json.loads((out / "report.json").read_text())["benchmark"] == "leakage"
    assert _from_checkout(loaded) == []


def test_control_a_checkout_script_loaded_as_benchmarks_is_caught(tmp_path):
    script = CHECKOUT_BENCHMARKS / "dp_sampling.py"
    code, output, loaded = _bench(tmp_path, "--help", preload=str(script))
    assert code == 0, output
    assert _from_checkout(loaded) == ["benchmarks.dp_sampling"]


def test_the_checkouts_benchmarks_folder_is_not_a_package():
    assert not (CHECKOUT_BENCHMARKS / "__init__.py").exists()
    assert not list(CHECKOUT_BENCHMARKS.glob("*/__init__.py"))


def _imported(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return names


def test_no_module_of_codream_secure_imports_benchmarks(tmp_path):
    control = tmp_path / "control.py"
    control.write_text("import benchmarks.fmnist_table\nfrom benchmarks import dp_table\n")
    assert _imported(control) == ["benchmarks.fmnist_table", "benchmarks"]
    offenders = [f"{path}: {name}" for path in (PACKAGE_ROOT / "codream_secure").rglob("*.py")
                 for name in _imported(path) if name.split(".")[0] == "benchmarks"]
    assert offenders == []
