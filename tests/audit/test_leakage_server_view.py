"""The server's view under SecAgg: uniformity tests with power, the tap, the colluders table."""

from __future__ import annotations

import numpy as np
import pytest

from codream_secure.audit.leakage import server_view as sv
from codream_secure.audit.reporting import write_report
from protocols.api import SecAggSession

# Uniform words: each p-value is U(0, 1) under H0, so four tests at 1e-6 flag a correct
# generator with probability 4e-6; the seeds are fixed anyway.
P_FLOOR = 1e-6


def test_uniform_words_pass_every_test():
    words = np.random.default_rng(0).integers(0, 2**32, 200_000, dtype=np.uint64)
    p = sv.uniformity_tests(words)
    assert set(p) == {"chi2_low_byte_p", "chi2_high_byte_p", "chi2_top10bits_p", "ks_uniform_p"}
    assert min(p.values()) > P_FLOOR


def test_small_signed_values_fail_the_high_byte_top_bits_and_ks_tests():
    values = np.random.default_rng(1).normal(0, 2**20, 50_000).astype(np.int64)
    words = (values % 2**32).astype(np.uint64)  # two's complement, as the codec encodes
    p = sv.uniformity_tests(words)
    assert p["chi2_high_byte_p"] < 1e-100
    assert p["chi2_top10bits_p"] < 1e-100
    assert p["ks_uniform_p"] < 1e-100


def test_half_range_words_fail_the_high_byte_test():
    # a subtler control: uniform over [0, 2^31) — every low byte is fine, the top bit never set
    words = np.random.default_rng(2).integers(0, 2**31, 50_000, dtype=np.uint64)
    p = sv.uniformity_tests(words)
    assert p["chi2_low_byte_p"] > P_FLOOR
    assert p["chi2_high_byte_p"] < 1e-100 and p["ks_uniform_p"] < 1e-100


def test_signed_reads_twos_complement():
    words = np.array([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=np.uint32)
    np.testing.assert_array_equal(sv.signed(words), [0, 1, 2**31 - 1, -(2**31), -1])


def test_tap_records_one_masked_upload_per_client_and_step():
    session = SecAggSession(3, 50, clip=1.0, protocol="secagg")
    tap = sv.ServerTap(session)
    rng = np.random.default_rng(3)
    inputs = [{c: rng.uniform(-1, 1, 50) for c in range(3)} for _ in range(2)]
    sums = [session.step(step).total for step in inputs]
    assert [(u.step, u.client_id) for u in tap.uploads] == [(s, c) for s in (1, 2)
                                                             for c in range(3)]
    assert tap.words().shape == (300,) and tap.words(1).shape == (100,)
    assert tap.bytes_received > 300 * 4
    # the tap only watches: the sums still come out right
    for step, total in zip(inputs, sums, strict=True):
        np.testing.assert_allclose(total, sum(step.values()),
                                   atol=session.codec.error_bound(3))


def test_colluder_table_rules():
    rows = sv.colluder_table(sv.ServerViewSettings(table_clients=(2, 10, 100)))
    by = {(r["n"], r["protocol"]): r for r in rows}
    assert by[(2, "secagg")]["fewest"] == 1  # the other client plus the sum
    assert by[(10, "secagg")]["via_sum"] == 9
    assert by[(10, "secagg")]["active_via_fake_dropout"] == 5  # t = floor(9 / 2) + 1
    plus = by[(100, "secagg+")]
    assert plus["graph"] == "harary" and plus["degree_k"] < 99
    for r in rows:
        assert r["fewest"] == min(r["via_sum"], r["semi_honest_via_masks"],
                                  r["active_via_fake_dropout"])
        assert r["threshold_t"] <= r["degree_k"]


@pytest.mark.slow
def test_tiny_run_fills_the_section(tmp_path):
    result = sv.run(sv.TINY, tmp_path)
    s = result.summary
    assert result.name == "server_view" and result.seconds > 0
    assert s["uploads_recorded"] == sv.TINY.clients * sv.TINY.steps
    assert s["masked_min_uniformity_p"] > P_FLOOR and s["masked_rejected_tests"] == []
    assert {"chi2_high_byte_p", "ks_uniform_p"} <= set(s["control_rejected_tests"])
    # r of 3 x 1024 uniform words against anything is N(0, 1/1024): 0.2 is over 6 sd
    assert s["max_abs_r_masked_vs_encoded_input"] < 0.2
    assert s["min_r_control"] > 0.999
    assert s["n2_other_input_recovered"] is True
    for row in result.arrays["sum_route"]:
        assert row["isolated"] == (row["colluding_clients"] == row["n"] - 1)
    assert all(r["t_shares_recover"] and r["t_minus_1_refused"]
               for r in result.arrays["self_mask_threshold"])
    out = write_report(tmp_path, benchmark="leakage", config={}, seeds=[0], sections=[result])
    assert (out / "server_view_uniformity.csv").is_file()
