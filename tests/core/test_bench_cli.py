"""`codream-secure bench`: bad names are one error line and exit status 2."""

from __future__ import annotations

from click.testing import CliRunner, Result

from codream_secure.cli import main


def _run(*args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, list(args))


def test_bench_help_names_both_benchmarks():
    result = _run("bench", "--help")
    assert result.exit_code == 0
    assert "leakage" in result.output and "overhead" in result.output


def test_unknown_leakage_section_is_an_error_naming_the_choices(tmp_path):
    out = tmp_path / "report"
    result = _run("bench", "leakage", "--sections", "dreams,telepathy", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "unknown leakage section 'telepathy'" in result.output
    assert "server-view" in result.output and "Traceback" not in result.output
    assert not out.exists()  # refused before the report folder is made


def test_unknown_settings_name_is_a_usage_error(tmp_path):
    result = _run("bench", "overhead", "--settings", "huge", "--out", str(tmp_path))
    assert result.exit_code == 2 and "'huge' is not one of" in result.output
