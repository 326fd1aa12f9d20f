"""Leakage (a): a copied training image is caught, and the tiny end-to-end section is complete."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from codream_secure.audit.leakage import dreams_vs_data as section
from codream_secure.audit.leakage.dreams_vs_data import METRICS, gap_rows, similarity_table
from codream_secure.audit.reporting import SectionResult, write_report


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1)


@pytest.fixture
def sets() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smooth random 'digits' (so SSIM is meaningful): train 40, held-out 20, dreams 12."""
    rng = np.random.default_rng(0)
    base = rng.random((72, 1, 4, 4)).repeat(2, axis=2).repeat(2, axis=3)  # 8x8, blocky
    x = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
    return x[:40], x[40:60], x[60:]


def test_a_dream_that_copies_a_training_image_is_caught(sets):
    train, heldout, dreams = sets
    # one seed for both tables: the same train subsets, so only the added dream differs
    before = similarity_table(dreams, train, heldout, _flat, subsamples=20,
                              rng=np.random.default_rng(1))
    copied = np.concatenate([dreams, train[[3]]])
    after = similarity_table(copied, train, heldout, _flat, subsamples=20,
                             rng=np.random.default_rng(1))
    for key, values in before.items():
        np.testing.assert_array_equal(after[key][:-1], values)
    assert after["psnr_train_full"][-1] == math.inf
    assert after["ssim_train_full"][-1] == 1.0
    assert after["cosine_train_full"][-1] == pytest.approx(1.0)
    assert np.all(np.isfinite(after["psnr_train_full"][:-1]))
    rng = np.random.default_rng(2)
    rows_before = gap_rows(before, "dreams", resamples=500, rng=rng)
    rows_after = gap_rows(after, "dreams", resamples=500, rng=rng)
    for b, a in zip(rows_before, rows_after, strict=True):
        # the copy sits in about half of the 20-of-40 subsets, where it scores 60 dB / SSIM 1
        assert a["gap"] > b["gap"], a["metric"]
        assert a["exact_copies"] == 1 and b["exact_copies"] == 0
    assert rows_after[0]["max_train_full"] == math.inf


def test_gap_is_paired_per_query_and_capped(sets):
    train, heldout, _ = sets
    rng = np.random.default_rng(2)
    # queries that ARE held-out images: their held-out PSNR is inf, capped at 60 dB -> gap < 0
    table = similarity_table(heldout[:5], train, heldout, _flat, subsamples=3, rng=rng)
    rows = {r["metric"]: r for r in gap_rows(table, "heldout", resamples=200, rng=rng)}
    assert rows["psnr"]["mean_heldout"] == 60.0
    assert rows["psnr"]["gap"] == pytest.approx(rows["psnr"]["mean_train"] - 60.0)
    assert rows["psnr"]["ci95_high"] < 0 and rows["ssim"]["ci95_high"] < 0
    assert [r["metric"] for r in gap_rows(table, "x", resamples=10, rng=rng)] == list(METRICS)


def test_similarity_table_refuses_a_held_out_set_larger_than_the_union(sets):
    train, heldout, dreams = sets
    with pytest.raises(ValueError):
        similarity_table(dreams, heldout, train, _flat, subsamples=2,
                         rng=np.random.default_rng(0))


def test_tiny_section_end_to_end(tmp_path):
    result = section.run(section.TINY, tmp_path)
    assert isinstance(result, SectionResult) and result.name == "leakage_dreams"
    assert result.seconds > 0 and result.notes
    n = result.summary["dreams"]
    assert n == section.TINY.dream_batch
    assert result.summary["reference_size"] == section.TINY.max_reference
    assert result.summary["ssim_window"] == {"size": 5, "sigma": pytest.approx(1.5 * 5 / 11)}
    for metric in METRICS:
        lo, hi = result.summary[f"{metric}_gap_ci95"]
        assert lo <= result.summary[f"{metric}_gap"] <= hi
    assert len(result.rows) == 9  # 3 sets x 3 metrics
    control = [r for r in result.rows if r["set"] == "control: training images"]
    assert all(r["exact_copies"] == r["n"] for r in control)  # copies are always found
    assert len(result.arrays["per_dream"]) == n
    assert result.arrays["released_dreams"].shape == (n, 64)
    dreams = result.arrays["released_dreams"]
    assert 0.0 <= dreams.min() <= dreams.max() <= 1.0
    for name in result.figures:
        assert (tmp_path / name).stat().st_size > 0
    out = write_report(tmp_path / "report", benchmark="leakage", config={}, seeds=[0],
                       sections=[result])
    saved = json.loads((out / "report.json").read_text())["sections"]["leakage_dreams"]
    assert saved["rows"][-3]["max_train_full"] == "inf"  # JSON-safe infinity
