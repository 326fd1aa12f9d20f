"""benchmarks/device_check.sh: its preflight (one line and exit 2 when it cannot run, carried wheels
installed first) and its packing of inductor's generated code."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
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


def test_missing_carried_modules_without_wheels_are_named(tmp_path):
    (tmp_path / "no-wheels").mkdir()
    result = run_script(tmp_path, shadowed=["cryptography", "opacus"],
                        WHEELS=str(tmp_path / "no-wheels"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"cryptography opacus not importable and "
                                     f"'{tmp_path / 'no-wheels'}' holds no wheels: carry them "
                                     f"(docs/gpu.md)")


def fake_wheel(folder: Path, module: str) -> None:
    """A minimal pure-Python wheel whose module imports cleanly."""
    info = f"{module}-9.9.dist-info"
    with zipfile.ZipFile(folder / f"{module}-9.9-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{module}/__init__.py", "")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {module}\nVersion: 9.9\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                       "Root-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", f"{module}/__init__.py,,\n{info}/METADATA,,\n"
                       f"{info}/WHEEL,,\n{info}/RECORD,,\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="reads the refusal that follows without CUDA")
def test_carried_wheels_are_installed_before_the_import_check(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "phe")
    result = run_script(tmp_path, shadowed=["phe"], WHEELS=str(wheels))
    # the broken phe is shadowed by the installed one, so only the missing CUDA stops the script
    assert result.returncode == 2
    assert result.stderr.strip() == "no CUDA device"


def test_every_missing_module_is_named_in_one_line(tmp_path):
    result = run_script(tmp_path, shadowed=["sklearn", "rich"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["cannot import: rich (ImportError: rich is broken); "
                     "sklearn (ImportError: sklearn is broken)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_a_machine_without_cuda_is_refused_without_a_traceback(tmp_path):
    result = run_script(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "no CUDA device"
    assert not (tmp_path / "out" / "stages.log").exists()


def run_pack_kernels(tmp_path, cache, **env):
    """Run the script's pack_kernels function alone on a stand-in inductor cache."""
    script = (ROOT / "benchmarks/device_check.sh").read_text()
    function = script[script.index("pack_kernels() {"):]
    function = function[:function.index("\n}\n") + 3]
    out = tmp_path / "out"
    out.mkdir()
    environ = dict(os.environ, out=str(out), TORCHINDUCTOR_CACHE_DIR=str(cache), **env)
    subprocess.run(["bash", "-c", function + "pack_kernels"], env=environ, check=True, timeout=60)
    return out


def test_inductor_code_is_packed_as_python_sources_only(tmp_path):
    cache = tmp_path / "cache"
    (cache / "ab").mkdir(parents=True)
    (cache / "ab" / "graph.py").write_text("def call(args): pass\n")
    (cache / "ab" / "kernel.cubin").write_bytes(b"\0" * 1000)
    out = run_pack_kernels(tmp_path, cache)
    with tarfile.open(out / "inductor-code.tgz") as archive:
        assert [Path(name).name for name in archive.getnames()] == ["graph.py"]


def test_inductor_code_over_the_limit_is_dropped_with_a_note(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "noise.py").write_text(os.urandom(1_500_000).hex())  # does not compress to 1 MB
    out = run_pack_kernels(tmp_path, cache, KERNELS_MB="1")
    assert not (out / "inductor-code.tgz").exists()
    assert "over 1 MB packed: not kept" in (out / "stages.log").read_text()
