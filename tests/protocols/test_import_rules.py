"""The protocol layer never imports torch or the CoDream core (design.md's arrows)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import protocols


def test_protocol_layer_imports_no_torch_and_no_core():
    modules = [m.name for m in pkgutil.walk_packages(protocols.__path__, "protocols.")]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'codream_secure', 'benchmarks'))\n"
        "assert not bad, bad\n"
        "print(len(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(modules) >= 10
