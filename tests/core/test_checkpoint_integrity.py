"""Sealed checkpoints: every truncation, changed byte or foreign config is refused before any
restore; writes are atomic; and the digests are shown to be no defence against a forger."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from codream_secure import checkpoint, checkpoint_file, simulation
from codream_secure.checkpoint import settings_digest, verified_state
from codream_secure.checkpoint_file import (
    FORMAT_LINE,
    HEADER_BYTES,
    Sealed,
    partial_path,
    read_sealed,
    write_sealed,
)
from codream_secure.config import SimulationConfig
from codream_secure.errors import ConfigError
from tests.core.test_bad_files import TINY_FLAGS

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimulationConfig]:
    """A finished tiny run (made through the CLI's flags) and the config it ran under."""
    out = tmp_path_factory.mktemp("sealed") / "out"
    result = subprocess.run([sys.executable, "-m", "codream_secure.cli", "simulate", *TINY_FLAGS,
                             "--out", str(out)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    state = torch.load(io.BytesIO(read_sealed(out / "checkpoint.pt").content), weights_only=True)
    config = SimulationConfig.from_dict(state["config"]).replace(out=str(out))
    assert read_sealed(out / "checkpoint.pt").config_sha256 == settings_digest(config)
    return out, config


def _copy(run: tuple[Path, SimulationConfig], tmp_path: Path) -> tuple[Path, bytes]:
    """The run's checkpoint copied into `tmp_path`, and its bytes."""
    path = tmp_path / "checkpoint.pt"
    shutil.copyfile(run[0] / "checkpoint.pt", path)
    return path, path.read_bytes()


def _refused(path: Path, config: SimulationConfig, *fragments: str) -> str:
    """verified_state refuses `path` with a one-line ConfigError naming it and `fragments`."""
    with pytest.raises(ConfigError) as caught:
        verified_state(path, config, CPU)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_an_intact_checkpoint_verifies(run, tmp_path: Path) -> None:
    path, raw = _copy(run, tmp_path)
    assert raw.startswith(FORMAT_LINE) and raw[HEADER_BYTES - 1:HEADER_BYTES] == b"\n"
    assert verified_state(path, run[1], CPU)["round"] == 1


@pytest.mark.parametrize("mask", [0x01, 0x20, 0x80, 0xFF])
def test_every_changed_header_byte_is_refused(run, tmp_path: Path, mask: int) -> None:
    path, raw = _copy(run, tmp_path)
    for i in range(HEADER_BYTES):
        bad = bytearray(raw)
        bad[i] ^= mask
        path.write_bytes(bad)
        with pytest.raises(ConfigError, match=r"corrupted|truncated|not a codream-secure"):
            verified_state(path, run[1], CPU)


def test_changed_content_bytes_are_refused(run, tmp_path: Path) -> None:
    path, raw = _copy(run, tmp_path)
    rng = np.random.default_rng(0)
    positions = rng.choice(np.arange(HEADER_BYTES, len(raw)), size=300, replace=False)
    for i, flip in zip(positions.tolist(), rng.integers(1, 256, size=300).tolist(), strict=True):
        bad = bytearray(raw)
        bad[i] ^= flip
        path.write_bytes(bad)
        _refused(path, run[1], "is corrupted: the SHA-256 of its content differs")


def test_truncated_checkpoints_are_refused(run, tmp_path: Path) -> None:
    path, raw = _copy(run, tmp_path)
    rng = np.random.default_rng(1)
    cuts = [0, 1, len(FORMAT_LINE) - 1, len(FORMAT_LINE), HEADER_BYTES - 1, HEADER_BYTES,
            HEADER_BYTES + 1, len(raw) - 1, *rng.integers(1, len(raw), size=40).tolist()]
    for cut in cuts:
        path.write_bytes(raw[:cut])
        _refused(path, run[1], "is truncated")


def test_bytes_after_the_content_are_refused(run, tmp_path: Path) -> None:
    path, raw = _copy(run, tmp_path)
    path.write_bytes(raw + b"\0")
    _refused(path, run[1], "is corrupted: 1 bytes follow")


def test_another_configs_checkpoint_is_refused(run, tmp_path: Path) -> None:
    path, _ = _copy(run, tmp_path)
    other = run[1].replace(seed=run[1].run.seed + 1, dream_steps=3)
    _refused(path, other,
             "was written under different settings ([codream] dream_steps, [run] seed)")


def test_a_damaged_config_digest_is_called_corruption(run, tmp_path: Path) -> None:
    path, raw = _copy(run, tmp_path)
    bad = bytearray(raw)
    bad[HEADER_BYTES - 2] = ord("0") if raw[HEADER_BYTES - 2] != ord("0") else ord("1")
    path.write_bytes(bad)
    _refused(path, run[1], "is corrupted: its config-sha256 matches neither")


def _first_weight_offset(raw: bytes) -> tuple[int, str]:
    """Where the bytes of client model 0's first float tensor lie in the file, and its name."""
    state = torch.load(io.BytesIO(raw[HEADER_BYTES:]), weights_only=True)
    name, tensor = next((k, v) for k, v in state["models"][0].items() if v.is_floating_point()
                        and v.numel() >= 8)
    offset = raw.find(tensor.numpy().tobytes())
    assert offset > HEADER_BYTES
    return offset, name


def _resume_capturing_weights(config: SimulationConfig, monkeypatch) -> dict:
    """Resume `config` and return client model 0's weights right after the restore."""
    captured = {}
    real = simulation.load_checkpoint

    def spy(path, config, fed):
        done = real(path, config, fed)
        captured.update({k: v.clone() for k, v in fed.models[0].state_dict().items()})
        return done

    monkeypatch.setattr(simulation, "load_checkpoint", spy)
    simulation.run_simulation(config, resume=True)
    return captured


def test_a_flipped_weight_resumes_silently_without_the_digest(run, tmp_path: Path,
                                                              monkeypatch) -> None:
    out = tmp_path / "out"
    shutil.copytree(run[0], out)
    config = run[1].replace(out=str(out))
    raw = (out / "checkpoint.pt").read_bytes()
    offset, name = _first_weight_offset(raw)
    bad = bytearray(raw)
    bad[offset + 3] ^= 0x80  # the sign of the first weight (little-endian float32)
    (out / "checkpoint.pt").write_bytes(bad)
    _refused(out / "checkpoint.pt", config, "is corrupted")  # the defence

    # control: with the digest check off, the structural checks pass and the weight changed
    def unchecked(path: Path) -> Sealed:
        data = path.read_bytes()
        return Sealed(content=data[HEADER_BYTES:], config_sha256=settings_digest(config))

    monkeypatch.setattr(checkpoint, "read_sealed", unchecked)
    resumed = _resume_capturing_weights(config, monkeypatch)
    original = torch.load(io.BytesIO(raw[HEADER_BYTES:]), weights_only=True)["models"][0][name]
    assert resumed[name].flatten()[0] == -original.flatten()[0] != 0


def test_a_forger_who_recomputes_the_digests_is_not_stopped(run, tmp_path: Path) -> None:
    """The documented limit: SHA-256 in the same file is no authentication."""
    path, raw = _copy(run, tmp_path)
    state = torch.load(io.BytesIO(raw[HEADER_BYTES:]), weights_only=True)
    name = next(iter(state["models"][0]))
    state["models"][0][name] = state["models"][0][name] + 1
    write_sealed(path, state, read_sealed(path).config_sha256)
    forged = verified_state(path, run[1], CPU)["models"][0][name]
    assert torch.equal(forged, state["models"][0][name])


# ----------------------------------------------------------------------------- atomic writes


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint(run, tmp_path: Path,
                                                                monkeypatch) -> None:
    path, raw = _copy(run, tmp_path)
    real_save = torch.save

    def killed(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        assert partial_path(path).stat().st_size > HEADER_BYTES  # half the content is on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    state = verified_state(path, run[1], CPU)
    with pytest.raises(KeyboardInterrupt):
        write_sealed(path, state, settings_digest(run[1]))
    assert path.read_bytes() == raw
    assert not partial_path(path).exists()
    assert verified_state(path, run[1], CPU)["round"] == 1


def test_a_full_disk_during_the_write_is_an_os_error(run, tmp_path: Path, monkeypatch) -> None:
    path, raw = _copy(run, tmp_path)
    real_write = checkpoint_file._HashingWriter.write

    def full(self, data: bytes) -> int:
        if self.count > 1000:  # the partial file already holds part of the content
            self.error = OSError(28, "No space left on device")
            raise self.error
        return real_write(self, data)

    monkeypatch.setattr(checkpoint_file._HashingWriter, "write", full)
    with pytest.raises(OSError, match="No space left"):
        write_sealed(path, verified_state(path, run[1], CPU), settings_digest(run[1]))
    assert path.read_bytes() == raw and not partial_path(path).exists()


def test_a_failed_sync_keeps_the_previous_checkpoint(run, tmp_path: Path, monkeypatch) -> None:
    path, raw = _copy(run, tmp_path)
    state = verified_state(path, run[1], CPU)

    def no_sync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", no_sync)
    with pytest.raises(OSError, match="Input/output"):
        write_sealed(path, state, settings_digest(run[1]))
    assert path.read_bytes() == raw and not partial_path(path).exists()


def test_a_stale_partial_file_is_ignored_and_replaced(run, tmp_path: Path) -> None:
    path, _ = _copy(run, tmp_path)
    partial_path(path).write_bytes(b"left by a killed run")
    state = verified_state(path, run[1], CPU)
    write_sealed(path, state, settings_digest(run[1]))
    assert not partial_path(path).exists()
    assert verified_state(path, run[1], CPU)["round"] == 1


# ----------------------------------------------------------------------------- the CLI


def test_the_cli_refuses_a_flipped_checkpoint_in_one_line(run, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(run[0], out)
    raw = bytearray((out / "checkpoint.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x04
    (out / "checkpoint.pt").write_bytes(raw)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = subprocess.run([sys.executable, "-m", "codream_secure.cli", "simulate", *TINY_FLAGS,
                             "--out", str(out), "--resume"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stdout == "", result.stderr
    assert lines[0].startswith("Error: --resume: ") and str(out / "checkpoint.pt") in lines[0]
    assert "is corrupted" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing was rewritten
