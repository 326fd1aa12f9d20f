"""The sealed checkpoint file: a fixed-size text header with SHA-256 digests, then the content.

Layout (the header is 218 bytes of ASCII, readable with `head -4`):

    codream-secure checkpoint 1
    content-bytes <16 decimal digits>
    content-sha256 <64 hex digits>
    config-sha256 <64 hex digits>
    <content: a torch.save file of tensors and plain data>

The digests detect accidental damage (a truncated copy, a flipped bit) and naive edits. They are
not authentication: whoever can write the file can recompute them (an HMAC under a key the
writer lacks would be needed against that).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["FORMAT_LINE", "HEADER_BYTES", "BrokenCheckpoint", "Sealed", "config_sha256",
           "partial_path", "read_sealed", "write_sealed"]

FORMAT_LINE = b"codream-secure checkpoint 1\n"
_HEADER = re.compile(rb"codream-secure checkpoint 1\ncontent-bytes ([0-9]{16})\n"
                     rb"content-sha256 ([0-9a-f]{64})\nconfig-sha256 ([0-9a-f]{64})\n")
HEADER_BYTES = (len(FORMAT_LINE) + len(b"content-bytes \n") + 16 + len(b"content-sha256 \n") + 64
                + len(b"config-sha256 \n") + 64)


class BrokenCheckpoint(Exception):
    """Why a file is no intact checkpoint; the message completes "<path> ..."."""


@dataclass(frozen=True)
class Sealed:
    """A checkpoint whose content matched its SHA-256: the content and the config digest."""

    content: bytes
    config_sha256: str


def config_sha256(values: dict[str, Any]) -> str:
    """SHA-256 of a config's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def partial_path(path: Path) -> Path:
    """Where `path` is written before it replaces the previous file."""
    return path.with_name(path.name + ".partial")


def _header(content_bytes: int, content_sha256: str, config_digest: str) -> bytes:
    return (FORMAT_LINE + b"content-bytes %016d\ncontent-sha256 %s\nconfig-sha256 %s\n"
            % (content_bytes, content_sha256.encode(), config_digest.encode()))


class _HashingWriter:
    """A write-only stream that forwards to `handle` and hashes and counts what passes."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.sha256, self.count = handle, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch reports a failed write as a RuntimeError

    def write(self, data: bytes) -> int:
        try:
            self.handle.write(data)
        except OSError as error:
            self.error = error
            raise
        self.sha256.update(data)
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        self.handle.flush()


def write_sealed(path: Path, state: dict, config_digest: str) -> None:
    """Write `state` under `path` atomically: a partial file in the same folder, fsync, rename.

    A crash or kill at any point leaves the previous file at `path` untouched. OSError when the
    folder refuses the write (the partial file is removed).
    """
    partial = partial_path(path)
    try:
        with partial.open("wb") as handle:
            handle.write(bytes(HEADER_BYTES))  # rewritten once the content's digest is known
            writer = _HashingWriter(handle)
            try:
                torch.save(state, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None
            handle.seek(0)
            handle.write(_header(writer.count, writer.sha256.hexdigest(), config_digest))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; some file systems cannot open or sync a folder, which is fine."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_sealed(path: Path) -> Sealed:
    """Read `path` and check its header and content digest; BrokenCheckpoint says what is wrong.

    OSError when the file cannot be read at all.
    """
    raw = path.read_bytes()
    if not raw.startswith(FORMAT_LINE):
        if FORMAT_LINE.startswith(raw):
            raise BrokenCheckpoint(f"is truncated: it holds only {len(raw)} bytes")
        raise BrokenCheckpoint("is not a codream-secure checkpoint (it does not begin with the "
                               f"line {FORMAT_LINE.decode().strip()!r})")
    if len(raw) < HEADER_BYTES:
        raise BrokenCheckpoint(f"is truncated: it holds {len(raw)} bytes, less than its "
                               f"{HEADER_BYTES}-byte header")
    fields = _HEADER.fullmatch(raw[:HEADER_BYTES])
    if fields is None:
        raise BrokenCheckpoint("is corrupted: its header is damaged")
    promised, held = int(fields[1]), len(raw) - HEADER_BYTES
    if held < promised:
        raise BrokenCheckpoint(f"is truncated: its header promises {promised} bytes of "
                               f"content, the file holds {held}")
    if held > promised:
        raise BrokenCheckpoint(f"is corrupted: {held - promised} bytes follow the "
                               f"{promised} bytes of content its header promises")
    content = raw[HEADER_BYTES:]
    if hashlib.sha256(content).hexdigest() != fields[2].decode():
        raise BrokenCheckpoint("is corrupted: the SHA-256 of its content differs from the one "
                               "in its header (a changed byte)")
    return Sealed(content=content, config_sha256=fields[3].decode())
