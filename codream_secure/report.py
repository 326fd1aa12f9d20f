"""Write a run's report.json, report.md and PNG plots; re-render them later from report.json."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from codream_secure.errors import CoDreamError, os_reason
from codream_secure.report_privacy import plot_privacy, privacy_section
from codream_secure.report_schema import InvalidReport, validate_report
from codream_secure.report_teacher import plot_teacher, teacher_rows

SCHEMA_VERSION = 1
MAX_DREAMS_SHOWN = 64
METHOD_ORDER = ("codream", "isolated", "fedavg", "centralized")
# every file write_report may write into a run's folder
REPORT_FILES = ("report.json", "report.md", "accuracy.png", "privacy.png", "teacher.png",
                "dreams.png", "dreams.npz")


class ReportError(CoDreamError):
    """An output folder holds no readable report.json (or dreams file) to render."""


class Outcome(Protocol):
    """What write_report needs from federation.SimulationOutcome."""

    report: dict
    dreams: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]


def write_report(outcome: Outcome, out_dir: Path) -> dict[str, Path]:
    """Write report.json, report.md, accuracy.png and (if any dreams) dreams.npz and dreams.png.

    report.json goes first: if anything after it fails, the run's numbers are already safe; if
    report.json itself cannot be written, they go to a file in the temporary folder instead.
    """
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "report.json"}
    text = json.dumps(outcome.report, indent=2, default=_json_default)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(paths["json"], text)
    except OSError as error:
        raise ReportError(f"cannot write {paths['json']} ({os_reason(error)}); "
                          f"{_save_elsewhere(text)}") from None
    try:
        return {**paths, **_write_rest(outcome, out_dir)}
    except OSError as error:
        raise ReportError(_unwritable(out_dir, error)) from None


def _write_rest(outcome: Outcome, out_dir: Path) -> dict[str, Path]:
    """Everything but report.json: dreams.npz and the renderings."""
    dreams = np.asarray(outcome.dreams, dtype=np.float32)
    mean = np.asarray(outcome.mean, dtype=np.float64)
    std = np.asarray(outcome.std, dtype=np.float64)
    for stale in ("dreams.npz", "dreams.png"):  # never show an earlier run's dreams
        (out_dir / stale).unlink(missing_ok=True)
    if len(dreams) == 0:  # no round exchanged knowledge: nothing to show
        return _render(outcome.report, out_dir, None)
    _check_dreams(dreams, mean, std, "outcome")
    npz = out_dir / "dreams.npz"
    tmp = out_dir / "dreams.tmp.npz"
    np.savez(tmp, dreams=dreams, mean=mean, std=std)
    os.replace(tmp, npz)
    return {"dreams_npz": npz, **_render(outcome.report, out_dir, (dreams, mean, std))}


def _save_elsewhere(text: str) -> str:
    """Keep a report that its folder refused in the temporary folder; say where it went."""
    try:
        fd, name = tempfile.mkstemp(prefix="codream-report-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text + "\n")
    except OSError as error:
        return f"it could not be saved elsewhere either ({os_reason(error)})"
    return f"the run's report was saved to {name} instead"


def _unwritable(out_dir: Path, error: OSError) -> str:
    where = _where(error, out_dir)
    return (f"cannot write {where} ({os_reason(error)}); report.json is complete: fix the "
            f"folder and run 'codream-secure report {out_dir}' to render the rest")


def _where(error: OSError, out_dir: Path) -> str:
    """The file an OSError is about: os.replace's target rather than its temporary source."""
    return str(error.filename2 or error.filename or out_dir)


def render_from_json(out_dir: Path) -> dict[str, Path]:
    """Re-render report.md and accuracy.png (and dreams.png if dreams.npz exists) in `out_dir`."""
    out_dir = Path(out_dir)
    report = load_report(out_dir)
    npz = out_dir / "dreams.npz"
    dreams = _load_dreams(npz) if npz.exists() else None
    try:
        return _render(report, out_dir, dreams)
    except OSError as error:
        raise ReportError(f"cannot write {_where(error, out_dir)} ({os_reason(error)})") from None


