"""The consistency-round benchmark runs end to end and reports both threat models."""

from __future__ import annotations

import json

from benchmarks.consistency_cost import main, measure


def test_a_quick_run_writes_both_models_and_active_costs_more_bytes(tmp_path):
    result = main(["--quick", "--reps", "1", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "consistency_cost.json").read_text()) == result
    rows = {(r["n"], r["threat_model"]): r for r in result["rows"]}
    assert set(rows) == {(4, "semi-honest"), (4, "active"), (30, "semi-honest"), (30, "active")}
    for n in (4, 30):
        # the round adds a request and one 32-byte token per neighbour to every survivor
        assert rows[(n, "active")]["bytes_up"] > rows[(n, "semi-honest")]["bytes_up"]
    assert rows[(30, "active")]["included"] == 30  # late dropouts still count


def test_measure_takes_the_median_of_each_model():
    rows = measure([(3, 16, 0)], reps=3)
    assert [r["threat_model"] for r in rows] == ["semi-honest", "active"]
    assert all(r["reps"] == 3 and r["step_seconds"] > 0 for r in rows)
