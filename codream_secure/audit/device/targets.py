"""The device benchmark's targets read off one run's rows: met, missed, or not measured.

The targets are stated for an NVIDIA H100; on another device the verdicts only say how that
device compares. Nothing here is timed: it reads the rows the sections wrote.
"""

from __future__ import annotations

STEP_MS = 2.5  # ResNet-18 (CIFAR), batch 256: optimised dream step, ms
SPEEDUP = 10.0  # ... against the fp32 eager step the official code takes, same run
ROUND_RATIO = 1.10  # 4-client heterogeneous round: secure / plain, same run
TABLE_S = 300.0  # the default sections in under 5 minutes
NOT_THE_SAME_LOSS = ("no-bn-term",)  # diagnostic step variants that change the objective


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "missed")


def _step_rows(result: dict) -> tuple[dict | None, list[dict]]:
    """The default optimised step row, and the alternatives computing the same loss."""
    rows = [r for r in result.get("dream_step", []) if "ms" in r
            and r["variant"].startswith("optimised")]
    default = next((r for r in rows if r["variant"].startswith("optimised (")), None)
    same_loss = [r for r in rows if not any(v in r["variant"] for v in NOT_THE_SAME_LOSS)]
    return default, same_loss


def _round_rows(result: dict) -> list[dict]:
    """Secure rows of both round sections, each against the plain row of its own NaN check."""
    out = []
    for section in ("round", "round_graphed"):
        for r in result.get(section) or []:
            name = r["aggregation"]
            if name.startswith("secure") and "ratio_same_check" in r and (
                    name == "secure" or name.startswith("secure, NaN")):
                out.append({"section": section, "aggregation": name,
                            "ratio": r["ratio_same_check"], "ms_per_step": r["ms_per_step"]})
    return out


def _table_seconds(result: dict) -> tuple[float | None, str]:
    """The default sections' own wall time: the run's, less the extras timed inside it (step
    variants, profiles) and any other section; None when a default section did not run.

    Slightly low: with variants, the default step's own timing (under a second on an H100)
    happens inside the variants' time and is subtracted with it."""
    ran = result.get("section_seconds", {})
    failed = set(result.get("errors", {})) | set(result.get("skipped", {}))
    missing = [s for s in result.get("default_sections", []) if s not in ran or s in failed]
    if missing or not ran:
        return None, "sections not run here: " + (", ".join(missing) or "all")
    others = sum(t for s, t in ran.items() if s not in result["default_sections"])
    extras = result.get("extra_seconds", {})
    detail = f"wall {result['seconds']:.0f} s"
    if extras:
        detail += " less " + ", ".join(f"{label} {t:.0f} s" for label, t in extras.items())
    if others:
        detail += f" less other sections {others:.0f} s"
    return result["seconds"] - sum(extras.values()) - others, detail


def targets(result: dict, *, model: str, batch: int) -> list[dict]:
    """One row per target: what was asked, what this run measured, the verdict.

    The step targets are for ResNet-18 at batch 256; `model` and `batch` name this run's.
    """
    default, same_loss = _step_rows(result)
    best = min(same_loss, key=lambda r: r["ms"]) if same_loss else None
    rows = [{
        "target": f"optimised {model} step, batch {batch}, <= {STEP_MS} ms",
        "measured": None if default is None else default["ms"],
        "detail": None if best is None else f"fastest same-loss variant: {best['variant']} "
                                            f"{best['ms']:.2f} ms",
        "verdict": _verdict(None if default is None else default["ms"] <= STEP_MS)}, {
        "target": f">= {SPEEDUP:g}x the official code's fp32 eager step",
        "measured": None if default is None else default.get("speedup_vs_official"),
        "detail": None,
        "verdict": _verdict(None if default is None or "speedup_vs_official" not in default
                            else default["speedup_vs_official"] >= SPEEDUP)}]
    rounds = _round_rows(result)
    best_round = min(rounds, key=lambda r: r["ratio"]) if rounds else None
    rows.append({
        "target": f"secure round <= {ROUND_RATIO:.2f}x plain (the best row; all in detail)",
        "measured": None if best_round is None else best_round["ratio"],
        "detail": "; ".join(f"{r['section']}: {r['aggregation']} x{r['ratio']:.3f}"
                            for r in rounds) or None,
        "verdict": _verdict(None if best_round is None else best_round["ratio"] <= ROUND_RATIO)})
    seconds, detail = _table_seconds(result)
    rows.append({"target": f"the default sections in under {TABLE_S:.0f} s",
                 "measured": seconds, "detail": detail,
                 "verdict": _verdict(None if seconds is None else seconds < TABLE_S)})
    return rows


def markdown(rows: list[dict], device: str) -> list[str]:
    """The targets as a table, with the device they were measured on."""
    lines = [f"## Targets (stated for an NVIDIA H100; this run: {device})", "",
             "| target | measured | verdict | detail |", "|---|---|---|---|"]
    for r in rows:
        value = "-" if r["measured"] is None else f"{r['measured']:.3f}"
        lines.append(f"| {r['target']} | {value} | {r['verdict']} | {r['detail'] or ''} |")
    return lines
