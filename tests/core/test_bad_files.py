"""Bad files: checkpoints, unwritable outputs, report.json, dreams.npz, and malformed data and
config files, each one error line."""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from codream_secure import simulation
from codream_secure.checkpoint_file import HEADER_BYTES, config_sha256, read_sealed, write_sealed
from codream_secure.cli import main
from codream_secure.config import SimulationConfig, build_config, load_config
from codream_secure.errors import ConfigError, DataError
from codream_secure.formats import read_cifar_batch, read_idx_split
from codream_secure.npz_format import read_npz
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
    content = read_sealed(finished_run / "checkpoint.pt").content
    return torch.load(io.BytesIO(content), weights_only=False)  # made by the test


def _sealed(state: dict):
    """A writer of `state` sealed with freshly computed digests, as a hand-made file would be."""
    return lambda path: write_sealed(path, state, config_sha256(state.get("config", {})))


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
    content = read_sealed(finished_run / "checkpoint.pt").content
    assert torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(content)) == []


def test_resuming_a_finished_run_reports_again(finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    shutil.copytree(finished_run, out)
    result = _simulate(out, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["timing"]["resumed"] is True


class _RunsCode:
    """A pickle that would create a file when loaded with weights_only=False."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _sealed_bytes(content: bytes):
    """A writer of a sealed file around `content`, which need not be a torch file."""
    def write(path: Path) -> None:
        write_sealed(path, {}, config_sha256({}))
        header = path.read_bytes()[:HEADER_BYTES].split(b"\n")
        header[1] = b"content-bytes %016d" % len(content)
        header[2] = b"content-sha256 " + hashlib.sha256(content).hexdigest().encode()
        path.write_bytes(b"\n".join(header) + content)

    return write


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


BAD_FILES = {
    "garbage": (lambda p: p.write_bytes(b"garbage\nbytes"), "does not begin with the line"),
    "empty": (lambda p: p.write_bytes(b""), "truncated: it holds only 0 bytes"),
    "a bare torch file": (lambda p: torch.save({}, p), "does not begin with the line"),
    "sealed garbage": (_sealed_bytes(b"garbage"), "not a torch file of tensors"),
    "sealed empty dict": (_sealed({}), "no 'config'"),
    "sealed nothing": (_sealed_bytes(b""), "unreadable content"),
    "sealed list": (_sealed_bytes(_torch_bytes([1, 2])), "holds a list"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_checkpoint_that_is_no_checkpoint_is_one_error(name: str, tmp_path: Path) -> None:
    write, reason = BAD_FILES[name]
    _bad_input(_resume_with(tmp_path, write), "--resume:", "checkpoint.pt ", reason)


def test_a_truncated_checkpoint_is_one_error(finished_run: Path, tmp_path: Path) -> None:
    data = (finished_run / "checkpoint.pt").read_bytes()
    result = _resume_with(tmp_path, lambda p: p.write_bytes(data[: len(data) // 2]))
    _bad_input(result, "checkpoint.pt is truncated: its header promises")


def test_a_checkpoint_never_runs_code_from_the_file(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    result = _resume_with(tmp_path, _sealed({"config": _RunsCode(target)}))
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
    "a stray meta-generator": (lambda s: s.update(generator={"w": torch.zeros(1)}),
                               "holds a meta-generator, but this run dreams in pixel mode"),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_a_damaged_checkpoint_is_one_error(name: str, checkpoint_state: dict,
                                           tmp_path: Path) -> None:
    edit, reason = DAMAGED[name]
    result = _resume_with(tmp_path, _sealed(_edited(checkpoint_state, edit)))
    _bad_input(result, "not a codream-secure checkpoint", reason)


def test_settings_only_the_new_version_has_are_named(checkpoint_state: dict,
                                                     tmp_path: Path) -> None:
    older = _edited(checkpoint_state, lambda s: s["config"]["device"].pop("dream_graph"))
    result = _resume_with(tmp_path, _sealed(older))
    _bad_input(result, "checkpoint.pt was written under different settings ([device] dream_graph)")


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
    "baseline seconds a list": (_with("timing.baseline_seconds", [1.0]),
                                "timing.baseline_seconds must be an object"),
    "baseline seconds as text": (_with("timing.baseline_seconds.isolated", "2"),
                                 "timing.baseline_seconds.isolated must be a number"),
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


# ----------------------------------------------------------------------------- data files


def _npz(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)
    return path


def _idx_bytes(dims: tuple[int, ...], body: bytes) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + body


def _idx_folder(folder: Path, images: bytes, gz: bool = False) -> Path:
    """`folder` with train images `images` (gzipped as given when `gz`) and 3 valid labels."""
    (folder / f"train-images-idx3-ubyte{'.gz' * gz}").write_bytes(images)
    (folder / "train-labels-idx1-ubyte").write_bytes(_idx_bytes((3,), bytes(3)))
    return folder


X8 = np.random.default_rng(0).random((12, 6, 6)).astype(np.float32)
Y8 = np.arange(12) % 3

BAD_NPZ = {
    "beyond float32": ({"x": X8.astype(np.float64) * 1e300, "y": Y8}, "beyond ±1e+06"),
    "infinite pixel": ({"x": np.where(X8 > 0.5, np.inf, X8), "y": Y8}, "NaN or infinity"),
    "float16 infinity": ({"x": np.where(X8 > 0.5, np.float16(np.inf), X8.astype(np.float16)),
                          "y": Y8}, "NaN or infinity"),
    "complex pixels": ({"x": X8.astype(np.complex64), "y": Y8}, "uint8 or floating point"),
    "object array": ({"x": np.array([X8[0], "a"], dtype=object), "y": Y8[:2]},
                     "Object arrays cannot be loaded"),
    "zero images": ({"x": X8[:0], "y": Y8[:0]}, "no images"),
    "an empty side": ({"x": X8[:, :0], "y": Y8}, "an empty dimension"),
    "x and y lengths": ({"x": X8, "y": Y8[:5]}, "12 images but 5 labels"),
    "float labels": ({"x": X8, "y": Y8.astype(np.float32)}, "1-D integer array"),
    "uint64 labels past int64": ({"x": X8, "y": np.array([0, 1, 2**64 - 1] * 4, np.uint64)},
                                 "labels run up to 18446744073709551615"),
    "an empty class": ({"x": X8, "y": np.array([0, 2] * 6)}, "class 1 (1 in all) has no example"),
    "a class only in the test set": ({"x": X8, "y": Y8, "x_test": X8[:4],
                                      "y_test": np.array([0, 1, 5, 1])},
                                     "class 3 (3 in all) has no example"),
    "one class": ({"x": X8, "y": np.zeros(12, int)}, "at least 2 classes"),
}


@pytest.mark.parametrize("name", sorted(BAD_NPZ))
def test_a_malformed_npz_is_one_data_error(name: str, tmp_path: Path) -> None:
    arrays, reason = BAD_NPZ[name]
    path = _npz(tmp_path / "d.npz", **arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warning may come before the error
        with pytest.raises(DataError) as caught:
            read_npz(path)
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_an_npz_member_that_is_no_array_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x", b"not an array")  # a member without .npy comes back as bytes
        archive.writestr("y.npy", _npy(Y8))
    with pytest.raises(DataError, match=r"\[x\]: not a \.npy array member"):
        read_npz(path)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_an_idx_header_of_absurd_size_is_refused_before_the_body_is_read(tmp_path: Path) -> None:
    # 100 MB of zeros gzip to 100 kB; the header claims 2^31 images of 28x28
    _idx_folder(tmp_path, gzip.compress(_idx_bytes((2**31, 28, 28), bytes(100_000_000)),
                                        mtime=0), gz=True)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="more than this reader takes"):
            read_idx_split(tmp_path, "train", num_classes=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000  # the 100 MB body was never decompressed


def test_an_idx_body_longer_than_its_header_is_not_unzipped_whole(tmp_path: Path) -> None:
    _idx_folder(tmp_path, gzip.compress(_idx_bytes((3, 28, 28), bytes(100_000_000)), mtime=0),
                gz=True)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"says \(3, 28, 28\) = 2352 bytes but the file "
                                            "holds more"):
            read_idx_split(tmp_path, "train", num_classes=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000


@pytest.mark.parametrize(("dims", "reason"), [((0, 28, 28), "no images"),
                                              ((5, 0, 28), "no pixels"),
                                              ((5, 9000, 28), "beyond 8192 per side")])
def test_idx_headers_with_empty_or_absurd_sides(dims: tuple, reason: str, tmp_path: Path) -> None:
    _idx_folder(tmp_path, _idx_bytes(dims, b""))
    with pytest.raises(DataError, match=reason):
        read_idx_split(tmp_path, "train", num_classes=10)


def test_a_corrupted_gzip_stream_is_one_error(tmp_path: Path) -> None:
    raw = bytearray(gzip.compress(_idx_bytes((3, 4, 4), bytes(48)), mtime=0))
    raw[len(raw) // 2] ^= 0xFF
    _idx_folder(tmp_path, bytes(raw), gz=True)
    with pytest.raises(DataError, match="not a valid gzip file"):
        read_idx_split(tmp_path, "train", num_classes=10)


# a pickle that calls numpy.ndarray((10**10,), 'u1'): 10 GB that the 60-byte file does not hold
HUGE_ARRAY_PICKLE = b"cnumpy\nndarray\n(I10000000000\n\x85S'u1'\ntR."


@pytest.mark.parametrize(("blob", "reason"), [
    (HUGE_ARRAY_PICKLE, "pickle calls numpy.ndarray itself"),
    (b"c__builtin__\nbytearray\n(I10000000000\ntR.", "__builtin__.bytearray, which is not"),
    (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\nI99999999\n\x85S'b'\ntR.",
     "not as numpy pickles do"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), 1: [0, 1]}),
     "batch lacks b'data' or b'labels' (keys: 1, b'data')"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 2**70]}),
     "must be a flat list of integers"),
    (pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}), "no images"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:-30],
     "not a readable pickle"),
])
def test_a_malformed_cifar_batch_is_one_error(blob: bytes, reason: str, tmp_path: Path) -> None:
    (tmp_path / "data_batch_1").write_bytes(blob)
    with pytest.raises(DataError) as caught:
        read_cifar_batch(tmp_path / "data_batch_1", label_key=b"labels", num_classes=10)
    assert reason in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("text", "reason"), [
    (b"[codream]\nrounds = 2\nx = [\n", "(at line 4, the end of the file)"),
    (b"[codream]\nrounds = 2\n\nx = = 1\n", "(at line 4, column 5)"),
    (b"[codream]\nrounds = \"\xff\"\n", "line 2 is not UTF-8 text"),
    (b"a = " + b"[" * 5000, "nested too deeply"),
    (b"[codream.rounds]\nx = 1\n", "[codream] rounds: expected an integer, got {'x': 1}"),
    (b"[codream]\nrounds = \"2\"\n", "[codream] rounds: expected an integer, got '2'"),
])
def test_a_malformed_toml_config_is_one_error(text: bytes, reason: str, tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_bytes(text)
    with pytest.raises(ConfigError) as caught:
        build_config(load_config(tmp_path / "c.toml"), {})
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def _cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codream_secure.cli", "simulate", *TINY_FLAGS,
                           *args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("case", ["npz beyond float32", "toml syntax", "idx absurd header"])
def test_the_cli_reports_a_bad_data_file_in_exactly_one_line(case: str, tmp_path: Path) -> None:
    """A separate process, so that whatever numpy or torch would print reaches its stderr."""
    if case == "npz beyond float32":
        data = _npz(tmp_path / "d.npz", x=X8.astype(np.float64) * 1e300, y=Y8)
        args, reason = ["--dataset", "npz", "--data-dir", str(data)], "beyond ±1e+06"
    elif case == "toml syntax":
        (tmp_path / "c.toml").write_text("rounds = 1\nseed = [\n")
        args, reason = ["--config", str(tmp_path / "c.toml")], "at line 3"
    else:
        _idx_folder(tmp_path, _idx_bytes((2**31, 9000, 28), b""))
        args, reason = ["--dataset", "mnist", "--data-dir", str(tmp_path)], "per side"
    result = _cli_subprocess(*args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stdout == "", result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and reason in lines[0], lines
