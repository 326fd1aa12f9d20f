"""Membership-inference maths: LiRA scores, ROC, TPR at fixed FPR, Clopper-Pearson, ε bounds.

Pure numpy/scipy, so it is tested on constructed score sets. Convention everywhere: a higher score
means "more likely a member"; labels are 1 for members, 0 for non-members.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "LiraScores",
    "auc",
    "clopper_pearson",
    "epsilon_lower_bound",
    "epsilon_lower_bound_split",
    "lira_scores",
    "logit_confidence",
    "roc_curve",
    "tpr_at_fpr",
]

_MIN_STD = 1e-3  # floor on fitted standard deviations: a constant φ would give 0 and infinities


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """φ = log(p_y / (1 - p_y)) = z_y - logsumexp_{j != y} z_j, computed without saturating.

    LiRA's statistic (Carlini et al. 2022, eq. 4): near-Gaussian across models, unlike p_y.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    rows = np.arange(z.shape[0])
    true = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    top = others.max(axis=1)
    rest = top + np.log(np.exp(others - top[:, None]).sum(axis=1))
    return true - rest


@dataclass(frozen=True)
class LiraScores:
    """Online and offline LiRA scores per target point, and how many IN/OUT references each had."""

    online: np.ndarray
    offline: np.ndarray
    n_in: np.ndarray
    n_out: np.ndarray


