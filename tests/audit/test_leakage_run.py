"""The leakage composer: one report folder from the chosen sections, bad names refused."""

from __future__ import annotations

import json

import pytest

from codream_secure.audit.leakage.run import SECTIONS, BenchmarkError, run_leakage, section_settings


def test_composed_report_holds_each_section_with_its_settings_and_seeds(tmp_path):
    out = run_leakage(tmp_path / "leak", setting="tiny", sections=["server-view"])
    report = json.loads((out / "report.json").read_text())
    assert report["benchmark"] == "leakage"
    assert list(report["sections"]) == ["server_view"]
    assert report["config"]["settings"] == "tiny"
    assert set(report["config"]["sections"]) == {"server-view"}
    assert report["sections"]["server_view"]["seconds"] > 0
    assert (out / "report.md").read_text().startswith("# leakage benchmark")


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_section_has_all_three_settings(name):
    for setting in ("tiny", "default", "full"):
        module, settings = section_settings(name, setting)
        assert callable(module.run) and settings is not None


def test_unknown_names_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(BenchmarkError, match="unknown leakage section 'x'"):
        run_leakage(tmp_path, sections=["server-view", "x"])
    with pytest.raises(BenchmarkError, match="unknown settings 'huge'"):
        section_settings("dreams", "huge")
