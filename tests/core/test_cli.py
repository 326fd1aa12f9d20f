"""cli.py: help that lists every flag, one-line errors with exit 2, a patched run, `report`."""

from __future__ import annotations

import io
import json
import re
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from codream_secure import __version__
from codream_secure.cli import main
from codream_secure.cli_options import FLAGS, MOVED, PANELS, flag
from codream_secure.config import KEY_SECTION, SimulationConfig
from codream_secure.config.codream import ROUND_ORDERS
from codream_secure.errors import DataError
from codream_secure.progress import NullProgress, RichProgress
from codream_secure.report import pct
from protocols.errors import OverflowBudgetError
from tests.core.test_report import synthetic_outcome

RUN_MODULE = "codream_secure.simulation"  # where the CLI imports run_simulation from, lazily


def stub_simulation(monkeypatch: pytest.MonkeyPatch, run_simulation) -> None:
    """Stand in for the simulation module (no torch, no training) for one test."""
    stub = types.ModuleType(RUN_MODULE)
    stub.run_simulation = run_simulation
    monkeypatch.setitem(sys.modules, RUN_MODULE, stub)


def invoke(*args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, list(args))


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace the simulation module with a stub whose run_simulation records its calls."""
    calls: list = []

    def run_simulation(config, *, progress=None, resume=False):
        calls.append((config, progress, resume))
        progress.log("stub run")
        return synthetic_outcome(clients=config.data.clients, rounds=3)

    stub_simulation(monkeypatch, run_simulation)
    return calls


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""


def _panels(help_text: str) -> dict[str, list[str]]:
    """The lines of each boxed panel of rich-click's help, by title."""
    panels: dict[str, list[str]] = {}
    title = None
    for line in help_text.splitlines():
        if line.startswith("╭─ "):
            title = line[3:].split(" ─")[0]
            panels[title] = [line]
        elif title is not None:
            panels[title].append(line)
            if line.startswith("╰"):
                title = None
    return panels


def test_help_groups_the_usual_flags_by_section() -> None:
    result = CliRunner(env={"COLUMNS": "100"}).invoke(main, ["simulate", "--help"])
    assert result.exit_code == 0
    panels = _panels(result.output)
    assert list(panels) == [title for title, _ in PANELS]
    shown = [option for _, options in PANELS for option in options]
    assert 15 <= len(shown) - 1 <= 22  # --help aside
    assert set(shown) == {flag(key) for key in FLAGS} | {"--config", "--resume", "--quiet",
                                                         "--help"}
    for title, options in PANELS:
        text = "\n".join(panels[title])
        assert all(option in text for option in options), title
        assert len(panels[title]) <= 24, title  # one screen
        table = title.split()[-1]
        assert all(KEY_SECTION[key] == table[1:-1] for key in FLAGS if flag(key) in options)
    for key in MOVED:  # the expert keys live in the file and the docs, not in --help
        assert flag(key) not in result.output, key
    words = " ".join(result.output.replace("│", " ").split())  # the panels' lines rejoined
    for text in ("[default: secagg]", "report.json", "docs/configuration.md", "round_order",
                 *ROUND_ORDERS, "--dream-mode generator"):
        assert text in words, text
    # no timings or measured figures: no milliseconds, seconds, percentages or speed-ups
    figures = r"\d\s*(ms|s|%|x)\b|\bH100\b|\bpoints\b"
    assert not re.search(figures, result.output)
    assert re.search(figures, "a training step took 4.45 ms")  # the pattern does catch one


def test_a_report_json_repeats_its_run(tmp_path: Path, fake_run: list) -> None:
    config = SimulationConfig.from_keys(clients=5, rounds=2, dream_lr=0.01, masking="host",
                                        baselines=(), out=str(tmp_path / "first"))
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"schema_version": 1, "config": config.to_dict()}))
    again = tmp_path / "again"
    result = invoke("simulate", "--config", str(report), "--quiet", "--out", str(again))
    assert result.exit_code == 0, result.output
    assert fake_run[0][0] == config.replace(out=str(again))
    written = json.loads((again / "report.json").read_text())["config"]
    assert set(written) == {"data", "models", "codream", "aggregation", "privacy", "device",
                            "run"}


def test_every_key_is_a_flag_or_names_its_table_when_its_old_flag_is_used() -> None:
    assert set(FLAGS) | set(MOVED) == set(KEY_SECTION) and not set(FLAGS) & set(MOVED)
    for key in MOVED:
        result = invoke("simulate", flag(key), "1")
        assert_one_line_error(result, f"{flag(key)} is no longer a flag",
                              f"`[{KEY_SECTION[key]}] {key}`", "--config")


