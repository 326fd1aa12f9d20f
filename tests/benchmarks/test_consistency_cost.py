"""benchmarks/consistency_cost.py, run as a file: both threat models, their bytes, bad input."""

from __future__ import annotations

import json

from tests.benchmarks.scripts import run_script


def test_a_quick_run_writes_both_models_and_active_costs_more_bytes(tmp_path):
    result = run_script("consistency_cost", "--quick", "--reps", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "consistency_cost.json").read_text())
    assert report["command"] == ("python benchmarks/consistency_cost.py --quick --reps 2 "
                                 f"--out {tmp_path}")
    assert "git_revision" in report["environment"]
    rows = {(r["n"], r["threat_model"]): r for r in report["rows"]}
    assert [(r["n"], r["threat_model"]) for r in report["rows"]] == [
        (4, "semi-honest"), (4, "active"), (30, "semi-honest"), (30, "active")]
    assert all(r["reps"] == 2 and r["step_seconds"] > 0 for r in report["rows"])
    for n in (4, 30):
        # the round adds a request and one 32-byte token per neighbour to every survivor
        assert rows[(n, "active")]["bytes_up"] > rows[(n, "semi-honest")]["bytes_up"]
    assert rows[(30, "active")]["included"] == 30  # late dropouts still count
    assert len(result.stdout.splitlines()) == 1 + len(rows)  # a header and one line per row


def test_reps_must_be_positive(tmp_path):
    result = run_script("consistency_cost", "--reps", "0", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "--reps" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "consistency_cost.json").exists()
