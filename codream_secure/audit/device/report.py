"""device.json / device.md and the progress lines of the device benchmark."""

from __future__ import annotations

import argparse

from codream_secure.audit.device import targets
from codream_secure.audit.reporting import write_table_report, write_text


def _round_lines(rows: list[dict]) -> list[str]:
    """A round table: ms/step, the ratios to the plain rows, the secure-sum check."""
    lines = ["| aggregation | models | batch | steps | ms/step | x plain | x plain, same NaN check "
             "| x plain kept on device | max error (bound) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['aggregation']} | {r['models']} | failed: {r['error'][:200]} "
                         "| | | | | | |")
            continue
        check = (f"{r['max_abs_error']:.2e} ({r['bound']:.2e})" if "bound" in r else "-")
        lines.append(f"| {r['aggregation']} | {r['models']} | {r['batch']} | {r['steps']} | "
                     f"{r['ms_per_step']:.2f} | {r['ratio']:.3f} | {r['ratio_same_check']:.3f} | "
                     f"{r['ratio_vs_device_resident_plain']:.3f} | {check} |")
    return lines


def _markdown(result: dict) -> str:
    lines = [f"# Device benchmark ({result['device']}, {result['date']})", "",
             f"Command: `{result['command']}`", "",
             f"Wall time: {result['seconds']:.0f} s (start to the last section written)", ""]
    if result.get("section_seconds"):
        lines += ["Sections: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds
                                           in result["section_seconds"].items())
                  + "".join(f"; of which {label} {seconds:.0f} s" for label, seconds
                            in result.get("extra_seconds", {}).items()), ""]
    if result.get("targets"):
        lines += [*targets.markdown(result["targets"], result["device"]), ""]
    lines += ["## Dream step", "",
             "| variant | ms/step | GFLOP/step | TFLOP/s | x fp32 eager | x official code "
             "| rel. error | cosine |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["dream_step"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:200]} | | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['ms']:.2f} | {r['gflop']:.2f} | {r['tflops']:.3f} "
                     f"| {r['speedup']:.1f} | {r['speedup_vs_official']:.1f} "
                     f"| {r['rel_err']:.2e} | {r['cosine']:.4f} |")
    c = result["matmul_ceiling"]
    lines += ["", f"Measured matmul ceiling: {c['tflops']:.3f} TFLOP/s ({c['dtype']}, n={c['n']})"]
    if "fp32_settings" in result:
        f = result["fp32_settings"]
        lines += ["", f"fp32 rows under PyTorch's TF32 switches as found: cuDNN TF32 "
                  f"{'allowed' if f['cudnn_allow_tf32'] else 'off'}, float32 matmul precision "
                  f"'{f['float32_matmul_precision']}'"]
    lines += ["", "## Dream round, secure vs plain (each client stepped on its own)", ""]
    lines += _round_lines(result["round"])
    if result["round"] and "clients_alone_ms" in result["round"][0]:
        lines += ["", f"Each client's step alone, summed: "
                  f"{result['round'][0]['clients_alone_ms']:.2f} ms"]
    if result.get("round_graphed"):
        lines += ["", "## Dream round, one CUDA graph for all clients (gpu.graphed)", ""]
        lines += _round_lines(result["round_graphed"])
        replay = next((r["one_replay_ms"] for r in result["round_graphed"]
                       if "one_replay_ms" in r), None)
        if replay is not None:
            lines += ["", f"One replay (every client's gradient): {replay:.2f} ms"]
    lines += ["", "## Same-architecture clients", "",
              "| variant | model | clients | batch | ms per round step | min cosine |",
              "|---|---|---|---|---|---|"]
    for r in result.get("batched", []):
        lines.append(f"| {r['variant']} | {r['model']} | {r['clients']} | {r['batch']} | "
                     f"{r['ms_per_round_step']:.2f} | {r['min_cosine_between_paths']:.4f} |")
    lines += ["", "## Keystream", "", "| where | GB/s | words |", "|---|---|---|"]
    for r in result["keystream"]:
        lines.append(f"| {r['where']} | {r['gbps']:.2f} | {r['n_words']} |")
    lines += ["", "## Local training and distillation steps", "",
              "| job | variant | model | batch | ms/step | TFLOP/s | x fp32 eager "
              "| first-epoch loss |", "|---|---|---|---|---|---|---|---|"]
    for r in result.get("training", []):
        if "error" in r:
            lines.append(f"| {r['job']} | {r['variant']} | failed: {r['error'][:200]} "
                         "| | | | | |")
            continue
        speedup = f"{r['speedup']:.2f}" if r["speedup"] else "-"
        lines.append(f"| {r['job']} | {r['variant']} | {r['model']} | {r['batch']} | "
                     f"{r['ms']:.2f} | {r['tflops']:.2f} | {speedup} | "
                     f"{r['first_epoch_loss']:.4f} |")
    if result.get("errors"):
        lines += ["", "## Failed sections", ""]
        lines += [f"- {name}: {error}" for name, error in result["errors"].items()]
    if result.get("skipped"):
        lines += ["", "## Skipped sections", ""]
        lines += [f"- {name}: {why}" for name, why in result["skipped"].items()]
    return "\n".join(lines) + "\n"


def print_section(section: str, result: dict, elapsed: float) -> None:
    """Progress lines of a finished section (the step section prints its rows as it goes)."""
    key = {"round": "round", "graphed": "round_graphed"}.get(section)
    if key and result[key]:
        print(f"{section}: " + ", ".join(f"{r['aggregation']} {r['ms_per_step']:.2f} ms/step "
                                         f"(x{r['ratio']:.3f})" if "ms_per_step" in r
                                         else f"{r['aggregation']} {r['error']}"
                                         for r in result[key]))
    elif section == "batched":
        for r in result["batched"]:
            print(f"{r['variant']}: {r['ms_per_round_step']:.2f} ms per round step")
    print(f"  ({elapsed:.0f} s)")


def write_result(result: dict, args: argparse.Namespace) -> None:
    """device.json, device.md and (with --profile) profile.txt under args.out."""
    result["extra_seconds"] = dict(getattr(args, "extra_seconds", {}))
    result["targets"] = targets.targets(result, model=args.model, batch=args.batch)
    write_table_report(args.out, "device", result, _markdown(result), indent=1)
    for attribute, name in (("profile_text", "profile.txt"),
                            ("round_profile_text", "profile-round.txt"),
                            ("graphed_profile_text", "profile-graphed.txt")):
        if getattr(args, attribute, None):
            write_text(args.out / name, getattr(args, attribute))