def test_version_and_group_help() -> None:
    assert __version__ in invoke("--version").output
    result = invoke("--help")
    assert result.exit_code == 0 and "simulate" in result.output and "report" in result.output


@pytest.mark.parametrize(("args", "fragments"), [
    (["simulate", "--bogus"], ["--bogus", "codream-secure simulate --help"]),
    (["simulate", "--aggregator", "rot13"], ["--aggregator", "rot13", "secagg+"]),
    (["simulate", "--clients", "many"], ["--clients", "'many' is not a valid integer"]),
    (["simulate", "--models", "smallcnn,gpt"], ["--models", "gpt"]),
    (["simulate", "--models", "smallcnn,"], ["--models", "empty item"]),
    (["simulate", "--data-dir", "/no/such/dir", "--dataset", "mnist"],
     ["--data-dir", "/no/such/dir", "does not exist"]),
    (["simulate", "--config", "/no/such.toml"], ["--config", "/no/such.toml"]),
    (["simulate", "--clients", "1"], ["clients", "at least 2", "got 1"]),
    (["simulate", "--alpha", "0"], ["alpha", "> 0"]),
    (["simulate", "--clients", "3", "--dropout-rate", "1"], ["[aggregation] dropout_rate"]),
    (["frobnicate"], ["No such command"]),
    (["report", "/no/such/run"], ["/no/such/run", "does not exist"]),
])
def test_bad_input_is_one_error_line_and_exit_2(args: list[str], fragments: list[str],
                                                fake_run: list) -> None:
    assert_one_line_error(invoke(*args), *fragments)
    assert fake_run == []  # rejected before any work


