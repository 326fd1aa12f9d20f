"""Uploads leave the device on a side stream, overlapped with the compute that follows.

A client's upload must reach host memory before it can be sent, but nothing on the device
waits for that copy: on the compute stream, the copies would hold back the server's sum and the
next dream step for as long as the copy engine takes (about 0.5 ms for four 3 MB uploads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from codream_secure.errors import ConfigError

__all__ = ["UploadSender"]


class UploadSender:
    """Copies each step's n uploads (m values of one dtype) into pinned host buffers.

    On CUDA with `side_stream`, the copies run on their own stream once the uploads are
    computed, while the compute stream goes on; `wait()` returns the buffers once they hold the
    bytes. A send first waits for the previous send, so a buffer is never rewritten while read.
    Without a side stream the copies are queued on the compute stream (as before this class).
    Nothing may rewrite an upload in place before its copy ends; freshly allocated uploads are
    safe (their memory is held for the side stream), a CUDA graph's static outputs are not.
    """

    def __init__(self, n: int, m: int, dtype: torch.dtype, device: torch.device, *,
                 side_stream: bool = True) -> None:
        if n < 1 or m < 1:
            raise ConfigError(f"need at least one upload of at least one value, got {n} x {m}")
        self.n, self.m, self.dtype, self.device = n, m, dtype, device
        cuda = device.type == "cuda"
        self.buffers = [torch.empty(m, dtype=dtype, pin_memory=cuda) for _ in range(n)]
        self.stream = torch.cuda.Stream(device) if cuda and side_stream else None
        self._done: torch.cuda.Event | None = None

    def send(self, uploads: Sequence[torch.Tensor]) -> None:
        """Start copying this step's uploads out; returns before they are copied on CUDA."""
        if len(uploads) != self.n:
            raise ConfigError(f"expected {self.n} uploads, got {len(uploads)}")
        for i, upload in enumerate(uploads):
            if upload.shape != (self.m,) or upload.dtype != self.dtype:
                raise ConfigError(f"upload {i} is {upload.dtype} of shape {tuple(upload.shape)}, "
                                  f"expected {self.dtype} of shape ({self.m},)")
        self.wait()
        if self.device.type != "cuda":
            for buffer, upload in zip(self.buffers, uploads, strict=True):
                buffer.copy_(upload)
            return
        compute = torch.cuda.current_stream(self.device)
        stream = compute if self.stream is None else self.stream
        if self.stream is not None:
            stream.wait_stream(compute)  # the uploads are written on the compute stream
        with torch.cuda.stream(stream):
            for buffer, upload in zip(self.buffers, uploads, strict=True):
                buffer.copy_(upload, non_blocking=True)
                if self.stream is not None:  # keep the allocator from reusing it before the copy
                    upload.record_stream(stream)
        self._done = torch.cuda.Event()
        self._done.record(stream)

    def wait(self) -> list[torch.Tensor]:
        """The host buffers, once the last send's copies have landed (what a client transmits)."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        return self.buffers
