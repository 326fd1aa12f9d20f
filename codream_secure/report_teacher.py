"""The teacher's quality and distillation's effect per round: report.md rows and teacher.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_teacher", "teacher_rows"]

_QUALITY = (("max_probability", "mean max-probability"), ("entropy", "entropy (nats)"),
            ("client_agreement", "client agreement"), ("target_reached", "dreams at target"))


def _mean(values: list[float] | None) -> float | None:
    return float(np.mean(values)) if values else None


def teacher_rows(rounds: list[dict]) -> list[list[float | int | None]]:
    """Per round with a knowledge exchange: round, the four quality figures, mean test
    accuracy before and after distillation, and how many clients kept the distilled weights."""
    rows = []
    for r in rounds:
        teacher, kd = r.get("teacher") or {}, r.get("kd") or {}
        if not teacher:
            continue
        kept = kd.get("kept")
        rows.append([r.get("round"), *(teacher.get(key) for key, _ in _QUALITY),
                     _mean(kd.get("test_before")), _mean(kd.get("test_after")),
                     None if kept is None else sum(bool(k) for k in kept)])
    return rows


def plot_teacher(report: dict, path: Path) -> bool:
    """Teacher quality (left) and mean test accuracy before/after distillation (right);
    False when no round exchanged knowledge."""
    rows = teacher_rows(report.get("rounds") or [])
    if not rows:
        return False
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), layout="constrained")
    quality, accuracy = fig.subplots(1, 2)
    xs = [row[0] for row in rows]
    for i, (_, label) in enumerate(_QUALITY, start=1):
        ys = [row[i] for row in rows]
        if all(y is not None for y in ys):
            quality.plot(xs, ys, marker="o", ms=3, label=label)
    quality.set_title("teacher on the round's dreams")
    for i, label in ((5, "before distillation"), (6, "after distillation")):
        accuracy.plot(xs, [row[i] for row in rows], marker="o", ms=3, label=label)
    accuracy.plot([r["round"] for r in report["rounds"]],
                  [r["codream"]["mean_test"] for r in report["rounds"]], marker="s", ms=3,
                  ls="--", label="end of round (after local training)")
    accuracy.set_title("mean client test accuracy")
    accuracy.set_ylim(0, 1)
    for ax in (quality, accuracy):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return True