def test_malformed_and_unknown_key_toml(tmp_path: Path, fake_run: list) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [\n")
    assert_one_line_error(invoke("simulate", "--config", str(bad)), "bad.toml", "not valid TOML")
    typo = tmp_path / "typo.toml"
    typo.write_text("[codream]\ndreamsteps = 3\n")
    assert_one_line_error(invoke("simulate", "--config", str(typo)),
                          "[codream] unknown key 'dreamsteps'", "dream_steps")
    flat = tmp_path / "flat.toml"
    flat.write_text("dream_steps = 3\nclients = 5\n")
    assert_one_line_error(invoke("simulate", "--config", str(flat)),
                          "`dream_steps` is now `[codream] dream_steps`",
                          "`clients` is now `[data] clients`")
    dropped = tmp_path / "dropped.toml"
    dropped.write_text("[aggregation]\ndropout_clients = [0, 1, 2]\n")
    assert_one_line_error(invoke("simulate", "--config", str(dropped)),
                          "[aggregation] dropout_clients", "needs at least 3")


@pytest.mark.parametrize("error", [DataError("mnist has no bundled copy: pass --data-dir"),
                                   OverflowBudgetError("ring_bits=8 cannot hold\n4 clients")])
def test_library_errors_during_the_run_exit_2(error: Exception, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def run_simulation(config, *, progress=None, resume=False):
        raise error

    stub_simulation(monkeypatch, run_simulation)
    result = invoke("simulate", "--quiet", "--out", str(tmp_path / "run"))
    assert_one_line_error(result, str(error).split("\n")[0])


def test_bugs_still_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run_simulation(config, *, progress=None, resume=False):
        raise KeyError("a bug")

    stub_simulation(monkeypatch, run_simulation)
    result = invoke("simulate", "--out", str(tmp_path / "run"))
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_simulate_writes_the_report_and_prints_the_table(tmp_path: Path, fake_run: list) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('[codream]\nrounds = 9\n[data]\nclients = 4\n'
                    '[models]\nmodels = ["resnet8"]\n'
                    '[aggregation]\naggregator = "plain"\ndropout_clients = [2]\n'
                    '[run]\nbaselines = []\n')
    out = tmp_path / "run"
    result = invoke("simulate", "--config", str(toml), "--rounds", "3", "--aggregator",
                    "secagg+", "--out", str(out), "--resume")
    assert result.exit_code == 0, result.output
    (config, progress, resume), = fake_run
    assert resume is True and progress is not None
    assert config == SimulationConfig.from_keys(rounds=3, clients=4, models=("resnet8",),
                                                aggregator="secagg+", dropout_clients=(2,),
                                                baselines=(), out=str(out))
    for name in ("report.json", "report.md", "accuracy.png", "dreams.png", "dreams.npz"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    for method, res in report["final"].items():
        row = next(line for line in result.stdout.splitlines() if method in line)
        assert pct(res["mean_accuracy"]) in row and pct(res["mean_accuracy"]) in md
        assert all(pct(a) in row for a in res["per_client_accuracy"])
    assert "max |secure - plain| = 1.23e-07" in result.stdout
    assert str(out) in result.stdout and "Run time: 12.5 s" in result.stdout
    assert "stub run" in result.stderr  # progress goes to stderr, plain lines off a terminal


def test_quiet_prints_only_the_report_path(tmp_path: Path, fake_run: list) -> None:
    result = invoke("simulate", "--quiet", "--out", str(tmp_path / "q"))
    assert result.exit_code == 0
    assert result.stdout.strip() == str(tmp_path / "q" / "report.json")
    assert result.stderr == ""
    assert fake_run[0][2] is False


def test_out_that_is_a_file_fails_before_the_run(tmp_path: Path, fake_run: list) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    toml = tmp_path / "c.toml"
    toml.write_text(f'[run]\nout = "{blocker / "sub"}"\n')
    assert_one_line_error(invoke("simulate", "--config", str(toml)), str(blocker / "sub"))
    assert fake_run == []


def test_report_command_rerenders(tmp_path: Path, fake_run: list) -> None:
    out = tmp_path / "run"
    assert invoke("simulate", "--quiet", "--out", str(out)).exit_code == 0
    for name in ("report.md", "accuracy.png", "dreams.png"):
        (out / name).unlink()
    report = json.loads((out / "report.json").read_text())
    report["final"]["codream"]["mean_accuracy"] = 0.987654  # an auditor's edit shows up
    (out / "report.json").write_text(json.dumps(report))
    result = invoke("report", str(out))
    assert result.exit_code == 0, result.output
    for name in ("report.md", "accuracy.png", "dreams.png"):
        assert (out / name).exists(), name
    assert "98.77" in (out / "report.md").read_text() and "98.77" in result.stdout


def test_report_command_on_a_folder_without_report(tmp_path: Path) -> None:
    assert_one_line_error(invoke("report", str(tmp_path)), "report.json does not exist")


def test_plain_progress_is_throttled_off_a_terminal() -> None:
    sink = io.StringIO()
    with RichProgress(Console(file=sink, width=100), interval=3600) as quiet:
        task = quiet.task("dream steps", 10_000)
        for _ in range(10_000):
            quiet.advance(task)
        quiet.done(task)
        quiet.log("round 1: [bold]mean[/bold] 0.5")
    assert sink.getvalue() == "round 1: [bold]mean[/bold] 0.5\n"  # one line, markup not parsed
    sink = io.StringIO()
    with RichProgress(Console(file=sink, width=100), interval=0) as chatty:
        task = chatty.task("rounds", 2)
        chatty.advance(task)
        chatty.advance(task)
        chatty.done(task)
    assert sink.getvalue().splitlines()[0] == "rounds: 1/2"
    assert sink.getvalue().splitlines()[1].startswith("rounds: done 2/2 in ")


def test_live_bars_on_a_terminal_and_null_progress() -> None:
    sink = io.StringIO()
    with RichProgress(Console(file=sink, force_terminal=True, width=100)) as live:
        assert live.live
        first, second = live.task("rounds", 3), live.task("dreams", 5)
        assert first != second
        live.advance(second, 5)
        live.done(second)
        live.log("hello")
    assert "hello" in sink.getvalue()
    null = NullProgress()
    assert null.task("a", 1) != null.task("b", 1)
    null.advance(1)
    null.done(1)
    null.log("ignored")


@pytest.mark.parametrize("args", [(), ("bench",)])
def test_a_bare_command_prints_its_help(args) -> None:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: codream-secure") and "Commands:" in result.stdout
    assert "Error" not in result.output


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 25600000000 bytes. Error code 12"),
    MemoryError(),
])
def test_running_out_of_memory_is_one_error_line(error, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    from codream_secure import simulation

    def run_simulation(*args, **kwargs):
        raise error

    monkeypatch.setattr(simulation, "run_simulation", run_simulation)
    toml = tmp_path / "huge.toml"
    toml.write_text("[codream]\ndream_batch = 100000000\nbuffer_size = 100000000\n")
    assert_one_line_error(invoke("simulate", "--config", str(toml), "--out",
                                 str(tmp_path / "run")), "out of memory",
                          "[codream] dream_batch")


def test_other_runtime_errors_are_not_taken_for_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from codream_secure import simulation

    def run_simulation(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(simulation, "run_simulation", run_simulation)
    result = invoke("simulate")
    assert isinstance(result.exception, RuntimeError) and "out of memory" not in result.output
