"""The run's output folder (--out): checked without writing anything, then created."""

from __future__ import annotations

import tempfile
from pathlib import Path

from codream_secure.errors import ConfigError, os_reason

__all__ = ["check_output_folder", "make_output_folder"]


def check_output_folder(out: Path, files: tuple[str, ...] = ()) -> None:
    """Refuse, reading only, an `out` that is no folder or cannot become one, or one where any
    of `files` (the names the run writes) is a folder."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file, not a folder; choose another --out")
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if not out.exists() and above is not None and not above.is_dir():
        raise ConfigError(f"--out: cannot create {out}: {above} is a file, not a folder")
    for name in files:
        if (out / name).is_dir():
            raise ConfigError(f"--out: {out / name} is a folder, but the run writes a file "
                              "there; move it away or choose another --out")


def make_output_folder(out: Path) -> None:
    """Create `out` and make sure it takes files: the first thing a prepared run writes."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ConfigError(f"--out: cannot write into {out} ({os_reason(error)})") from None
