"""The privacy part of a run report: a markdown section and the epsilon/accuracy plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_AT_RANGE_END = ("the best RDP order is an end of the accountant's order range, and a wider "
                 "range could lower it (docs/privacy.md)")


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def privacy_section(privacy: dict | None) -> list[str]:
    """'## Privacy': mechanism, unit, C, z, q, releases, (epsilon, delta), accountant."""
    if not privacy:
        return []
    lines = ["## Privacy", ""]
    if not privacy.get("enabled"):
        return [*lines, f"Differential privacy off: {privacy.get('note', '')}", ""]
    keys = [("unit", "unit"), ("mechanism", "mechanism"), ("mode", "mode"),
            ("l2_clip", "L2 clip C"), ("label_l2_clip", "soft-label L2 clip"),
            ("nominal_noise_multiplier", "noise multiplier z (configured)"),
            ("noise_multiplier", "noise multiplier given to the accountant"),
            ("sample_rate", "sample rate q"), ("releases", "released aggregates"),
            ("min_contributors", "noise sized for at least this many contributors"),
            ("epsilon", "epsilon"), ("delta", "delta (stated)"),
            ("accountant_delta", "delta the accountant's epsilon is computed at"),
            ("noise_tail_bits", "noise tail truncated at 2^-bits per draw"),
            ("truncation_delta", "delta from the noise truncation"),
            ("delta_total", "total delta (accountant + truncation)"),
            ("accountant", "accountant"), ("opacus_version", "opacus")]
    rows = [[label, _fmt(privacy[key])] for key, label in keys if key in privacy]
    lines += ["| | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows), ""]
    if privacy.get("delta_within_stated") is False:
        lines += ["- **the total delta exceeds the stated delta**: the guarantee is "
                  f"(epsilon, {_fmt(privacy.get('delta_total'))}), not the stated one"]
    if privacy.get("rdp_order_at_range_end"):
        lines += [f"- epsilon is an upper bound: {_AT_RANGE_END}"]
    for key in ("trust", "dream_loss", "post_processing", "baselines"):
        if privacy.get(key):
            lines += [f"- {key.replace('_', ' ')}: {privacy[key]}"]
    for client, ledger in enumerate(privacy.get("clients") or []):
        lines += [f"- client {client}: epsilon {_fmt(ledger.get('epsilon'))} after "
                  f"{ledger.get('releases')} DP-SGD steps (z {_fmt(ledger.get('noise_multiplier'))}"
                  f", q {_fmt(ledger.get('sample_rate'))})"
                  + (f"; an upper bound: {_AT_RANGE_END}"
                     if ledger.get("rdp_order_at_range_end") else "")]
    history = (privacy.get("accountant_state") or {}).get("history")
    if history:
        lines += ["", "Recompute with Opacus: `acct = create_accountant("
                  f"'{privacy.get('accountant')}'); acct.history = {history}; "
                  f"acct.get_epsilon(delta={privacy.get('accountant_delta', privacy.get('delta'))}"
                  + (", alphas=<rdp_orders from report.json>" if privacy.get("rdp_orders") else "")
                  + ")`"]
    return [*lines, ""]


def plot_privacy(report: dict, path: Path) -> bool:
    """Epsilon spent and mean CoDream test accuracy per round; False when DP is off."""
    privacy = report.get("privacy") or {}
    rounds = report["rounds"]
    eps = [r.get("epsilon") for r in rounds]
    if not privacy.get("enabled") or any(e is None for e in eps):
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    xs = [r["round"] for r in rounds]
    ax.plot(xs, eps, color="tab:red", marker="o", ms=3, label="epsilon spent")
    ax.set_xlabel("round (0 = after warm-up)")
    ax.set_ylabel(f"epsilon (delta = {privacy.get('delta'):g})", color="tab:red")
    twin = ax.twinx()
    twin.plot(xs, [r["codream"]["mean_test"] for r in rounds], color="tab:blue", marker="s",
              ms=3, label="CoDream mean test accuracy")
    twin.set_ylabel("test accuracy", color="tab:blue")
    twin.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"{privacy.get('unit')}-level DP ({privacy.get('mechanism')}, "
                 f"{privacy.get('mode')}): epsilon and accuracy per round")
    fig.savefig(path, dpi=120)
    return True
