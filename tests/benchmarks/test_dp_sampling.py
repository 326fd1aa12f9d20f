"""benchmarks/dp_sampling.py, run as a file: one line per size and mechanism, refused counts."""

from __future__ import annotations

import subprocess
from functools import partial

from tests.benchmarks.scripts import run_script

_run: partial[subprocess.CompletedProcess] = partial(run_script, "dp_sampling")


def test_prints_every_mechanism_at_every_size():
    result = _run("--repeats", "1", "--sizes", "64", "128")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 6
    for size in ("64", "128"):
        rows = [line for line in lines if line.split()[0] == size]
        assert [r.split()[2] for r in rows] == ["skellam", "discrete_gaussian", "central"]
        assert all(float(r.split()[-2]) >= 0 for r in rows)


def test_repeats_and_sizes_must_be_positive():
    for args in (("--repeats", "0"), ("--sizes", "0")):
        result = _run(*args)
        assert result.returncode == 2
        assert args[0] in result.stderr and "Traceback" not in result.stderr
