"""Overhead suite: power-law fits, expansion and error on constructed cases, rows, the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codream_secure.audit.overhead import scaling
from codream_secure.audit.overhead.scaling import (
    Aggregator,
    CallResult,
    DPOption,
    Point,
    Timed,
    aggregator_table,
    dropout_set,
    expansion,
    fit_power_law,
    max_abs_error,
)
from codream_secure.audit.overhead.suite import TINY, measure_grid, run_overhead
from protocols import api, registry
from protocols.plan import majority_threshold

ROW_FIELDS = {
    "aggregator", "system", "protocol", "dp", "dp_sigma", "n", "m", "dropout_rate",
    "dropout_stage", "dropped", "repeats", "included", "degree", "threshold", "client_s",
    "server_s", "wall_s", "cpu_s", "bytes_up", "bytes_down", "expansion_up", "expansion_down",
    "max_abs_error", "error_bound", "wall_vs_plain",
}


@settings(max_examples=50, deadline=None)
@given(a=st.floats(-2.0, 3.0), c=st.floats(1e-6, 1e6))
def test_fit_recovers_the_exponent_of_an_exact_power_law(a, c):
    x = 2.0 ** np.arange(4, 12)
    fit = fit_power_law(x, c * x**a)
    assert fit.exponent == pytest.approx(a, abs=1e-9)
    assert fit.coefficient == pytest.approx(c, rel=1e-8)
    assert fit.points == 8
    if abs(a) > 0.01:  # for a ~ 0 log y is flat and r2 is rounding noise over rounding noise
        assert fit.r2 == pytest.approx(1.0, abs=1e-9)


def test_fit_recovers_the_exponent_under_multiplicative_noise():
    rng = np.random.default_rng(3)
    x = np.logspace(1, 4, 40)
    y = 0.5 * x**1.5 * np.exp(rng.normal(0, 0.1, x.size))
    # slope std error = 0.1 / (std(log x) * sqrt(40)) ~ 0.008 here; 0.05 is over 6 of them
    assert fit_power_law(x, y).exponent == pytest.approx(1.5, abs=0.05)


def test_fit_leaves_out_non_positive_points_and_needs_two_distinct_x():
    assert fit_power_law([1, 2, 4, 8], [0.0, 2.0, 8.0, 32.0]).exponent == pytest.approx(2.0)
    assert fit_power_law([1, 2, 4], [0.0, 0.0, 3.0]).points == 1
    assert math.isnan(fit_power_law([4, 4], [1.0, 2.0]).exponent)


def test_expansion_counts_float32_bytes_of_the_plaintext():
    assert expansion(4 * 1000, 1000) == 1.0
    assert expansion(6 * 1000, 1000) == 1.5
    assert expansion(8 * 1024, 1024) == 2.0  # an int64 upload, as Flower sends


def test_max_abs_error_compares_with_the_exact_sum_of_the_included_clients():
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    exact = vectors[[0, 2]].astype(np.float64).sum(0)
    total = exact.copy()
    total[1] += 0.25
    total[3] -= 0.5
    assert max_abs_error(total, vectors, (0, 2)) == 0.5
    assert max_abs_error(vectors.sum(0), vectors, (0, 1, 2)) == 0.0


def _constructed(vectors: np.ndarray, point: Point) -> CallResult:
    """Clients 0 and 2 are included; client 1 sent 5 bytes and dropped."""
    total = vectors[[0, 2]].astype(np.float64).sum(0)
    total[0] += 0.125
    return CallResult(total, (0, 2), np.array([800, 5, 1600]), np.array([40, 0, 80]),
                      np.array([0.3, 9.0, 0.1]), 0.7, 2, 2, 1.0)


def test_row_reduces_to_medians_and_per_included_client_bytes():
    agg = Aggregator("fake", "test", "secagg", _constructed)
    vectors = np.ones((3, 100), np.float32)
    timed = Timed()
    for _ in range(3):
        timed.add(agg, vectors, Point(3, 100, 0.0, "upload", (1,), 1.0, 0))
    row = timed.row()
    assert row["repeats"] == 3 and row["included"] == 2
    assert row["bytes_up"] == 1200.0 and row["bytes_down"] == 60.0  # clients 0 and 2 only
    assert row["expansion_up"] == 1200.0 / 400 and row["expansion_down"] == 60.0 / 400
    assert row["client_s"] == pytest.approx(0.2) and row["server_s"] == 0.7
    assert row["max_abs_error"] == 0.125 and row["error_bound"] == 1.0


def test_dropout_set_is_seeded_sized_and_leaves_two_clients():
    assert dropout_set(10, 0.3, 0) == dropout_set(10, 0.3, 0)
    assert len(dropout_set(10, 0.3, 0)) == 3 and dropout_set(10, 0.0, 0) == ()
    assert len(dropout_set(4, 0.9, 1)) == 2
    assert set(dropout_set(50, 0.2, 5)) <= set(range(50))


def test_grid_rows_have_every_field_and_right_costs_for_plain_and_secagg():
    table, notes = aggregator_table(("plain", "secagg", "secagg+", "no-such"), flower=False)
    assert [a.name for a in table] == ["plain", "secagg", "secagg+"]
    assert any("no-such" in note for note in notes)
    # n=6 with 2 dropped: every survivor keeps 3 live share holders, the threshold
    rows, failures = measure_grid(table, [(6, 64, 0.0), (6, 64, 1 / 3)], TINY, section="t")
    assert not failures and len(rows) == 6
    for row in rows:
        assert set(row) >= ROW_FIELDS, ROW_FIELDS - set(row)
        assert row["included"] == 6 - row["dropped"]  # stage "upload": the dropped are left out
        assert row["max_abs_error"] <= max(row["error_bound"], 1e-5)
    plain = [r for r in rows if r["aggregator"] == "plain"]
    assert all(r["expansion_up"] == 1.0 and r["max_abs_error"] == 0.0 for r in plain)
    assert {r["dropped"] for r in rows} == {0, 2}
    secagg = [r for r in rows if r["aggregator"] == "secagg"]
    assert all(r["expansion_up"] > 1.0 and r["wall_vs_plain"] > 0 for r in secagg)


def test_capped_aggregators_run_at_their_cap_once():
    fake = Aggregator("capped", "test", "plain", _constructed, max_n=3, max_m=100, repeats=1)
    rows, _ = measure_grid([fake], [(3, 200, 0.0), (5, 200, 0.0)], TINY, section="t")
    assert [(r["n"], r["m"]) for r in rows] == [(3, 100)]


def test_dp_spec_sizes_distributed_noise_for_the_fewest_contributors():
    pytest.importorskip("protocols.dp.mechanisms")
    point = Point(10, 64, 0.0, "upload", (), 2.0, 0)
    spec = scaling.make_dp_spec(DPOption("distributed", 1.5), "secagg", point)
    assert spec.mode == "distributed" and spec.min_contributors == majority_threshold(10) + 1
    assert spec.l2_clip == pytest.approx(2.0 * 8)  # clip * sqrt(m): no input is scaled down
    central = scaling.make_dp_spec(DPOption("central", 1.5, l2_clip=3.0), "plain", point)
    assert central.central_sigma == pytest.approx(4.5)


def test_every_full_dp_variant_runs_once():
    # FULL's paillier + distributed DP variant must reach its first point, not only construct
    if "paillier" not in registry.names():
        pytest.skip("protocol 'paillier' not in this build")
    from codream_secure.audit.overhead.suite import FULL

    table, _ = aggregator_table(FULL.aggregators, dp_variants=FULL.dp_variants, flower=False,
                                paillier_caps=(3, 64, 1))
    assert len(table) == len(FULL.aggregators) + len(FULL.dp_variants)
    rows, failures = measure_grid(table, [(3, 64, 0.0)], TINY, section="t")
    assert not failures, failures
    private = [r for r in rows if r["aggregator"] == "paillier +dp-distributed"]
    assert len(private) == 1 and private[0]["threshold"] == majority_threshold(3)


def test_dp_variants_join_the_table_when_secure_sum_takes_dp(monkeypatch):
    pytest.importorskip("protocols.dp.mechanisms")
    seen = []

    def fake_secure_sum(vectors, *, dp=None, **kwargs):
        seen.append(dp)
        return api.secure_sum(vectors, **kwargs)

    monkeypatch.setattr(scaling, "secure_sum", fake_secure_sum)
    table, _ = aggregator_table(("secagg",), dp_variants=(("secagg", "distributed"),),
                                flower=False)
    assert [a.name for a in table] == ["secagg", "secagg +dp-distributed"]
    rows, _ = measure_grid(table, [(3, 16, 0.0)], TINY, section="t")
    assert rows[1]["dp"] == "distributed" and rows[1]["dp_sigma"] == pytest.approx(8.0 * 4)
    assert seen[0] is None and seen[1].min_contributors == majority_threshold(3) + 1


@pytest.mark.slow
def test_tiny_run_writes_the_report_rows_fits_and_plots(tmp_path):
    out = run_overhead(TINY, tmp_path / "overhead")
    report = json.loads((out / "report.json").read_text())
    assert report["benchmark"] == "overhead" and report["config"]["name"] == "tiny"
    assert report["seeds"] == {"inputs": 0, "dropouts": 0, "codream": 0}
    assert {"versions", "git_revision", "machine"} <= set(report["environment"])
    sections = report["sections"]
    assert set(sections) == {"scaling_n", "scaling_m", "dropout", "codream_round"}
    for name in ("scaling_n", "scaling_m", "dropout"):
        rows = sections[name]["rows"]
        assert {"plain", "secagg", "secagg+"} <= {r["aggregator"] for r in rows}
        for row in rows:
            assert set(row) >= ROW_FIELDS, (name, ROW_FIELDS - set(row))
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for x in ("n", "m"):
        rows = sections[f"scaling_{x}"]["rows"]
        assert all(f"exp_{k}" in r and f"exp_tail_{k}" in r
                   for r in rows for k in ("client_s", "server_s", "bytes_up"))
        plain_m = [r for r in rows if r["aggregator"] == "plain"]
        if x == "m":  # plain uploads exactly 4 bytes per element: exponent 1
            assert plain_m[0]["exp_bytes_up"] == pytest.approx(1.0)
        assert (out / f"scaling_{x}_fits.csv").is_file()
    rounds = {r["variant"]: r for r in sections["codream_round"]["rows"]}
    assert set(rounds) == {"plain", "secagg"}
    assert rounds["plain"]["wall_s_vs_plain"] == 1.0 and rounds["plain"]["rounds_measured"] == 1
    assert rounds["secagg"]["bytes_up_vs_plain"] > 1.0  # masked uploads carry key material
    assert rounds["plain"]["max_abs_error_vs_plain"] == 0.0
    assert rounds["secagg"]["max_abs_error_vs_plain"] > 0.0  # fixed-point rounding
    assert (out / "codream_round_session_step.csv").is_file()
    assert (out / "codream_round_rounds.csv").is_file()
    if any(r["system"] == "flower 1.42" for r in sections["scaling_n"]["rows"]):
        flower = [r for r in sections["scaling_n"]["rows"] if r["system"] == "flower 1.42"]
        assert all(r["expansion_up"] > 1.5 for r in flower)  # int64 uploads: ~2x float32


@pytest.mark.slow
def test_paillier_rows_when_the_protocol_exists():
    if "paillier" not in registry.names():
        pytest.skip("protocol 'paillier' not in this build")
    table, _ = aggregator_table(("paillier",), flower=False, paillier_caps=(3, 64, 1))
    rows, failures = measure_grid(table, [(3, 64, 0.0)], TINY, section="t")
    assert not failures, failures
    assert rows[0]["aggregator"] == "paillier" and rows[0]["expansion_up"] > 1.0
    assert rows[0]["max_abs_error"] <= max(rows[0]["error_bound"], 1e-5)
