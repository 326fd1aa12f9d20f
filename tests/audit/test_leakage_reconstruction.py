"""Leakage (b): scores on constructed views, the n = 2 collusion identity, the tiny section."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from codream_secure.audit.leakage import reconstruction as section
from codream_secure.audit.leakage.metrics import to_unit_pixels
from codream_secure.audit.leakage.reconstruction import (
    Estimates,
    ServerView,
    Truth,
    attack,
    estimate,
    make_truth,
    score,
    summarise,
)
from codream_secure.audit.reporting import SectionResult, write_report
from codream_secure.errors import ConfigError

MEAN, STD = (0.3,), (0.4,)


def _truth(sizes=(10, 12, 14), classes: int = 4) -> Truth:
    """Clients whose images and labels differ: client k draws mostly class k, brighter with k."""
    rng = np.random.default_rng(0)
    images, hists = [], []
    for k, size in enumerate(sizes):
        images.append(np.clip(rng.random((size, 1, 8, 8)) * 0.5 + 0.15 * k, 0, 1))
        labels = np.where(rng.random(size) < 0.8, k, rng.integers(0, classes, size))
        hists.append(np.bincount(labels, minlength=classes))
    return Truth([], [], np.stack(hists), np.stack([im.mean(0) for im in images]), images,
                 MEAN, STD)


def test_an_attack_fed_the_true_data_scores_perfectly():
    truth = _truth()
    est = Estimates([0, 1, 2], truth.histograms / truth.histograms.sum(1, keepdims=True),
                    truth.mean_images, list(truth.images01))
    rows = score(est, truth, subsamples=2, rng=np.random.default_rng(0))
    for r in rows:
        assert r["label_tv_own"] == 0.0 and r["label_attributed"]
        assert r["mean_image_rmse_own"] == 0.0 and r["mean_image_attributed"]
        assert r["nn_ssim_own"] == 1.0  # own set is the smaller one: used whole, copies found
        assert r["nn_ssim_others"] < 1.0
    table = summarise(rows, n=3, mode="oracle")
    assert table["label_attribution"] == table["mean_image_attribution"] == 1.0
    assert table["label_tv_gap"] > 0 and table["mean_image_rmse_gap"] > 0
    assert table["nn_ssim_gap"] > 0 and table["attribution_chance"] == pytest.approx(1 / 3)


def test_an_aggregate_view_attributes_at_chance_and_has_zero_gaps():
    """One estimate for everyone: exactly one client is nearest, and own = others on average."""
    truth = _truth()
    dreams = np.random.default_rng(1).normal(size=(6, 1, 8, 8))
    probs = np.random.default_rng(2).dirichlet(np.ones(4), size=6)
    view = ServerView("secagg", 3, [dreams], [probs], [None])
    est = estimate(view, MEAN, STD)
    assert est.clients == [0, 1, 2]
    assert np.all(est.histograms == est.histograms[0])
    table = summarise(score(est, truth, subsamples=2, rng=np.random.default_rng(0)), n=3,
                      mode="secagg")
    assert table["label_attribution"] == pytest.approx(1 / 3)
    assert table["mean_image_attribution"] == pytest.approx(1 / 3)
    assert table["label_tv_gap"] == pytest.approx(0.0, abs=1e-12)
    assert table["mean_image_rmse_gap"] == pytest.approx(0.0, abs=1e-12)


def test_estimate_reads_only_the_view():
    dreams = np.random.default_rng(3).normal(size=(5, 1, 8, 8))
    probs = np.eye(4)[[0, 0, 1, 3, 3]]
    est = estimate(ServerView("plain-active", 2, [dreams], [probs], [1]), MEAN, STD)
    assert est.clients == [1]
    np.testing.assert_allclose(est.histograms[0], [0.4, 0.2, 0.0, 0.4])
    np.testing.assert_allclose(est.mean_images[0], to_unit_pixels(dreams, MEAN, STD).mean(0))


@pytest.mark.parametrize("protocol", ["plain", "secagg"])
def test_dp_view_carries_noise_of_the_stated_scale(protocol):
    """What the server receives of zero vectors is pure noise of SD z C sqrt(m / t).

    m vectors are in one release (1 under plain, n under SecAgg), each with variance (zC)^2/t.
    20k coordinates estimate an SD to ~0.5%; 3% is over 5 SE.
    """
    s = dataclasses.replace(section.TINY, dp_noise_multiplier=0.5)
    n, length, clip = 3, 20_000, 2.0
    spec = section.dp_spec(s, protocol, n, clip)
    assert spec.min_contributors == (1 if protocol == "plain" else 3)
    channel = section.open_channel(protocol, n, clip=8.0, length=length, seed=(0,), dp=spec)
    members = [0] if protocol == "plain" else [0, 1, 2]
    seen, _ = channel.sum({k: np.zeros(length, np.float32) for k in members})
    expected = 0.5 * clip * np.sqrt(len(members) / spec.min_contributors)
    assert seen.std() == pytest.approx(expected, rel=0.03)
    # a large vector is clipped to L2 norm C before the noise goes on: with z = 1e-3 the noise
    # on the coordinate sum (SD ~ 1e-3 C sqrt(length) ~ 0.3) is 0.1% of the clipped sum (283)
    quiet = section.dp_spec(dataclasses.replace(s, dp_noise_multiplier=1e-3), protocol, n, clip)
    channel = section.open_channel(protocol, n, clip=8.0, length=length, seed=(1,), dp=quiet)
    seen, _ = channel.sum({k: np.full(length, 5.0, np.float32) for k in members})
    assert seen.sum() == pytest.approx(len(members) * clip * np.sqrt(length), rel=0.01)


@pytest.fixture(scope="module")
def two_clients() -> Truth:
    return make_truth(section.TINY, 2)


def test_with_two_clients_the_sum_minus_one_input_is_the_other(two_clients):
    """Server + client 0 under SecAgg reach client 1's private DeepInversion, as under plain.

    Both start from the same batch; the only difference is SecAgg's fixed-point rounding
    (about 2^-26 per coordinate here). Adam's normalised step could turn it into up to lr = 0.05
    on a coordinate whose gradient is near zero; in these 3 seeded steps none does (measured:
    mean 8e-9, max 4e-7), so 1e-3 leaves room and still fails on any real difference.
    """
    colluding = attack(section.TINY, two_clients, "secagg+collude")
    plain = attack(section.TINY, two_clients, "plain-active")
    assert colluding.targets == [1]
    diff = np.abs(colluding.dreams[0] - plain.dreams[1])
    assert diff.max() < 1e-3
    np.testing.assert_allclose(colluding.labels[0], plain.labels[1], atol=1e-5)


def test_secure_view_holds_one_aggregate_and_passive_one_entry_per_client(two_clients):
    secure = attack(section.TINY, two_clients, "secagg")
    assert secure.targets == [None] and len(secure.dreams) == 1
    np.testing.assert_allclose(secure.labels[0].sum(axis=1), 1.0, atol=1e-4)  # mean of probs
    passive = attack(section.TINY, two_clients, "plain-passive")
    assert passive.targets == [0, 1]
    np.testing.assert_array_equal(passive.dreams[0], passive.dreams[1])  # one common batch


def test_bad_modes_are_refused(tmp_path, two_clients):
    with pytest.raises(ConfigError):
        section.run(dataclasses.replace(section.TINY, modes=("telepathy",)), tmp_path)
    three = make_truth(dataclasses.replace(section.TINY, warmup_epochs=0), 3)
    with pytest.raises(ConfigError):
        attack(section.TINY, three, "secagg+collude")


def test_tiny_section_end_to_end(tmp_path):
    result = section.run(section.TINY, tmp_path)
    assert isinstance(result, SectionResult) and result.name == "leakage_reconstruction"
    assert result.seconds > 0 and result.notes
    modes = len(section.TINY.modes)
    assert len(result.rows) == modes + (modes - 1)  # n = 2 and n = 3; collusion only at n = 2
    for row in result.rows:
        if row["mode"].startswith("secagg") and row["mode"] != "secagg+collude":
            assert row["label_attribution"] == pytest.approx(1 / row["n"])
            assert row["label_tv_gap"] == pytest.approx(0.0, abs=1e-12)
        assert row["attribution_chance"] == pytest.approx(1 / row["n"])
        aggregate = [r for r in result.rows if r["n"] == row["n"] and r["mode"] == "secagg"]
        assert row["nn_ssim_gap_chance"] == aggregate[0]["nn_ssim_gap"]
    assert len(result.arrays["per_client"]) == sum(r["clients_attacked"] for r in result.rows)
    assert {v["mode"] for v in result.arrays["server_views"]} == set(section.TINY.modes)
    for name in result.figures:
        assert (tmp_path / name).stat().st_size > 0
    out = write_report(tmp_path / "report", benchmark="leakage", config={}, seeds=[0],
                       sections=[result])
    saved = json.loads((out / "report.json").read_text())
    assert len(saved["sections"]["leakage_reconstruction"]["rows"]) == len(result.rows)
