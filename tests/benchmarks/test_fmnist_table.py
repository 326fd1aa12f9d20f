"""benchmarks/fmnist_table.py, run as a file on a tiny stand-in for Fashion-MNIST."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.scripts import run_script
from tests.core.test_data import make_idx_folder


@pytest.mark.slow
def test_a_tiny_table_has_every_method_the_secure_comparison_and_the_curves(tmp_path):
    make_idx_folder(tmp_path / "data", n_train=240, n_test=40)
    out = tmp_path / "out"
    result = run_script("fmnist_table", "--seeds", "0", "--partitions", "iid", "--aggregators",
                        "plain", "secagg", "--data-dir", str(tmp_path / "data"), "--max-train",
                        "240", "--max-test", "40", "--rounds", "1", "--dream-steps", "2",
                        "--jobs", "2", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr
    runs = json.loads((out / "runs.json").read_text())
    assert [(r["variant"], r["aggregator"]) for r in runs] == [
        ("heterogeneous", "plain"), ("heterogeneous", "secagg"), ("homogeneous", "plain"),
        ("homogeneous", "secagg")]
    assert set(runs[0]["final"]) == {"codream", "isolated", "centralized"}
    assert set(runs[1]["final"]) == {"codream"}  # the secure rerun skips the baselines
    assert set(runs[2]["final"]) == {"codream", "fedavg"}
    # each run says how much of its time went to its baselines
    assert set(runs[0]["baseline_seconds"]) == {"isolated", "centralized"}
    assert runs[1]["baseline_seconds"] == {}
    assert 0 < sum(runs[0]["baseline_seconds"].values()) < runs[0]["seconds"]
    curves = runs[0]["curves"]
    assert curves["before_kd"][0] is None and curves["before_kd"][1] is not None
    assert len(curves["end"]) == 2
    table = (out / "table.md").read_text()
    for label in ("CoDream (4 architectures)", "isolated", "FedAvg (all smallcnn)",
                  "centralized", "| iid | heterogeneous |", "before distillation"):
        assert label in table, label


@pytest.mark.slow
def test_codream_only_skips_every_baseline(tmp_path):
    make_idx_folder(tmp_path / "data", n_train=240, n_test=40)
    out = tmp_path / "out"
    result = run_script("fmnist_table", "--seeds", "0", "--partitions", "iid", "--variants",
                        "homogeneous", "--aggregators", "secagg", "--codream-only",
                        "--data-dir", str(tmp_path / "data"), "--max-train", "240",
                        "--max-test", "40", "--rounds", "1", "--dream-steps", "2", "--out",
                        str(out), timeout=600)
    assert result.returncode == 0, result.stderr
    runs = json.loads((out / "runs.json").read_text())
    assert [(r["variant"], r["aggregator"], set(r["final"])) for r in runs] == [
        ("homogeneous", "secagg", {"codream"})]
