"""The class-aware teacher, label-conditioned dreams, BatchNorm re-estimation and the KD gate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from codream_secure.config import SimulationConfig
from codream_secure.distill import distill, recalibrate_batchnorm
from codream_secure.dreams import DreamLossWeights, DreamTargets, dream_gradient
from codream_secure.federation import AggregationChannel, CoDreamFederation
from codream_secure.models import build_model
from codream_secure.simulation import run_simulation
from codream_secure.teacher import (
    class_shares,
    class_weighted_teacher,
    draw_targets,
    teacher_quality,
)
from tests.core.tiny_runs import TINY

histograms = st.lists(st.lists(st.integers(0, 500), min_size=5, max_size=5), min_size=2,
                      max_size=8).map(lambda rows: np.array(rows, dtype=np.float64))


@settings(max_examples=200, deadline=None)
@given(histograms)
def test_class_shares_of_all_clients_sum_to_one_for_every_class_someone_holds(counts):
    pooled = counts.sum(axis=0)
    shares = np.stack([class_shares(row, pooled) for row in counts])
    assert ((shares >= 0) & (shares <= 1)).all()
    np.testing.assert_allclose(shares.sum(axis=0), np.where(pooled > 0, 1.0, 0.0), atol=1e-12)


def test_class_weighted_teacher_follows_the_client_that_knows_the_class():
    # client 0 holds only class 0, client 1 only class 1; both predict the opposite class
    pooled = np.array([10.0, 10.0, 0.0])
    shares = [class_shares(np.array([10.0, 0.0, 0.0]), pooled),
              class_shares(np.array([0.0, 10.0, 0.0]), pooled)]
    probs = [np.array([[0.2, 0.8, 0.0]]), np.array([[0.7, 0.3, 0.0]])]
    released = sum(np.concatenate([(p * a).reshape(-1), a])
                   for p, a in zip(probs, shares, strict=True))
    teacher = class_weighted_teacher(released, 1, 3)
    # class 0 from client 0 (0.2), class 1 from client 1 (0.3): renormalised 0.4 / 0.6
    np.testing.assert_allclose(teacher, [[0.4, 0.6, 0.0]], atol=1e-12)
    np.testing.assert_allclose(np.mean(probs, axis=0), [[0.45, 0.55, 0.0]])  # the plain mean


@settings(max_examples=100, deadline=None)
@given(histograms, st.integers(0, 2**32 - 1), st.data())
def test_dropped_clients_leave_an_exact_per_class_normalisation(counts, seed, data):
    rng = np.random.default_rng(seed)
    pooled = counts.sum(axis=0)
    n, classes, dreams = counts.shape[0], counts.shape[1], 4
    included = data.draw(st.sets(st.integers(0, n - 1), min_size=1))
    probs = {k: rng.dirichlet(np.ones(classes), size=dreams) for k in range(n)}
    shares = {k: class_shares(counts[k], pooled) for k in range(n)}
    released = sum(np.concatenate([(probs[k] * shares[k]).reshape(-1), shares[k]])
                   for k in included)
    teacher = class_weighted_teacher(released, dreams, classes)
    # the reference: weights renormalised over the included clients, column by column
    weight = np.stack([shares[k] for k in sorted(included)])
    mass = weight.sum(axis=0)
    expected = np.zeros((dreams, classes))
    for c in range(classes):
        if mass[c] > 1e-6:
            expected[:, c] = sum(weight[i, c] * probs[k][:, c]
                                 for i, k in enumerate(sorted(included))) / mass[c]
    rows = expected.sum(axis=1, keepdims=True)
    expected = np.where(rows > 0, expected / np.where(rows > 0, rows, 1), 1 / classes)
    np.testing.assert_allclose(teacher, expected, atol=1e-9)
    np.testing.assert_allclose(teacher.sum(axis=1), 1.0, atol=1e-9)


@pytest.mark.parametrize("aggregator", ["secagg", "secagg+", "paillier"])
def test_a_secure_class_weighted_release_matches_the_plain_one(aggregator):
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 50, size=(4, 10)).astype(np.float64)
    pooled = counts.sum(axis=0)
    vectors = {k: np.concatenate([(rng.dirichlet(np.ones(10), size=8)
                                   * class_shares(counts[k], pooled)).reshape(-1),
                                  class_shares(counts[k], pooled)]).astype(np.float32)
               for k in range(4)}
    secure = AggregationChannel(aggregator, 4, clip=1.0, ring_bits=32, expected_dropout=0.0,
                                key_bits=2048)
    secure.open(8 * 10 + 10, seed=("teacher",))
    total, included = secure.sum(vectors)
    plain = np.sum(list(vectors.values()), axis=0, dtype=np.float64)
    assert included == frozenset(range(4))
    assert np.abs(total - plain).max() <= secure.error_bound
    np.testing.assert_allclose(class_weighted_teacher(total, 8, 10),
                               class_weighted_teacher(plain, 8, 10), atol=1e-5)


def test_targets_follow_the_pooled_histogram_and_skip_absent_classes():
    gen = torch.Generator().manual_seed(0)
    targets = draw_targets(np.array([0.0, 300.0, 100.0]), 4000, gen)
    counts = torch.bincount(targets, minlength=3).tolist()
    assert counts[0] == 0
    assert abs(counts[1] / 4000 - 0.75) < 0.03  # 0.75 +- 4.4 binomial standard deviations


def test_a_client_without_the_target_class_does_not_pull_the_dream_towards_it():
    torch.manual_seed(0)
    model = build_model("smallcnn", input_shape=(1, 8, 8), num_classes=3).eval()
    x = torch.randn(2, 1, 8, 8)
    only_pred = DreamLossWeights(tv=0.0, l2=0.0, bn=0.0)
    labels = torch.tensor([0, 0])
    absent = DreamTargets(labels, torch.tensor([0.0, 1.0, 1.0]))
    present = DreamTargets(labels, torch.tensor([1.0, 1.0, 1.0]))
    assert torch.count_nonzero(dream_gradient(model, x, only_pred, use_bn_statistics=False,
                                              targets=absent)) == 0
    assert torch.count_nonzero(dream_gradient(model, x, only_pred, use_bn_statistics=False,
                                              targets=present)) > 0


def test_teacher_quality_known_values():
    teacher = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    members = [torch.tensor([[0.9, 0.1], [0.8, 0.2]]), torch.tensor([[0.1, 0.9], [0.6, 0.4]])]
    quality = teacher_quality(teacher, members, targets=torch.tensor([0, 1]))
    assert quality["max_probability"] == pytest.approx(0.75)
    assert quality["entropy"] == pytest.approx(np.log(2) / 2, abs=1e-6)
    assert quality["client_agreement"] == pytest.approx(0.75)  # 2/2 and 1/2
    assert quality["target_reached"] == pytest.approx(0.5)  # argmax of a tie is class 0


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("smallcnn", input_shape=(1, 8, 8), num_classes=3)


def test_recalibration_sets_the_first_layers_statistics_to_those_of_the_data():
    model = _bn_model()
    x = 3.0 + 2.0 * torch.randn(200, 1, 8, 8)
    recalibrate_batchnorm(model, x, batch_size=200)  # one batch: exact statistics
    conv, bn = model.features[0], model.features[1]
    with torch.no_grad():
        features = conv(x)
    np.testing.assert_allclose(bn.running_mean, features.mean(dim=(0, 2, 3)), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(bn.running_var, features.var(dim=(0, 2, 3)), rtol=1e-4)
    assert bn.momentum == 0.1  # restored


def test_recalibration_does_not_touch_weights_and_leaves_modes_as_they_were():
    model = _bn_model().eval()
    before = {k: v.clone() for k, v in model.named_parameters()}
    recalibrate_batchnorm(model, torch.randn(50, 1, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    assert not any(m.training for m in model.modules())


def test_frozen_batchnorm_distillation_leaves_the_running_statistics_alone():
    dreams, teacher = torch.randn(32, 1, 8, 8) * 5, torch.full((32, 3), 1 / 3)
    stats = {}
    for mode in ("frozen", "batch"):
        model = _bn_model()
        recalibrate_batchnorm(model, torch.randn(64, 1, 8, 8))
        before = model.features[1].running_var.clone()
        distill(model, dreams, teacher, epochs=1, lr=0.01, batch_size=16, teacher_kind="probs",
                generator=torch.Generator().manual_seed(0), batchnorm=mode)
        stats[mode] = torch.equal(before, model.features[1].running_var)
    assert stats == {"frozen": True, "batch": False}


def test_the_validation_gate_restores_a_client_whose_validation_accuracy_dropped(tmp_path,
                                                                                monkeypatch):
    from codream_secure import member

    def ruinous(model, *args, **kwargs):  # distillation that wrecks every model
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-3.0)
        return {}

    monkeypatch.setattr(member, "distill", ruinous)
    runs = {}
    for gate in ("validation", "off"):
        config_keys = {**TINY, "rounds": 1, "local_epochs": 0, "baselines": (), "kd_gate": gate,
                       "out": str(tmp_path / gate)}
        runs[gate] = run_simulation(SimulationConfig.from_keys(**config_keys)).report
    gated, open_ = runs["validation"]["rounds"][1]["kd"], runs["off"]["rounds"][1]["kd"]
    assert gated["kept"] == [after >= before for after, before
                             in zip(gated["val_after"], gated["val_before"], strict=True)]
    assert not all(gated["kept"])  # the control: ruinous distillation did drop accuracy
    kept_val = runs["validation"]["rounds"][1]["codream"]["val"]
    assert all(v >= b - 1e-12 for v, b in zip(kept_val, gated["val_before"], strict=True))
    assert all(open_["kept"])  # without the gate everyone keeps the ruined weights
    assert np.mean(runs["off"]["rounds"][1]["codream"]["val"]) < np.mean(kept_val)


def test_a_class_aware_run_releases_the_histogram_once_and_reports_the_teacher(tmp_path):
    config = SimulationConfig.from_keys(**{**TINY, "baselines": (), "teacher": "class-aware",
                                           "dream_objective": "label", "aggregator": "secagg",
                                           "out": str(tmp_path / "run")})
    calls = []
    real_release = CoDreamFederation.release_histogram

    def counted(self):
        calls.append(1)
        return real_release(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CoDreamFederation, "release_histogram", counted)
        report = run_simulation(config).report
    assert len(calls) == 1
    for record in report["rounds"][1:]:
        assert 0 < record["teacher"]["max_probability"] <= 1
        assert 0 <= record["teacher"]["target_reached"] <= 1
        assert len(record["kd"]["test_before"]) == len(record["kd"]["clients"])
    assert report["rounds"][0]["teacher"] == {}


@pytest.mark.slow
def test_with_the_gate_distillation_never_costs_digits_clients_validation_accuracy(tmp_path):
    """The default digits run over three rounds: with the validation gate no round ends more
    than a point (mean over clients) below its pre-distillation validation accuracy; without
    it, the first rounds' distillation does (the control)."""
    drops = {}
    for gate in ("validation", "off"):
        config = SimulationConfig.from_keys(rounds=3, baselines=(), kd_gate=gate, threads=1,
                                            out=str(tmp_path / gate))
        report = run_simulation(config).report
        kd_rounds = [r for r in report["rounds"] if r["kd"]]
        assert len(kd_rounds) == 3
        after = "codream" if gate == "validation" else "kd"
        drops[gate] = [np.mean(r["kd"]["val_before"]) - np.mean(
            r["codream"]["val"] if after == "codream" else r["kd"]["val_after"])
            for r in kd_rounds]
    assert max(drops["validation"]) <= 0.01, drops
    assert max(drops["off"]) > 0.01, drops  # distillation alone does cost accuracy early on
