"""The benchmark report folder: report.json fields, CSVs, markdown, non-finite values."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from codream_secure.audit import reporting
from codream_secure.audit.reporting import (
    SectionResult,
    environment,
    write_csv,
    write_json,
    write_report,
    write_table_report,
)


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


def test_table_report_keeps_its_keys_and_adds_the_environment(tmp_path):
    report = {"config": {"out": tmp_path}, "machine": reporting.host(),
              "rows": [{"ms": np.float32(1.5), "ratio": float("nan")}]}
    out = write_table_report(tmp_path / "t", "overhead", report, "| a |\n|---|\n\n")
    written = json.loads((out / "overhead.json").read_text())
    assert set(written) == {"config", "machine", "rows", "environment"}
    assert set(written["machine"]) == {"platform", "processor", "python", "cpus"}
    assert written["config"]["out"] == str(tmp_path)
    assert written["rows"] == [{"ms": 1.5, "ratio": "nan"}]
    assert written["environment"]["versions"]["numpy"] == np.__version__
    assert (out / "overhead.md").read_text() == "| a |\n|---|\n"


def test_json_has_a_final_newline_and_plain_numbers(tmp_path):
    path = write_json(tmp_path / "deep" / "runs.json", [{"n": np.int64(3)}], indent=1)
    assert path.read_text().endswith("]\n") and json.loads(path.read_text()) == [{"n": 3}]


def test_git_revision_is_none_outside_a_checkout(tmp_path, monkeypatch):
    fake = tmp_path / "site-packages" / "codream_secure" / "audit" / "reporting.py"
    monkeypatch.setattr(reporting, "__file__", str(fake))
    assert reporting.environment()["git_revision"] is None


def test_git_revision_names_the_checkouts_head():
    root = Path(reporting.__file__).resolve().parents[2]
    if not (root / ".git").exists():
        pytest.skip("not run from a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert environment()["git_revision"].removesuffix("-dirty") == head