def _load_dreams(npz: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dreams, mean, std) from a dreams.npz; ReportError if it is not one."""
    try:
        with np.load(npz, allow_pickle=False) as data:
            dreams = (data["dreams"], data["mean"], data["std"])
    except EOFError:
        raise ReportError(f"{npz}: not a readable dreams file (it is empty)") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        raise ReportError(f"{npz}: not a readable dreams file ({error})") from None
    if not all(np.issubdtype(a.dtype, np.number) for a in dreams):
        raise ReportError(f"{npz}: dreams, mean and std must be numeric arrays")
    try:
        _check_dreams(*dreams, str(npz))
    except ValueError as error:
        raise ReportError(str(error)) from None
    return dreams


def load_report(out_dir: Path) -> dict[str, Any]:
    """Read `out_dir`/report.json and check that every section it renders has its schema type."""
    path = Path(out_dir) / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path} does not exist; is {out_dir} a run's output folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{path} is not readable JSON ({error})") from None
    if not isinstance(report, dict) or report.get("schema_version") != SCHEMA_VERSION:
        found = report.get("schema_version") if isinstance(report, dict) else type(report).__name__
        raise ReportError(f"{path}: expected schema_version {SCHEMA_VERSION}, found {found!r}")
    for key in ("config", "rounds", "final"):
        if key not in report:
            raise ReportError(f"{path}: missing the {key!r} section")
    try:
        validate_report(report)
    except InvalidReport as error:
        raise ReportError(f"{path}: {error} (schema: docs/report-schema.md)") from None
    return report


def _render(report: dict, out_dir: Path, dreams: tuple | None) -> dict[str, Path]:
    paths = {"accuracy_png": out_dir / "accuracy.png", "md": out_dir / "report.md"}
    plot_accuracy(report, paths["accuracy_png"])
    privacy_png = out_dir / "privacy.png"
    if plot_privacy(report, privacy_png):
        paths["privacy_png"] = privacy_png
    else:
        privacy_png.unlink(missing_ok=True)  # never show an earlier run's privacy plot
    teacher_png = out_dir / "teacher.png"
    if not plot_teacher(report, teacher_png):
        teacher_png.unlink(missing_ok=True)
    if dreams is not None:
        paths["dreams_png"] = out_dir / "dreams.png"
        plot_dreams(*dreams, paths["dreams_png"])
    images = [p.name for p in (out_dir / "accuracy.png", privacy_png, teacher_png,
                               out_dir / "dreams.png") if p.exists()]
    _atomic_write(paths["md"], render_markdown(report, images=images))
    return paths


# ----------------------------------------------------------------------------- markdown


def pct(value: float | None) -> str:
    """An accuracy fraction as a percentage with two decimals ('81.23'); '–' for None."""
    return "–" if value is None else f"{100 * value:.2f}"


def _pcts(values: list[float]) -> str:
    return " / ".join(pct(v) for v in values)


def _num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(_num(v) for v in value) or "–"
    return str(value)


def _sec(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}"


def _section(title: str, header: list[str], rows: list[list[str]],
             intro: tuple[str, ...] = ()) -> list[str]:
    """A '## title' heading, optional intro lines, and a markdown table."""
    lines = [f"## {title}", "", *intro, "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
              for row in rows]
    return [*lines, ""]


def ordered_methods(final: dict) -> list[str]:
    """Methods in final, CoDream first, then the baselines in their usual order."""
    return [m for m in METHOD_ORDER if m in final] + sorted(set(final) - set(METHOD_ORDER))


def config_values(config: dict) -> dict:
    """report.json's sectioned config as one {key: value} dict (key names are unique)."""
    return {k: v for keys in config.values() if isinstance(keys, dict) for k, v in keys.items()}