def _fit(values: np.ndarray, mask: np.ndarray, global_std: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-point mean and std of values[mask] over the reference axis (axis 0)."""
    count = mask.sum(axis=0)
    mean = np.where(mask, values, 0.0).sum(axis=0) / np.maximum(count, 1)
    resid = np.where(mask, values - mean, 0.0)
    if global_std:
        # Carlini et al. recommend one variance shared by all points when there are few
        # reference models per point: per-point variances from ~8 samples are noisy.
        std = np.full(mean.shape, math.sqrt((resid**2).sum() / max(count.sum() - 1, 1)))
    else:
        std = np.sqrt((resid**2).sum(axis=0) / np.maximum(count - 1, 1))
    return mean, np.maximum(std, _MIN_STD)


def lira_scores(target: np.ndarray, references: np.ndarray, in_mask: np.ndarray,
                out_mask: np.ndarray, *, global_std: bool = False) -> LiraScores:
    """LiRA membership scores of the points in `target` (φ on the attacked model).

    references[r, i] is φ of point i on reference model r; in_mask/out_mask say whether model r
    trained on point i. Online: log N(φ; μ_in, σ_in) - log N(φ; μ_out, σ_out) per point.
    Offline: (φ - μ_out) / σ_out, the one-sided Gaussian test against OUT models only.
    """
    target = np.asarray(target, dtype=np.float64)
    refs = np.asarray(references, dtype=np.float64)
    if refs.ndim != 2 or refs.shape[1] != target.shape[0]:
        raise ValueError(f"references must be (models, {target.shape[0]}), got {refs.shape}")
    if in_mask.shape != refs.shape or out_mask.shape != refs.shape:
        raise ValueError("in_mask and out_mask must have the shape of references")
    if np.any(in_mask & out_mask):
        raise ValueError("a reference model cannot be both IN and OUT for one point")
    n_in, n_out = in_mask.sum(axis=0), out_mask.sum(axis=0)
    if n_out.min(initial=1) < 1:
        raise ValueError("every point needs at least one OUT reference model")
    mu_out, sd_out = _fit(refs, out_mask, global_std)
    offline = (target - mu_out) / sd_out
    if n_in.min(initial=1) < 1:
        online = np.full_like(target, np.nan)
    else:
        mu_in, sd_in = _fit(refs, in_mask, global_std)
        online = (stats.norm.logpdf(target, mu_in, sd_in)
                  - stats.norm.logpdf(target, mu_out, sd_out))
    return LiraScores(online, offline, n_in, n_out)


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape} vs {y.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if y.all() or not y.any():
        raise ValueError("need at least one member and one non-member")
    return s, y


def _counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds (descending, from +inf) and the TP/FP counts of `score >= threshold`."""
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last index of each tie group
    tp = np.r_[0, np.cumsum(y)[last]]
    fp = np.r_[0, np.cumsum(~y)[last]]
    return np.r_[np.inf, s[last]], tp, fp


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the test `score >= threshold`, from (0, 0) to (1, 1)."""
    thresholds, tp, fp = _counts(scores, labels)
    return fp / fp[-1], tp / tp[-1], thresholds


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half, as in the Mann-Whitney statistic)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float, *,
               min_false_positives: int = 1) -> float | None:
    """Largest TPR over thresholds whose FPR is <= `fpr`; None when it is not resolvable.

    With N non-members the smallest non-zero FPR is 1/N, so a target FPR below
    min_false_positives / N cannot be told apart from FPR = 0: e.g. 0.1% needs N >= 1000.
    """
    _, tp, fp = _counts(scores, labels)
    if fp[-1] * fpr < min_false_positives:
        return None
    ok = fp / fp[-1] <= fpr + 1e-12
    return float((tp[ok] / tp[-1]).max())


def clopper_pearson(k: np.ndarray | int, n: np.ndarray | int, *, confidence: float = 0.95
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided binomial interval (lower, upper) for k successes in n trials."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n) or np.any(n < 1):
        raise ValueError("need 0 <= k <= n and n >= 1")
    alpha = 1.0 - confidence
    with np.errstate(invalid="ignore"):
        lower = np.where(k > 0, stats.beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        upper = np.where(k < n, stats.beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    return lower, upper


def _eps_from_counts(tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int, delta: float,
                     confidence: float) -> np.ndarray:
    """ε bound at each threshold from Clopper-Pearson upper bounds on FPR and FNR."""
    _, fpr_hi = clopper_pearson(fp, n_neg, confidence=confidence)
    _, fnr_hi = clopper_pearson(n_pos - tp, n_pos, confidence=confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        # (ε, δ)-DP forces FPR + e^ε FNR >= 1 - δ and FNR + e^ε FPR >= 1 - δ for every test.
        one = np.log((1 - delta - fnr_hi) / fpr_hi)
        two = np.log((1 - delta - fpr_hi) / fnr_hi)
    both = np.fmax(np.nan_to_num(one, nan=-np.inf), np.nan_to_num(two, nan=-np.inf))
    return np.maximum(both, 0.0)


def epsilon_lower_bound(scores: np.ndarray, labels: np.ndarray, *, delta: float,
                        confidence: float = 0.95) -> float:
    """max over thresholds of the Clopper-Pearson ε bound (optimistic: the max is not corrected
    for choosing the threshold on the same scores; see epsilon_lower_bound_split)."""
    _, tp, fp = _counts(scores, labels)
    return float(_eps_from_counts(tp, fp, int(tp[-1]), int(fp[-1]), delta, confidence).max())


def epsilon_lower_bound_split(scores: np.ndarray, labels: np.ndarray, *, delta: float,
                              confidence: float = 0.95, seed: int = 0) -> float:
    """ε bound that holds at `confidence`: the threshold is chosen on a random half of the
    scores (stratified by label) and the Clopper-Pearson bound computed on the other half."""
    s, y = _check(scores, labels)
    rng = np.random.default_rng(seed)
    pick = np.zeros(s.size, dtype=bool)
    for cls in (True, False):
        idx = np.flatnonzero(y == cls)
        pick[rng.permutation(idx)[: idx.size // 2]] = True
    if y[pick].all() or not y[pick].any() or y[~pick].all() or not y[~pick].any():
        return 0.0
    thresholds, tp, fp = _counts(s[pick], y[pick])
    eps = _eps_from_counts(tp, fp, int(tp[-1]), int(fp[-1]), delta, confidence)
    if eps.max() <= 0:
        return 0.0
    chosen = thresholds[int(np.argmax(eps))]
    held_s, held_y = s[~pick], y[~pick]
    tp_h = np.array([np.count_nonzero(held_s[held_y] >= chosen)])
    fp_h = np.array([np.count_nonzero(held_s[~held_y] >= chosen)])
    return float(_eps_from_counts(tp_h, fp_h, int(held_y.sum()), int((~held_y).sum()), delta,
                                  confidence)[0])
