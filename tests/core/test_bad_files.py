"""Bad files in a run's folder: checkpoints, unwritable outputs, report.json, dreams.npz."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from codream_secure import simulation
from codream_secure.cli import main
from codream_secure.config import SimulationConfig
from codream_secure.errors import ConfigError
from codream_secure.federation import ChannelStats
from codream_secure.report import ReportError, load_report, write_report
from tests.core.test_report import synthetic_outcome, synthetic_report

TINY_FLAGS = ["--config", str(Path(__file__).with_name("tiny.toml")), "--clients", "2",
              "--models", "smallcnn", "--rounds", "1", "--dream-steps", "2", "--device", "cpu",
              "-q"]


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _simulate(out: Path, *extra: str) -> Result:
    return _cli("simulate", *TINY_FLAGS, "--out", str(out), *extra)


def _bad_input(result: Result, *fragments: str) -> None:
    """Exit status 2, one 'Error:' line naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and "Traceback" not in result.output
    assert "Aborted" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny finished run: its folder holds checkpoint.pt, report.json and dreams.npz."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = _simulate(out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def checkpoint_state(finished_run: Path) -> dict:
    return torch.load(finished_run / "checkpoint.pt", weights_only=False)  # made by the test


def _resume_with(tmp_path: Path, write) -> Result:
    """--resume in a fresh folder whose checkpoint.pt `write(path)` made."""
    out = tmp_path / "out"
    out.mkdir()
    write(out / "checkpoint.pt")
    return _simulate(out, "--resume")


def _edited(state: dict, edit) -> dict:
    state = copy.deepcopy(state)
    edit(state)
    return state


# ----------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_holds_only_tensors_and_plain_data(finished_run: Path) -> None:
    path = finished_run / "checkpoint.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []


