"""The benchmark report folder: report.json fields, CSVs, markdown, non-finite values."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from codream_secure.audit.reporting import SectionResult, environment, write_csv, write_report


def _section() -> SectionResult:
    return SectionResult(
        name="demo", title="Demo section",
        summary={"auc": 0.75, "psnr_max": float("inf"), "count": np.int64(3)},
        rows=[{"method": "a", "auc": 0.5}, {"method": "b", "auc": 1.0, "extra": [1, 2]}],
        arrays={"scores": np.arange(6, dtype=float).reshape(3, 2)},
        notes=["a note"], seconds=1.5,
    )


def test_report_folder_holds_config_seeds_environment_and_sections(tmp_path):
    out = write_report(tmp_path / "r", benchmark="demo", config={"n": 4},
                       seeds=[0, 1], sections=[_section()])
    report = json.loads((out / "report.json").read_text())
    assert report["config"] == {"n": 4} and report["seeds"] == [0, 1]
    env = report["environment"]
    assert {"versions", "git_revision", "machine", "date_utc", "command"} <= set(env)
    assert env["versions"]["numpy"] == np.__version__
    section = report["sections"]["demo"]
    assert section["summary"] == {"auc": 0.75, "psnr_max": "inf", "count": 3}
    assert section["files"] == ["demo.csv", "demo_scores.csv"]
    markdown = (out / "report.md").read_text()
    assert "## Demo section" in markdown and "| method | auc | extra |" in markdown
    assert "> a note" in markdown


def test_csv_of_rows_takes_the_union_of_keys_and_arrays_keep_their_values(tmp_path):
    rows = write_csv(tmp_path / "rows.csv", [{"a": 1}, {"b": 2.5}])
    assert list(csv.reader(rows.open())) == [["a", "b"], ["1", ""], ["", "2.5"]]
    array = write_csv(tmp_path / "a.csv", np.array([1.0, 2.0]))
    assert list(csv.reader(array.open())) == [["1.0"], ["2.0"]]
    with pytest.raises(ValueError, match="1-D or 2-D"):
        write_csv(tmp_path / "bad.csv", np.zeros((2, 2, 2)))


def test_environment_names_the_machine():
    machine = environment()["machine"]
    assert machine["cpu_count"] >= 1 and machine["cpu"]
