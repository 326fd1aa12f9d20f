"""A refused `simulate` leaves an existing run folder as it was: every check (flags, data,
models, aggregation, DP, --resume checkpoint, output names) runs before anything is written."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from codream_secure.checkpoint_file import HEADER_BYTES
from codream_secure.cli import main
from codream_secure.models import build_model
from codream_secure.preflight import check_trains_on
from tests.core import test_bad_files
from tests.core.test_bad_files import TINY_FLAGS
from tests.core.test_cli import assert_one_line_error

TINY_TOML = Path(__file__).with_name("tiny.toml")

Snapshot = dict[str, tuple[bytes | None, int]]


def snapshot(folder: Path) -> Snapshot:
    """Every file's bytes and every file's and folder's mtime (ns), the folder's own included."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None,
                                         p.stat().st_mtime_ns)
            for p in (folder, *sorted(folder.rglob("*")))}


def _simulate(out: Path, *extra: str) -> Result:
    return CliRunner().invoke(main, ["simulate", *TINY_FLAGS, *extra, "--out", str(out)])


def _config(tmp: Path, text: str) -> list[str]:
    """--config with tiny.toml's keys plus `text` (its tables repeat none of tiny.toml's keys)."""
    tables: dict[str, list[str]] = {}
    table = None
    for line in (TINY_TOML.read_text() + "\n" + text).splitlines():
        if line.startswith("["):
            table = tables.setdefault(line, [])
        elif line.strip() and not line.startswith("#") and table is not None:
            key = line.split("=")[0].strip()
            table[:] = [kept for kept in table if kept.split("=")[0].strip() != key] + [line]
    path = tmp / "run.toml"
    path.write_text("".join(f"{name}\n" + "\n".join(lines) + "\n\n"
                            for name, lines in tables.items()))
    return ["--config", str(path)]


def _nan_npz(tmp: Path) -> list[str]:
    x = np.random.default_rng(0).random((60, 8, 8)).astype(np.float32)
    x[3, 2, 1] = np.nan
    np.savez(tmp / "data.npz", x=x, y=np.arange(60) % 3)
    return ["--dataset", "npz", "--data-dir", str(tmp / "data.npz")]


def _bad_toml(tmp: Path) -> list[str]:
    (tmp / "bad.toml").write_text("[codream\nrounds = 1\n")
    return ["--config", str(tmp / "bad.toml")]


def _flipped_checkpoint(tmp: Path, out: Path) -> list[str]:
    raw = bytearray((out / "checkpoint.pt").read_bytes())
    raw[HEADER_BYTES + 100] ^= 0x10
    (out / "checkpoint.pt").write_bytes(raw)
    return []


def _output_name_is_a_folder(tmp: Path, out: Path) -> list[str]:
    (out / "privacy.png").mkdir()
    return []


Case = Callable[[Path, Path], list[str]]


def _args(*args: str) -> Case:
    return lambda tmp, out: list(args)


# each kind of refused run: (its arguments, made in a scratch folder and the run folder; a
# fragment of its one error line)
REFUSED: dict[str, tuple[Case, str]] = {
    "DP noise without DP": (_args("--dp-epsilon", "1"), "[privacy] dp:"),
    "DP without a budget": (_args("--dp", "client"), "exactly one of dp_noise"),
    "an unknown model": (_args("--models", "nosuch"), "Invalid value for '--models'"),
    "a moved flag": (_args("--grad-clip", "2"), "no longer a flag"),
    "a missing data folder": (_args("--dataset", "mnist", "--data-dir", "/nonexistent/mnist"),
                              "does not exist"),
    "a missing data folder in the config": (
        lambda tmp, out: _config(tmp, '[data]\ndataset = "mnist"\ndata_dir = "/nonexistent"'),
        "[data] data_dir"),
    "a dataset with no bundled copy": (_args("--dataset", "cifar10"), "no bundled copy"),
    "unusable data": (lambda tmp, out: _nan_npz(tmp), "NaN"),
    "a config that is no TOML": (lambda tmp, out: _bad_toml(tmp), "not valid TOML"),
    "too few samples for the clients": (_args("--clients", "40"), "40 clients"),
    "too few clients for the threshold": (
        lambda tmp, out: _config(tmp, "[aggregation]\ndropout_clients = [1]"),
        "[aggregation] dropout_clients"),
    "a model that cannot train on the batch": (
        lambda tmp, out: [*_config(tmp, "[codream]\nbatch_size = 1"), "--models", "vgg11"],
        "[models] model 'vgg11' cannot train on batches of 1"),
    "a server model that cannot distil one dream": (
        lambda tmp, out: _config(tmp, '[codream]\ndream_batch = 1\n[models]\n'
                                      'server_model = "vgg11"'),
        "[models] server model 'vgg11'"),
    "dream gradients the ring cannot sum": (
        lambda tmp, out: _config(tmp, "[aggregation]\nring_bits = 8\ngrad_clip = 1000.0"),
        "[aggregation] grad_clip: the sum of n=2 clipped inputs can wrap"),
    "generator updates the ring cannot sum": (
        lambda tmp, out: [*_config(tmp, "[aggregation]\nring_bits = 8\n[codream]\n"
                                        "generator_clip = 1000.0"), "--dream-mode", "generator"],
        "[codream] generator_clip: the sum of n=2 clipped inputs can wrap"),
    "soft labels the ring cannot sum": (
        lambda tmp, out: _config(tmp, "[aggregation]\nring_bits = 8\nlabel_clip = 1000.0"),
        "[aggregation] label_clip"),
    "a client-level epsilon out of reach": (_args("--dp", "client", "--dp-epsilon", "1e-5"),
                                            "too small"),
    "client-level noise below the ring's precision": (
        _args("--dp", "client", "--dp-noise", "1e-9"), "fixed-point units"),
    "a sample-level epsilon out of reach": (_args("--dp", "sample", "--dp-epsilon", "1e-5"),
                                            "too small"),
    "an output name that is a folder": (_output_name_is_a_folder, "privacy.png is a folder"),
    "too many threads": (lambda tmp, out: _config(tmp, f"[device]\nthreads = {10**6}"),
                         "[device] threads"),
}
# refused only when resuming
REFUSED_RESUME: dict[str, tuple[Case, str]] = {
    "a corrupted checkpoint": (_flipped_checkpoint, "is corrupted"),
    "a checkpoint of other settings": (_args("--seed", "5"), "different settings ([run] seed)"),
}
if not torch.cuda.is_available():
    REFUSED["CUDA without a GPU"] = (_args("--device", "cuda"), "[device] device")

