"""report.py: files written, numbers carried into report.md, re-rendering, bad folders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from codream_secure.config import SimulationConfig
from codream_secure.report import (
    ReportError,
    dream_grid,
    load_report,
    pct,
    render_from_json,
    render_markdown,
    write_report,
)


@dataclass
class FakeOutcome:
    report: dict
    dreams: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]


def synthetic_report(*, clients: int = 3, rounds: int = 3, aggregator: str = "secagg") -> dict:
    """A report.json dict with the documented shape and distinctive numbers."""
    config = SimulationConfig.from_keys(clients=clients, rounds=rounds, aggregator=aggregator,
                              out="unused").to_dict()
    test = [[0.5 + 0.01 * r + 0.1 * k + 0.0013 for k in range(clients)] for r in range(rounds)]
    val = [[t - 0.02 for t in row] for row in test]

    def summary(scale: float) -> dict:
        accs = [scale * (0.61 + 0.0711 * k) for k in range(clients)]
        return {"mean_accuracy": float(np.mean(accs)), "per_client_accuracy": accs,
                "selected_round": [rounds - 1] * clients,
                "last_round_mean_accuracy": float(np.mean(accs)) - 0.01}

    return {
        "schema_version": 1,
        "config": config,
        "versions": {"codream_secure": "0.1.0", "python": "3.11.7", "torch": "2.13.0",
                     "numpy": "2.0.0", "cryptography": "44.0.0"},
        "seeds": {"seed": 0},
        "machine": {"platform": "Linux-test", "cpus": 2, "device": "cpu"},
        "dataset": {"name": "digits", "train": 1347, "test": 450, "input_shape": [1, 8, 8],
                    "num_classes": 10, "client_sizes": [400 + k for k in range(clients)],
                    "client_label_histograms": [[40] * 10 for _ in range(clients)]},
        "aggregator": {"name": aggregator, "threshold": 2, "degree": clients - 1,
                       "ring_bits": 32, "scale_bits": {"dream": 24, "labels": 26},
                       "error_bound_per_step": {"dream": 1.5e-7, "labels": 4.5e-8},
                       "measured": {"max_abs_error_vs_plain": 1.234e-07,
                                    "mean_abs_error_vs_plain": 3.21e-08,
                                    "steps_compared": 321}},
        "rounds": [{"round": r, "codream": {"val": val[r], "test": test[r],
                                            "mean_test": float(np.mean(test[r]))},
                    "bytes_up": [1000 + r] * clients, "bytes_down": [2000] * clients,
                    "seconds": {"local": 0.5, "dreams": 1.25, "aggregation": 0.75,
                                "distill": 0.125},
                    "dropped": [1] if r == 1 else []} for r in range(rounds)],
        "final": {"codream": summary(1.0), "isolated": summary(0.8),
                  "centralized": summary(1.2)},
        "baseline_curves": {"isolated": {"test": [[0.4] * clients for _ in range(rounds)]}},
        "timing": {"total_seconds": 12.5, "baseline_seconds": {"isolated": 2.5,
                                                              "centralized": 4.25},
                   "started": "2026-01-01T00:00:00+00:00",
                   "finished": "2026-01-01T00:00:12+00:00"},
    }


def synthetic_outcome(channels: int = 1, n_dreams: int = 70, **kwargs) -> FakeOutcome:
    rng = np.random.default_rng(0)
    dreams = rng.standard_normal((n_dreams, channels, 8, 8)).astype(np.float32)
    return FakeOutcome(synthetic_report(**kwargs), dreams, (0.3,) * channels, (0.2,) * channels)


def test_write_report_writes_every_file_and_the_json_verbatim(tmp_path: Path) -> None:
    outcome = synthetic_outcome()
    paths = write_report(outcome, tmp_path / "run")
    for key in ("json", "md", "accuracy_png", "dreams_png", "dreams_npz"):
        assert paths[key].exists() and paths[key].stat().st_size > 0, key
    assert json.loads(paths["json"].read_text()) == outcome.report
    for key in ("accuracy_png", "dreams_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(paths["dreams_npz"]) as saved:
        np.testing.assert_array_equal(saved["dreams"], outcome.dreams)
        np.testing.assert_allclose(saved["mean"], outcome.mean)
    assert not list((tmp_path / "run").glob("*.tmp*"))


def test_markdown_carries_the_numbers_of_the_json() -> None:
    report = synthetic_report()
    md = render_markdown(report, images=["accuracy.png", "dreams.png"])
    assert pct(0.681149) == "68.11" and pct(None) == "–"
    assert "| codream | 68.11 | 5.81 | 61.00 / 68.11 / 75.22 | 2, 2, 2 | 67.11 |" in md
    for method, res in report["final"].items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {method} |"))
        assert pct(res["mean_accuracy"]) in row
        assert pct(float(np.std(res["per_client_accuracy"]))) in row
        for acc in res["per_client_accuracy"]:
            assert pct(acc) in row
    for r in report["rounds"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {r['round']} |"))
        assert pct(r["codream"]["mean_test"]) in row
        assert all(pct(t) in row for t in r["codream"]["test"])
        assert f"{sum(r['bytes_up']):,}" in row
    assert "12.50 s in total (baselines: isolated 2.50 s, centralized 4.25 s)." in md
    assert "1.234e-07" in md and "3.21e-08" in md and "| steps compared | 321 |" in md
    assert "1x8x8" in md
    assert "| 1 | 401 |" in md  # client 1's shard size
    assert "![accuracy](accuracy.png)" in md and "![dreams](dreams.png)" in md
    assert "fedavg" not in md.split("## Aggregator")[0]  # not run, so not invented


def test_markdown_tolerates_a_plain_aggregator_with_null_fields() -> None:
    report = synthetic_report(aggregator="plain")
    report["aggregator"].update(threshold=None, degree=None, ring_bits=None, scale_bits=None,
                                error_bound_per_step=None,
                                measured={"max_abs_error_vs_plain": None,
                                          "mean_abs_error_vs_plain": None, "steps_compared": 0})
    md = render_markdown(report)
    assert "| aggregator | plain |" in md and "## Figures" not in md


@pytest.mark.parametrize("channels", [1, 3])
def test_dream_grid_denormalises_clips_and_caps_at_64(channels: int) -> None:
    dreams = np.full((70, channels, 8, 8), 1.0, dtype=np.float32)
    dreams[0] = 100.0  # far out of range: must clip to 1
    dreams[1] = -2.0  # (-2 * 0.2 + 0.5) = 0.1 after de-normalisation
    grid = dream_grid(dreams, np.full(channels, 0.5), np.full(channels, 0.2))
    assert grid.ndim == (2 if channels == 1 else 3)
    assert grid.shape[:2] == (8 * 8 + 9, 8 * 8 + 9)  # 64 shown in an 8 x 8 grid, 1-px padding
    assert grid.min() >= 0.0 and grid.max() <= 1.0
    assert np.allclose(grid[1:9, 10:18], 0.1)
    assert np.allclose(grid[1:9, 1:9], 1.0)


def test_render_from_json_rebuilds_md_and_plots(tmp_path: Path) -> None:
    paths = write_report(synthetic_outcome(channels=3), tmp_path)
    for key in ("md", "accuracy_png", "dreams_png"):
        paths[key].unlink()
    again = render_from_json(tmp_path)
    assert {"md", "accuracy_png", "dreams_png"} <= set(again)
    assert all(again[k].exists() for k in ("md", "accuracy_png", "dreams_png"))
    (tmp_path / "dreams.npz").unlink()
    (tmp_path / "dreams.png").unlink()
    without = render_from_json(tmp_path)
    assert "dreams_png" not in without and not (tmp_path / "dreams.png").exists()
    assert "dreams.png" not in (tmp_path / "report.md").read_text()


def test_bad_output_folders_raise_report_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="does not exist"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(ReportError, match="not readable JSON"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ReportError, match="schema_version"):
        load_report(tmp_path)


def test_dreams_of_the_wrong_shape_are_a_bug_but_the_json_survives(tmp_path: Path) -> None:
    outcome = synthetic_outcome()
    outcome.dreams = outcome.dreams[:, 0]  # N x H x W
    with pytest.raises(ValueError, match="N x C x H x W") as caught:
        write_report(outcome, tmp_path)
    assert not isinstance(caught.value, ReportError)  # a bug: the CLI shows its traceback
    assert json.loads((tmp_path / "report.json").read_text()) == outcome.report


def test_a_run_without_dreams_still_reports_and_drops_stale_dream_files(tmp_path: Path) -> None:
    write_report(synthetic_outcome(), tmp_path)  # an earlier run in the same folder
    outcome = synthetic_outcome()
    outcome.dreams = outcome.dreams[:0]
    paths = write_report(outcome, tmp_path)
    assert set(paths) == {"json", "md", "accuracy_png"}
    assert not (tmp_path / "dreams.png").exists() and not (tmp_path / "dreams.npz").exists()
    assert "dreams.png" not in paths["md"].read_text()


def test_optional_fields_are_rendered_when_present() -> None:
    report = synthetic_report()
    report["aggregator"]["measured"].update(clipped_values=17, seconds=2.5)
    report["rounds"][1]["included_in_dreams"] = [0, 2]
    report["dataset"]["source"] = "sklearn digits"
    report["timing"]["resumed"] = True
    report["command"] = "codream-secure simulate --rounds 3"
    report["machine"]["torch_threads"] = 7
    md = render_markdown(report)
    assert "| values clipped before encoding | 17 |" in md
    assert "| seconds spent aggregating | 2.5 |" in md
    assert "| in dreams |" in md and "| 0, 2 |" in md
    assert "sklearn digits" in md and "resumed from a checkpoint" in md
    assert "`codream-secure simulate --rounds 3`" in md and "| machine.torch_threads | 7 |" in md