def test_resuming_a_finished_run_reports_again(finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    shutil.copytree(finished_run, out)
    result = _simulate(out, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["timing"]["resumed"] is True


def test_a_checkpoint_of_the_earlier_format_still_resumes(checkpoint_state: dict,
                                                          tmp_path: Path) -> None:
    def legacy(state: dict) -> None:  # ChannelStats objects and numpy arrays, as pickled before
        state["channels"] = [(ChannelStats(**stats), np.array(up), np.array(down), clipped)
                             for stats, up, down, clipped in state["channels"]]
        state["broadcast_down"] = np.array(state["broadcast_down"])

    result = _resume_with(tmp_path, lambda p: torch.save(_edited(checkpoint_state, legacy), p))
    assert result.exit_code == 0, result.output


class _RunsCode:
    """A pickle that would create a file when loaded with weights_only=False."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


BAD_FILES = {
    "garbage": (lambda p: p.write_bytes(b"garbage\nbytes"), "tensors and plain data"),
    "empty": (lambda p: p.write_bytes(b""), "empty or cut short"),
    "empty dict": (lambda p: torch.save({}, p), "no 'config'"),
    "list": (lambda p: torch.save([1, 2], p), "holds a list"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_checkpoint_that_is_no_checkpoint_is_one_error(name: str, tmp_path: Path) -> None:
    write, reason = BAD_FILES[name]
    _bad_input(_resume_with(tmp_path, write), "--resume:", "checkpoint.pt is not a "
               "codream-secure checkpoint", reason)


def test_a_truncated_checkpoint_is_one_error(finished_run: Path, tmp_path: Path) -> None:
    data = (finished_run / "checkpoint.pt").read_bytes()
    result = _resume_with(tmp_path, lambda p: p.write_bytes(data[: len(data) // 2]))
    _bad_input(result, "not a codream-secure checkpoint", "unreadable")


def test_a_checkpoint_never_runs_code_from_the_file(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    result = _resume_with(tmp_path, lambda p: torch.save({"config": _RunsCode(target)}, p))
    _bad_input(result, "not a codream-secure checkpoint")
    assert not target.exists()


DAMAGED = {
    "a model missing": (lambda s: s["models"].pop(), "'models' should hold 2 client models"),
    "a key missing": (lambda s: s.pop("buffer"), "missing 'buffer'"),
    "wrong weights": (lambda s: s["models"][0].clear(), "client model 0 does not fit"),
    "wrong buffer": (lambda s: s.update(buffer=(torch.zeros(2, 1, 5, 5), torch.zeros(2, 10))),
                     "'buffer' should be 2 tensor(s)"),
    "wrong rounds": (lambda s: s.update(rounds=[5]), "must be a mapping"),
    "wrong byte counts": (lambda s: s.update(broadcast_down=[1, 2, 3]), "one entry per client"),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_a_damaged_checkpoint_is_one_error(name: str, checkpoint_state: dict,
                                           tmp_path: Path) -> None:
    edit, reason = DAMAGED[name]
    result = _resume_with(tmp_path, lambda p: torch.save(_edited(checkpoint_state, edit), p))
    _bad_input(result, "not a codream-secure checkpoint", reason)


def test_settings_only_the_new_version_has_are_named(checkpoint_state: dict,
                                                     tmp_path: Path) -> None:
    older = _edited(checkpoint_state, lambda s: s["config"]["device"].pop("dream_graph"))
    result = _resume_with(tmp_path, lambda p: torch.save(older, p))
    _bad_input(result, "different settings ([device] dream_graph)")


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("name", ["checkpoint.pt", "report.json", "accuracy.png"])
def test_an_output_file_that_is_a_folder_fails_before_the_run(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    _bad_input(_simulate(out), f"{out / name} is a folder")
    assert not (out / "checkpoint.pt").is_file()  # no round ran


def test_a_checkpoint_that_cannot_be_written_is_one_error(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulation, "check_output_folder", lambda *args: None)
    out = tmp_path / "out"
    (out / "checkpoint.pt").mkdir(parents=True)
    config = SimulationConfig.from_keys(
        max_train=120, max_test=60, clients=2, models=("smallcnn",), server_model="smallcnn",
        rounds=1, warmup_epochs=0, dream_batch=4, dream_steps=2, buffer_size=8, baselines=(),
        out=str(out))
    with pytest.raises(ConfigError, match=r"cannot write the checkpoint .*--resume"):
        simulation.run_simulation(config)


def test_a_report_json_that_cannot_be_written_is_kept_elsewhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "out" / "report.json").mkdir(parents=True)
    outcome = synthetic_outcome()
    with pytest.raises(ReportError, match="saved to") as caught:
        write_report(outcome, tmp_path / "out")
    kept = Path(str(caught.value).split("saved to ")[1].split(" instead")[0])
    assert kept.parent == tmp_path and json.loads(kept.read_text()) == outcome.report


def test_a_plot_that_cannot_be_written_leaves_report_json(tmp_path: Path) -> None:
    (tmp_path / "accuracy.png").mkdir()
    outcome = synthetic_outcome()
    with pytest.raises(ReportError, match=r"accuracy\.png .*report\.json is complete"):
        write_report(outcome, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == outcome.report
    _bad_input(_cli("report", str(tmp_path)), "cannot write", "accuracy.png")


@pytest.mark.parametrize("benchmark", ["overhead", "leakage"])
def test_bench_out_under_a_file_is_one_error(benchmark: str, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    result = _cli("bench", benchmark, "--settings", "tiny", "--out",
                  str(tmp_path / "afile" / "sub"))
    _bad_input(result, "afile", "Not a directory")


# ----------------------------------------------------------------------------- report command


def _run_folder(tmp_path: Path, report: dict, dreams: bytes | None = None) -> Path:
    (tmp_path / "report.json").write_text(json.dumps(report))
    if dreams is not None:
        (tmp_path / "dreams.npz").write_bytes(dreams)
    return tmp_path


@pytest.mark.parametrize(("dreams", "reason"), [(b"", "it is empty"),
                                                (b"PK\x03\x04 cut", "not a readable dreams")])
def test_a_broken_dreams_file_is_one_error(dreams: bytes, reason: str, tmp_path: Path) -> None:
    folder = _run_folder(tmp_path, synthetic_report(), dreams)
    _bad_input(_cli("report", str(folder)), "dreams.npz", reason)


def test_dreams_that_are_not_numbers_are_one_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "dreams.npz", dreams=np.array([["a"]]), mean=np.zeros(1), std=np.ones(1))
    folder = _run_folder(tmp_path, synthetic_report())
    _bad_input(_cli("report", str(folder)), "must be numeric")


def _with(path: str, value: object) -> dict:
    """synthetic_report() with the field at dotted `path` ('rounds.1.codream.test') replaced."""
    report = synthetic_report()
    *parents, last = path.split(".")
    node = report
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return report


BAD_REPORTS = {
    "no rounds": ({"schema_version": 1, "config": {}, "rounds": [], "final": {}},
                  "rounds must be a non-empty list"),
    "rounds a number": (_with("rounds", 5), "found int 5"),
    "config a list": (_with("config", []), "config must be an object"),
    "round not an object": (_with("rounds.1", "r"), "rounds[1] must be an object"),
    "ragged accuracies": (_with("rounds.1.codream.test", [0.5]),
                          "rounds[1].codream.test must be one accuracy per client (3"),
    "text accuracies": (_with("rounds.0.codream.test", ["a"]), "a list of numbers"),
    "no mean": (_with("rounds.0.codream.mean_test", None), "mean_test must be a number"),
    "seconds a list": (_with("rounds.0.seconds", []), "rounds[0].seconds must be an object"),
    "final a list": (_with("final", []), "final must be an object"),
    "method a number": (_with("final.codream", 1), "final.codream must be an object"),
    "mean as text": (_with("final.isolated.mean_accuracy", "high"),
                     "final.isolated.mean_accuracy must be a number or null"),
    "aggregator null": (_with("aggregator", None), "aggregator must be an object"),
    "measured error as text": (_with("aggregator.measured.max_abs_error_vs_plain", "0"),
                               "max_abs_error_vs_plain must be a number"),
    "sizes null": (_with("dataset.client_sizes", None), "dataset.client_sizes must be a list"),
    "seconds as text": (_with("timing.total_seconds", "5"), "timing.total_seconds"),
    "curve of text": (_with("baseline_curves.isolated.test", [["x"]]),
                      "baseline_curves.isolated.test[0]"),
    "privacy delta missing": (_with("privacy", {"enabled": True}), "privacy.delta"),
}


@pytest.mark.parametrize("name", sorted(BAD_REPORTS))
def test_a_report_json_of_the_wrong_shape_names_the_field(name: str, tmp_path: Path) -> None:
    report, reason = BAD_REPORTS[name]
    folder = _run_folder(tmp_path, report)
    with pytest.raises(ReportError, match=r"report\.json: ") as caught:
        load_report(folder)
    assert reason in str(caught.value)
    _bad_input(_cli("report", str(folder)), reason)
    assert not (folder / "report.md").exists()


def test_a_real_run_and_the_synthetic_report_pass_the_checks(finished_run: Path,
                                                             tmp_path: Path) -> None:
    assert load_report(finished_run)["schema_version"] == 1
    assert load_report(_run_folder(tmp_path, synthetic_report()))["rounds"]


def test_a_folder_that_refuses_files_fails_before_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)  # root ignores a chmod 500
    _bad_input(_simulate(tmp_path / "out"), "cannot write into", "Permission denied")