CASES = [(name, case, reason, resume) for resume in (False, True)
         for name, (case, reason) in REFUSED.items()]
CASES += [(name, case, reason, True) for name, (case, reason) in REFUSED_RESUME.items()]


finished_run = test_bad_files.finished_run  # that module's tiny finished run, as a fixture here


def _copy(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    return out


@pytest.mark.parametrize(("name", "case", "reason", "resume"), CASES,
                         ids=[f"{n}{' --resume' if r else ''}" for n, _, _, r in CASES])
def test_a_refused_run_leaves_the_run_folder_untouched(name: str, case: Case, reason: str,
                                                       resume: bool, finished_run: Path,
                                                       tmp_path: Path) -> None:
    out = _copy(finished_run, tmp_path)
    args = case(tmp_path, out)
    before = snapshot(out)
    result = _simulate(out, *args, *(["--resume"] if resume else []))
    after = snapshot(out)
    changed = sorted(name for name in before.keys() | after.keys()
                     if before.get(name) != after.get(name))
    assert changed == [], result.output
    assert_one_line_error(result, reason)


NO_FOLDER = {name: REFUSED[name] for name in ("unusable data", "a model that cannot train on "
                                              "the batch", "dream gradients the ring cannot sum")}
NO_FOLDER["a resume with nothing to resume"] = (_args("--resume"), "no checkpoint at")


@pytest.mark.parametrize("name", sorted(NO_FOLDER))
def test_a_refused_run_creates_no_output_folder(name: str, tmp_path: Path) -> None:
    case, reason = NO_FOLDER[name]
    out = tmp_path / "new" / "out"
    assert_one_line_error(_simulate(out, *case(tmp_path, out)), reason)
    assert not (tmp_path / "new").exists()


def _same_bytes_new_mtime(out: Path) -> None:
    (out / "report.md").write_bytes((out / "report.md").read_bytes())


def _a_new_empty_file(out: Path) -> None:
    mtime = out.stat().st_mtime_ns
    (out / "checkpoint.pt.partial").write_bytes(b"")
    os.utime(out, ns=(mtime, mtime))  # the folder's own mtime as it was


def _one_bit_same_mtime(out: Path) -> None:
    path, stat = out / "checkpoint.pt", (out / "checkpoint.pt").stat()
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(raw)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("change", [_same_bytes_new_mtime, _a_new_empty_file,
                                    _one_bit_same_mtime])
def test_the_snapshot_sees_any_change(change: Callable[[Path], None], finished_run: Path,
                                      tmp_path: Path) -> None:
    out = _copy(finished_run, tmp_path)
    before = snapshot(out)
    change(out)
    assert snapshot(out) != before


def test_an_accepted_run_changes_the_run_folder(finished_run: Path, tmp_path: Path) -> None:
    """The control: a run that passes every check does write into the same folder."""
    out = _copy(finished_run, tmp_path)
    before = snapshot(out)
    result = _simulate(out, "--resume")
    assert result.exit_code == 0, result.output
    after = snapshot(out)
    assert after.keys() == before.keys()
    assert after["report.json"] != before["report.json"]


def test_an_out_that_is_a_file_is_refused_and_kept(tmp_path: Path) -> None:
    """[run] out in a config file (click checks the --out flag itself)."""
    out = tmp_path / "files" / "out"
    out.parent.mkdir()
    out.write_bytes(b"not a folder")
    before = snapshot(out.parent)
    result = CliRunner().invoke(main, ["simulate", *TINY_FLAGS,
                                       *_config(tmp_path, f'[run]\nout = "{out}"')])
    assert_one_line_error(result, f"--out: {out} is a file, not a folder")
    assert snapshot(out.parent) == before


def test_the_training_probe_leaves_the_model_untouched() -> None:
    model = build_model("smallcnn", input_shape=(1, 8, 8), num_classes=10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    check_trains_on(model, batch=2, input_shape=(1, 8, 8), num_classes=10, what="smallcnn")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():  # control: the same pass on the model itself moves its statistics
        model.train()(torch.zeros(2, 1, 8, 8))
    assert not all(torch.equal(state[k], v) for k, v in model.state_dict().items())
