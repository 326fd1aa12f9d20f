"""The teacher of a CoDream round: soft labels weighted per class, and how good they are.

Class-aware weighting (FedFTG / DFRD style): client k's prediction for class c counts in
proportion to its share of class c, a_kc = n_kc / H_c with H = sum_j n_j the pooled histogram.
Both the weighted predictions and the shares are sums over clients, so both go through the
aggregator; only H (once) and those sums are released.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from codream_secure.errors import ConfigError

__all__ = ["class_histogram", "class_shares", "class_weighted_teacher", "draw_targets",
           "teacher_quality"]


def class_histogram(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """One client's class counts, float64 (what it contributes to the pooled histogram)."""
    counts = torch.bincount(labels.reshape(-1).cpu(), minlength=num_classes)
    return counts.numpy().astype(np.float64)


def class_shares(own: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    """a_kc = n_kc / H_c in [0, 1], 0 where no client holds class c."""
    if own.shape != pooled.shape:
        raise ConfigError(f"histogram shapes differ: {own.shape} and {pooled.shape}")
    safe = np.where(pooled > 0, pooled, 1.0)
    return np.where(pooled > 0, np.clip(own / safe, 0.0, 1.0), 0.0)


def class_weighted_teacher(released: np.ndarray, dreams: int, classes: int) -> np.ndarray:
    """Teacher probabilities from one released sum of [a_k * p_k(x) flattened, a_k].

    Column c is divided by the included clients' summed share of class c (exact under
    dropouts), then each row is put back onto the simplex; a row with no mass is uniform.
    """
    if released.shape != (dreams * classes + classes,):
        raise ConfigError(f"a class-weighted release needs {dreams * classes + classes} values, "
                          f"got {released.shape}")
    numerator = np.clip(released[: dreams * classes].reshape(dreams, classes), 0.0, None)
    shares = released[dreams * classes:]
    known = shares > 1e-6  # decoded sums carry rounding noise around an exact 0
    probs = np.where(known, numerator / np.where(known, shares, 1.0), 0.0)
    rows = probs.sum(axis=1, keepdims=True)
    return np.where(rows > 0, probs / np.where(rows > 0, rows, 1.0), 1.0 / classes)


def draw_targets(pooled: np.ndarray, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` target classes drawn from the pooled class histogram (label-conditioned dreams)."""
    if pooled.sum() <= 0:
        raise ConfigError("the pooled class histogram is empty")
    weights = torch.from_numpy(np.asarray(pooled, dtype=np.float64))
    return torch.multinomial(weights, count, replacement=True, generator=generator)


def teacher_quality(teacher: torch.Tensor, members: Sequence[torch.Tensor],
                    targets: torch.Tensor | None = None) -> dict[str, float | None]:
    """Mean max-probability and entropy of the teacher, client agreement with its argmax, and
    the share of dreams whose teacher argmax is their target (label-conditioned dreams)."""
    probs = teacher.clamp_min(0)
    top = probs.argmax(dim=1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
    agreement = torch.stack([(m.argmax(dim=1) == top).float().mean() for m in members]).mean() \
        if members else torch.tensor(float("nan"))
    return {
        "max_probability": float(probs.max(dim=1).values.mean()),
        "entropy": float(entropy.mean()),
        "client_agreement": float(agreement),
        "target_reached": None if targets is None else float((top == targets).float().mean()),
    }
