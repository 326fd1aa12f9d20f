"""benchmarks/device_check.sh stops before its first stage, with one line, when it cannot run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_script(tmp_path, shadowed=(), **env):
    """Run the script from the repository root with this interpreter first on PATH."""
    shadows = tmp_path / "shadows"
    for module in shadowed:  # a module on PYTHONPATH that refuses to import
        (shadows / module).mkdir(parents=True)
        (shadows / module / "__init__.py").write_text(f"raise ImportError('{module} is broken')\n")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    environ = dict(os.environ, PATH=path, PYTHONPATH=str(shadows), **env)
    return subprocess.run(["bash", "benchmarks/device_check.sh", str(tmp_path / "out")], cwd=ROOT,
                          env=environ, capture_output=True, text=True, timeout=120)


def test_an_unknown_stage_is_named(tmp_path):
    result = run_script(tmp_path, STAGES="benchmark bogus")
    assert result.returncode == 2
    assert "unknown stage 'bogus'" in result.stderr


def test_missing_cryptography_without_wheels_is_named(tmp_path):
    (tmp_path / "no-wheels").mkdir()
    result = run_script(tmp_path, shadowed=["cryptography"], WHEELS=str(tmp_path / "no-wheels"))
    assert result.returncode == 2
    assert "cryptography does not import" in result.stderr and "no-wheels" in result.stderr


def test_every_missing_module_is_named_in_one_line(tmp_path):
    result = run_script(tmp_path, shadowed=["phe", "rich"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["cannot import: rich (ImportError: rich is broken); "
                     "phe (ImportError: phe is broken)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_a_machine_without_cuda_is_refused_without_a_traceback(tmp_path):
    result = run_script(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "no CUDA device"
    assert not (tmp_path / "out" / "stages.log").exists()
