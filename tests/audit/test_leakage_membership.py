"""Membership-inference maths on constructed cases, and the section end to end on TINY."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from codream_secure.audit.leakage import membership
from codream_secure.audit.leakage import mia_metrics as mm
from codream_secure.audit.reporting import write_report


def _labels(n_pos: int, n_neg: int) -> np.ndarray:
    return np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]


# --- ROC, AUC, TPR at FPR ----------------------------------------------------------------------


def test_auc_of_a_perfect_separator_is_one_and_of_its_reverse_zero():
    scores = np.r_[np.linspace(5, 6, 50), np.linspace(0, 1, 70)]
    labels = _labels(50, 70)
    assert mm.auc(scores, labels) == 1.0
    assert mm.auc(-scores, labels) == 0.0


def test_auc_of_identical_distributions_is_one_half():
    rng = np.random.default_rng(1)
    n = 2000
    scores = rng.normal(size=2 * n)
    # Under H0 the AUC (Mann-Whitney U / n1 n2) has sd sqrt((n1 + n2 + 1) / (12 n1 n2)) = 0.0091;
    # 5 sd = 0.046 keeps a correct implementation inside with probability 1 - 6e-7.
    assert abs(mm.auc(scores, _labels(n, n)) - 0.5) < 0.046


def test_auc_of_all_ties_is_one_half():
    assert mm.auc(np.zeros(10), _labels(4, 6)) == 0.5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=40), st.data())
def test_auc_equals_the_mann_whitney_statistic_with_ties(values, data):
    labels = np.array(data.draw(st.lists(st.booleans(), min_size=len(values),
                                         max_size=len(values))))
    if labels.all() or not labels.any():
        labels[0] = not labels[0]
    scores = np.array(values, float)
    u = stats.mannwhitneyu(scores[labels], scores[~labels]).statistic
    assert mm.auc(scores, labels) == pytest.approx(u / (labels.sum() * (~labels).sum()))


def test_roc_curve_runs_from_origin_to_one_one():
    fpr, tpr, thresholds = mm.roc_curve(np.array([3.0, 2.0, 2.0, 1.0]), np.array([1, 0, 1, 0]))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.isinf(thresholds[0])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])


def test_tpr_at_fpr_on_a_constructed_case():
    non_members = np.arange(1000.0)  # distinct scores 0 .. 999
    members = np.r_[np.full(10, 5000.0), np.full(40, 994.5), np.full(50, -1.0)]
    scores, labels = np.r_[members, non_members], _labels(100, 1000)
    # FPR <= 0.1%: at most 1 false positive; only the 10 members at 5000 beat 999
    assert mm.tpr_at_fpr(scores, labels, 0.001) == pytest.approx(0.10)
    # FPR <= 1%: threshold 990 admits 10 false positives and the 50 members above 994
    assert mm.tpr_at_fpr(scores, labels, 0.01) == pytest.approx(0.50)


def test_tpr_at_fpr_is_not_resolvable_with_too_few_non_members():
    scores = np.r_[np.ones(10), np.zeros(999)]
    assert mm.tpr_at_fpr(scores, _labels(10, 999), 0.001) is None
    assert mm.tpr_at_fpr(scores, _labels(10, 999), 0.01) == 1.0


# --- Clopper-Pearson and the ε lower bound -----------------------------------------------------


def test_clopper_pearson_known_answers():
    lo, hi = mm.clopper_pearson(0, 10)
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-12)
    lo, hi = mm.clopper_pearson(10, 10)
    assert hi == 1 and lo == pytest.approx(0.025 ** (1 / 10), rel=1e-12)
    # R: binom.test(5, 10)$conf.int = 0.1870860 0.8129140
    lo, hi = mm.clopper_pearson(5, 10)
    assert (lo, hi) == (pytest.approx(0.1870860, abs=1e-7), pytest.approx(0.8129140, abs=1e-7))
    # R: binom.test(3, 100)$conf.int = 0.006229972 0.085176053
    lo, hi = mm.clopper_pearson(3, 100)
    assert (lo, hi) == (pytest.approx(0.006229972, abs=1e-8), pytest.approx(0.085176053, abs=1e-8))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.data())
def test_clopper_pearson_bounds_put_alpha_over_2_in_each_binomial_tail(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = mm.clopper_pearson(k, n, confidence=0.9)
    if k < n:  # P(X <= k | p = hi) = 0.05
        assert stats.binom.cdf(k, n, float(hi)) == pytest.approx(0.05, abs=1e-8)
    if k > 0:  # P(X >= k | p = lo) = 0.05
        assert stats.binom.sf(k - 1, n, float(lo)) == pytest.approx(0.05, abs=1e-8)


def test_epsilon_bound_of_identical_distributions_is_zero():
    rng = np.random.default_rng(2)
    scores, labels = rng.normal(size=4000), _labels(2000, 2000)
    assert mm.epsilon_lower_bound_split(scores, labels, delta=1e-5) == 0.0
    # the max over thresholds is not corrected for the choice, so allow a sliver
    assert mm.epsilon_lower_bound(scores, labels, delta=1e-5) < 0.1


def test_epsilon_bound_of_perfect_separation_is_the_clopper_pearson_limit():
    n, delta = 5000, 1e-5
    scores, labels = np.r_[np.ones(n), np.zeros(n)], _labels(n, n)
    u = 1 - 0.025 ** (1 / n)  # CP upper bound of 0 errors in n at 95% two-sided
    expected = math.log((1 - delta - u) / u)
    assert mm.epsilon_lower_bound(scores, labels, delta=delta) == pytest.approx(expected)
    assert expected > 7
    u_half = 1 - 0.025 ** (1 / (n // 2))
    assert mm.epsilon_lower_bound_split(scores, labels, delta=delta) == pytest.approx(
        math.log((1 - delta - u_half) / u_half))


def test_epsilon_bound_grows_with_separation():
    rng = np.random.default_rng(3)
    labels = _labels(3000, 3000)
    noise = rng.normal(size=6000)
    eps = [mm.epsilon_lower_bound_split(noise + shift * labels, labels, delta=1e-5)
           for shift in (0.0, 1.0, 3.0)]
    assert eps[0] == 0.0 < eps[1] < eps[2]


# --- LiRA ---------------------------------------------------------------------------------------


def test_logit_confidence_matches_the_definition_and_does_not_saturate():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(20, 5))
    labels = rng.integers(0, 5, 20)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    py = p[np.arange(20), labels]
    np.testing.assert_allclose(mm.logit_confidence(logits, labels), np.log(py / (1 - py)))
    assert mm.logit_confidence(np.array([[1000.0, 0.0, 0.0]]), np.array([0]))[0] == \
        pytest.approx(1000 - math.log(2))


def test_lira_scores_on_known_gaussians():
    # point 0: IN references {1, 3} (mean 2, sd sqrt 2), OUT references {-1, 1} (mean 0, sd sqrt 2)
    refs = np.array([[1.0], [3.0], [-1.0], [1.0]])
    in_mask = np.array([[True], [True], [False], [False]])
    got = mm.lira_scores(np.array([2.0]), refs, in_mask, ~in_mask)
    sd = math.sqrt(2)
    expected = stats.norm.logpdf(2, 2, sd) - stats.norm.logpdf(2, 0, sd)
    assert got.online[0] == pytest.approx(expected)
    assert got.offline[0] == pytest.approx(2 / sd)
    assert (got.n_in[0], got.n_out[0]) == (2, 2)


def test_lira_separates_members_when_references_are_informative():
    rng = np.random.default_rng(5)
    points, models = 400, 16
    shift = rng.uniform(0.5, 2.0, points)  # per-point IN effect: what per-example fits capture
    base = rng.normal(0, 2, points)  # per-point difficulty: a global threshold cannot see it
    in_mask = rng.random((models, points)) < 0.5
    refs = base + in_mask * shift + rng.normal(0, 0.3, (models, points))
    member = rng.random(points) < 0.5
    target = base + member * shift + rng.normal(0, 0.3, points)
    lira = mm.lira_scores(target, refs, in_mask, ~in_mask)
    assert mm.auc(lira.online, member) > 0.9
    assert mm.auc(lira.online, member) > mm.auc(target, member) + 0.2


# --- the section end to end --------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_run_fills_the_section(tmp_path):
    result = membership.run(membership.TINY, tmp_path)
    assert result.name == "membership" and result.seconds > 0
    assert len(result.rows) == 3 * len(membership.ATTACKS)
    for row in result.rows:
        assert 0.0 <= row["auc"] <= 1.0
        assert row["tpr_at_0.1pct_fpr"] is None  # TINY has far fewer than 1000 non-members
        assert row["eps_lb"] >= 0 and row["eps_lb_split"] >= 0
        assert 0.0 <= row["test_accuracy"] <= 1.0
    for method in membership.METHODS:
        assert result.summary[method]["members"] > 0
    total = sum(r["members"] + r["non_members"] for r in result.rows if r["attack"] == "confidence")
    assert len(result.arrays["scores"]) == total
    assert (tmp_path / result.figures[0]).stat().st_size > 0
    out = write_report(tmp_path, benchmark="leakage", config={}, seeds=[0], sections=[result])
    assert (out / "membership_scores.csv").is_file()


@pytest.mark.slow
def test_dp_option_reports_the_accountant_epsilon(tmp_path):
    dp = membership.DPSGD(noise_multiplier=1.0, epochs=2)
    tiny = dataclasses.replace(membership.TINY, methods=("isolated",), dp=dp)
    result = membership.run(tiny, tmp_path)
    dp_rows = [r for r in result.rows if r["method"] == "isolated+dp-sgd"]
    assert len(dp_rows) == len(membership.ATTACKS)
    assert all(r["accountant_epsilon"] > 0 for r in dp_rows)
    assert all(r["accountant_epsilon"] is None for r in result.rows if r["method"] == "isolated")


def test_settings_are_checked(tmp_path):
    with pytest.raises(Exception, match="reference_worlds"):
        membership.run(dataclasses.replace(membership.TINY, reference_worlds=3), tmp_path)
    with pytest.raises(Exception, match="unknown methods"):
        membership.run(dataclasses.replace(membership.TINY, methods=("magic",)), tmp_path)
