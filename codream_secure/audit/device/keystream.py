"""Keystream GB/s of every ChaCha20 backend on the device, and of `cryptography` on the host."""

from __future__ import annotations

import time

import torch

from codream_secure.audit.device.timing import sync, timed_ms
from codream_secure.gpu import chacha20
from protocols.primitives import prg


def keystream_rates(device: torch.device, n_words: int, *, skip: tuple[str, ...] = ()
                    ) -> list[dict]:
    """GB/s of every ChaCha20 backend on the device, and of cryptography on the host."""
    key = bytes(range(32))
    rows = []
    for backend in [b for b in chacha20.available_backends(device) if b not in skip]:
        fn = lambda b=backend: chacha20.keystream_words([key], n_words, device=device, backend=b)  # noqa: E731
        start = time.perf_counter()
        try:
            fn()
            sync(device)
        except Exception as exc:  # e.g. a kernel that does not compile here
            rows.append({"where": f"{device.type} torch/{backend}", "gbps": float("nan"),
                         "error": f"{type(exc).__name__}: {exc}"})
            continue
        warm = time.perf_counter() - start
        ms = timed_ms(fn, device, iters=3, repeats=3)
        rows.append({"where": f"{device.type} torch/{backend}", "gbps": 4 * n_words / ms / 1e6,
                     "first_call_s": warm})
    for algorithm in prg.ALGORITHMS:
        ms = timed_ms(lambda a=algorithm: prg.uniform_ring(key, n_words, ring_bits=32,
                                                           algorithm=a),
                      torch.device("cpu"), iters=3, repeats=3)
        rows.append({"where": f"host cryptography/{algorithm}", "gbps": 4 * n_words / ms / 1e6})
    for row in rows:
        row["n_words"] = n_words
    return rows


