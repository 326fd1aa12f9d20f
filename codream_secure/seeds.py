"""Seeds derived from tuples: every round, client and purpose has its own random stream."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derived_seed", "generator"]


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple, stable across processes (unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from `parts`, so every round and client has its own stream."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derived_seed(*parts))
    return gen
