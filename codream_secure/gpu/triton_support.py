"""Where this project's Triton kernels run: triton imports, and the device is CUDA or Triton's
interpreter is on (TRITON_INTERPRET=1 runs the kernels on CPU tensors, for the tests)."""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["triton_importable", "triton_runs_on"]


@functools.cache  # asked on every kernel call; a failed import would search sys.path each time
def triton_importable() -> bool:
    """Whether `import triton` works here (a broken install counts as absent)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether a Triton kernel can run on tensors of `device` here."""
    on_device = torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and triton_importable()