def render_markdown(report: dict, *, images: list[str] = ()) -> str:
    """The human summary of one run, built only from report.json's fields."""
    cfg, timing = config_values(report["config"]), report.get("timing", {})
    agg, data = report.get("aggregator", {}), report.get("dataset", {})
    lines = ["# CoDream run report", ""]
    if timing:
        resumed = " (resumed from a checkpoint)" if timing.get("resumed") else ""
        baselines = ", ".join(f"{name} {_sec(seconds)} s" for name, seconds
                              in (timing.get("baseline_seconds") or {}).items())
        of_which = f" (baselines: {baselines})" if baselines else ""
        lines += [f"Started {timing.get('started')}, finished {timing.get('finished')}, "
                  f"{_sec(timing.get('total_seconds'))} s in total{of_which}{resumed}.", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    lines += [f"{cfg.get('clients')} clients on `{data.get('name', cfg.get('dataset'))}`, "
              f"{len(report['rounds'])} round records (round 0 = after warm-up), "
              f"aggregator `{agg.get('name')}`.", ""]
    rows = []
    for method in ordered_methods(report["final"]):
        res = report["final"][method]
        accs = res.get("per_client_accuracy") or []
        spread = pct(float(np.std(accs))) if accs else "–"
        rows.append([method, pct(res.get("mean_accuracy")), spread, _pcts(accs),
                     _num(res.get("selected_round")), pct(res.get("last_round_mean_accuracy"))])
    lines += _section("Final accuracy (test %, each client at its best-validation round)",
                      ["method", "mean", "± std over clients", "per client", "selected round",
                       "last-round mean"], rows)
    lines += _aggregator_section(agg) + privacy_section(report.get("privacy"))
    lines += _rounds_section(report["rounds"])
    lines += _teacher_section(report["rounds"])
    lines += _dataset_section(data)
    lines += _section("Configuration", ["key", "value"], [
        [f"[{table}] {k}", f"`{_num(v)}`"] for table, keys in report["config"].items()
        if isinstance(keys, dict) for k, v in keys.items()])
    env = [[f"{section}.{k}", _num(v)] for section in ("versions", "machine", "seeds")
           for k, v in report.get(section, {}).items()]
    lines += _section("Environment", ["what", "value"], env)
    if images:
        lines += ["## Figures", "", *(f"![{Path(i).stem}]({i})" for i in images), ""]
    return "\n".join(lines)


def _aggregator_section(agg: dict) -> list[str]:
    measured = agg.get("measured") or {}
    scale, bound = agg.get("scale_bits") or {}, agg.get("error_bound_per_step") or {}
    rows = [
        ["aggregator", _num(agg.get("name"))],
        ["threshold t", _num(agg.get("threshold"))],
        ["neighbour degree k", _num(agg.get("degree"))],
        ["ring bits", _num(agg.get("ring_bits"))],
        ["masking (dream / labels)", " / ".join(
            _num((agg.get("masking") or {}).get(k)) for k in ("dream", "labels"))],
        ["server unmasking (dream / labels)", " / ".join(
            _num((agg.get("unmasking") or {}).get(k)) for k in ("dream", "labels"))],
        ["scale bits (dream / labels)",
         f"{_num(scale.get('dream'))} / {_num(scale.get('labels'))}"],
        ["error bound per step (dream / labels)",
         f"{_num(bound.get('dream'))} / {_num(bound.get('labels'))}"],
        ["measured max abs error vs plain", _num(measured.get("max_abs_error_vs_plain"))],
        ["measured mean abs error vs plain", _num(measured.get("mean_abs_error_vs_plain"))],
        ["steps compared", _num(measured.get("steps_compared"))],
    ]
    extras = [("clipped_values", "values clipped before encoding"),
              ("seconds", "seconds spent aggregating")]
    rows += [[label, _num(measured[key])] for key, label in extras if key in measured]
    return _section("Aggregator", ["", "value"], rows)


def _rounds_section(rounds: list[dict]) -> list[str]:
    has_included = any("included_in_dreams" in r for r in rounds)
    has_skipped = any(r.get("skipped_batches") is not None for r in rounds)  # generator mode
    rows = []
    for r in rounds:
        cd, sec = r.get("codream", {}), r.get("seconds", {})
        rows.append([
            str(r.get("round")), pct(cd.get("mean_test")), _pcts(cd.get("test", [])),
            _pcts(cd.get("val", [])), f"{sum(r.get('bytes_up', [])):,}",
            f"{sum(r.get('bytes_down', [])):,}",
            " / ".join(_sec(sec.get(k)) for k in ("local", "dreams", "aggregation", "distill")),
            _num(r.get("dropped", [])),
            *([_num(r.get("included_in_dreams"))] if has_included else []),
            *([_num(r.get("skipped_batches"))] if has_skipped else []),
        ])
    header = ["round", "mean test", "test per client", "val per client", "bytes up (all)",
              "bytes down (all)", "seconds local / dreams / aggregation / distill", "dropped"]
    header += ["in dreams"] if has_included else []
    header += ["skipped batches"] if has_skipped else []
    return _section("Rounds (CoDream, %)", header, rows)


def _teacher_section(rounds: list[dict]) -> list[str]:
    rows = [[str(row[0]), *("–" if v is None else f"{v:.3f}" for v in row[1:5]),
             pct(row[5]), pct(row[6]), _num(row[7])] for row in teacher_rows(rounds)]
    if not rows:
        return []
    header = ["round", "teacher max-prob", "entropy", "client agreement", "dreams at target",
              "test before KD", "test after KD", "clients keeping KD"]
    return _section("Teacher and distillation", header, rows)


def _dataset_section(data: dict) -> list[str]:
    if not data:
        return []
    intro = (f"`{data.get('name')}`: {data.get('train')} train / {data.get('test')} test "
             f"samples, input {'x'.join(map(str, data.get('input_shape') or []))}, "
             f"{data.get('num_classes')} classes"
             + (f" (source: `{data['source']}`)." if data.get("source") else ".")
             + "".join(f" Label histograms: {data[key]}." for key in (
                 "client_label_histograms_note", "client_label_histograms_withheld")
                 if data.get(key)),
             "")
    sizes, hists = data.get("client_sizes", []), data.get("client_label_histograms", [])
    rows = [[str(k), _num(size), _num(hists[k] if k < len(hists) else None)]
            for k, size in enumerate(sizes)]
    return _section("Dataset", ["client", "samples", "label histogram"], rows, intro)


# ----------------------------------------------------------------------------- plots


def plot_accuracy(report: dict, path: Path) -> None:
    """Mean CoDream test accuracy per round, thin per-client lines, and the baselines."""
    from matplotlib.figure import Figure  # lazy and pyplot-free: no display, no global state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    rounds = report["rounds"]
    xs = [r["round"] for r in rounds]
    per_client = np.array([r["codream"]["test"] for r in rounds], dtype=float).reshape(len(xs), -1)
    for k in range(per_client.shape[1]):
        ax.plot(xs, per_client[:, k], color="tab:blue", lw=0.7, alpha=0.35,
                label="codream, per client" if k == 0 else None)
    ax.plot(xs, [r["codream"]["mean_test"] for r in rounds], color="tab:blue", lw=2.2,
            marker="o", ms=3, label="codream, client mean")
    curves = report.get("baseline_curves") or {}
    colours = iter(["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"])
    for method in ordered_methods(report["final"]):
        if method == "codream":
            continue
        colour = next(colours, "tab:gray")
        test = (curves.get(method) or {}).get("test") or []
        if len(test) >= 2:
            ys = [float(np.mean(row)) for row in test]
            bx = xs if len(ys) == len(xs) else list(range(len(ys)))
            ax.plot(bx, ys, color=colour, lw=1.5, ls="--", label=f"{method}, client mean")
        elif report["final"][method].get("mean_accuracy") is not None:
            ax.axhline(report["final"][method]["mean_accuracy"], color=colour, lw=1.5, ls="--",
                       label=f"{method} (final)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = after warm-up)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    cfg = config_values(report["config"])
    ax.set_title(f"CoDream on {cfg.get('dataset')} ({cfg.get('aggregator')})")
    _save(fig, path)


def dream_grid(dreams: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Up to 64 dreams de-normalised to [0, 1] and tiled into one H x W (x 3) image."""
    shown = dreams[:MAX_DREAMS_SHOWN].astype(np.float64)
    images = np.clip(shown * std[None, :, None, None] + mean[None, :, None, None], 0.0, 1.0)
    images = images.transpose(0, 2, 3, 1)  # N H W C
    if images.shape[-1] != 3:
        images = images[..., :1]  # grayscale (and any non-RGB channel count: its first channel)
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 1
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c))
    for i, image in enumerate(images):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid[..., 0] if c == 1 else grid


def plot_dreams(dreams: np.ndarray, mean: np.ndarray, std: np.ndarray, path: Path) -> None:
    """Save the final dreams as an image grid (grayscale for 1 channel, RGB for 3)."""
    from matplotlib.figure import Figure

    grid = dream_grid(np.asarray(dreams), np.asarray(mean), np.asarray(std))
    side = min(8.0, max(3.0, grid.shape[1] / 40))
    fig = Figure(figsize=(side, side * grid.shape[0] / grid.shape[1] + 0.4), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"final dreams ({min(len(dreams), MAX_DREAMS_SHOWN)} of {len(dreams)})",
                 fontsize=9)
    _save(fig, path)


# ----------------------------------------------------------------------------- files


def _check_dreams(dreams: np.ndarray, mean: np.ndarray, std: np.ndarray, where: str) -> None:
    """Shape checks; a ValueError (a bug) for an outcome, ReportError for a file on disk."""
    if dreams.ndim != 4 or len(dreams) == 0:
        raise ValueError(f"{where}: dreams must be a non-empty N x C x H x W array, "
                          f"got shape {dreams.shape}")
    if mean.shape != (dreams.shape[1],) or std.shape != (dreams.shape[1],):
        raise ValueError(f"{where}: mean/std need one value per channel ({dreams.shape[1]}), "
                          f"got {mean.shape} and {std.shape}")


def _json_default(value: Any) -> Any:
    """Encode numpy scalars and arrays that slipped into the report dict."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"report.json cannot hold a {type(value).__name__}: {value!r}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
