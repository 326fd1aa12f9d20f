"""Seeded generators of hostile messages: valid encodings of absurd values, and broken bytes.

`Hostile.perturb` takes an honest message and replaces some of its fields with values a
malicious peer could send (boundary integers, ids out of range, wrong sizes, NaN, low-order
keys, ciphertexts at or beyond N^2); `Hostile.mangle` then sometimes breaks the encoding itself
(a flipped byte, a count field set to 2^32 - 1, a cut, trailing bytes, another type code).
`Tally` runs the cases and counts how each ended.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from collections import Counter
from collections.abc import Callable

import numpy as np

from protocols.errors import ProtocolError
from protocols.secagg import keys

U32_EDGES = [0, 1, 2, 3, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
U64_EDGES = [*U32_EDGES, 2**32, 2**40, 2**63, 2**64 - 1]
U8_EDGES = [0, 1, 2, 7, 8, 31, 32, 33, 63, 64, 65, 127, 128, 255]
FLOATS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 5e-324, 1e-300, 0.5, 1.0,
          3.0, 1e300, -1.0]
P25519 = 2**255 - 19
BAD_KEYS = [u.to_bytes(32, "little") for u in sorted(keys.LOW_ORDER_U)] + [
    P25519.to_bytes(32, "little"), (2**256 - 1).to_bytes(32, "little")]
SESSION_FIELDS = {"session_id"}


class Tally:
    """How each case ended, so a fuzz that only ever hits one early refusal fails."""

    def __init__(self) -> None:
        self.ends: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()  # what answered cases refused inside, e.g. a reply

    def note(self, what: str) -> None:
        self.notes[what] += 1

    def run(self, label: str, case: Callable[[], object]) -> None:
        try:
            case()
        except ProtocolError as error:
            self.ends[type(error).__name__] += 1
        except Exception as error:  # anything else is the bug a fuzz looks for
            raise AssertionError(f"{label} raised {type(error).__name__}: {error}") from error
        else:
            self.ends["answered"] += 1

    @property
    def total(self) -> int:
        return sum(self.ends.values())


class Hostile:
    """Hostile field values around a session of `n` clients, `m` values and step `step` (and,
    for Paillier, the public modulus `modulus`)."""

    def __init__(self, seed: int, *, n: int, m: int, step: int = 1,
                 modulus: int | None = None) -> None:
        self.rng = random.Random(seed)
        self.n, self.m, self.step, self.modulus = n, m, step, modulus

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def u32(self, *near: int) -> int:
        pick = self.rng.random()
        if pick < 0.4 and near:
            value = self.rng.choice(near) + self.rng.choice([-1, 0, 0, 1])
            return min(max(value, 0), 2**32 - 1)
        if pick < 0.8:
            return self.rng.choice(U32_EDGES)
        return self.rng.getrandbits(32)

    def u64(self, *near: int) -> int:
        if self.chance(0.5) and near:
            return max(self.rng.choice(near) + self.rng.choice([-1, 0, 1]), 0)
        return self.rng.choice(U64_EDGES) if self.chance(0.7) else self.rng.getrandbits(64)

    def u8(self, *near: int) -> int:
        if self.chance(0.3) and near:
            return self.rng.choice(near)
        return self.rng.choice(U8_EDGES) if self.chance(0.7) else self.rng.getrandbits(8)

    def blob(self, size: int) -> bytes:
        kind = self.rng.random()
        if kind < 0.2:
            return bytes(size)
        if kind < 0.3:
            return b"\xff" * size
        return self.rng.randbytes(size)

    def key(self, honest: bytes) -> bytes:
        kind = self.rng.random()
        if kind < 0.3:
            return self.rng.choice(BAD_KEYS)
        if kind < 0.4:
            return honest
        return self.blob(32)

    def ids(self, honest: frozenset[int]) -> frozenset[int]:
        ids = set(honest)
        for _ in range(self.rng.randint(1, 3)):
            action = self.rng.random()
            if action < 0.35 and ids:
                ids.discard(self.rng.choice(sorted(ids)))
            elif action < 0.7:
                ids.add(self.u32(0, self.n - 1, self.n))
            elif action < 0.8:
                ids = set()
            else:
                ids |= {self.u32() for _ in range(self.rng.randint(1, 40))}
        return frozenset(ids)

    def keyed(self, honest: dict[int, bytes], size: int) -> dict[int, bytes]:
        ids = self.ids(frozenset(honest)) if self.chance(0.6) else frozenset(honest)
        return {i: honest[i] if i in honest and self.chance(0.5) else self.blob(size)
                for i in ids}

    def blobs(self, honest: dict[int, bytes]) -> dict[int, bytes]:
        sizes = [0, 1, 48, 49, 50, 64, 200]
        keyed = self.keyed(honest, 49)
        return {i: b if self.chance(0.6) else self.blob(self.rng.choice(sizes))
                for i, b in keyed.items()}

    def vector(self, honest: np.ndarray) -> np.ndarray:
        length = max(self.m + self.rng.choice([-2, -1, 0, 0, 1, 3]), 0)
        dtype = self.rng.choice([np.uint32, np.uint32, np.uint64])
        return np.frombuffer(self.blob(length * np.dtype(dtype).itemsize), dtype=dtype)

    def field(self, name: str, honest: object) -> object:
        """A hostile value of the same wire type for the field `name`."""
        if name == "session_id":
            return self.blob(16)
        if name in ("client_id", "n_clients", "degree", "threshold"):
            return self.u32(0, 1, self.n - 2, self.n - 1, self.n, self.n + 1)
        if name == "step":
            return self.u32(0, self.step - 1, self.step, self.step + 1)
        if name == "vector_length":
            return self.u64(0, 1, self.m, 2**28, 2**31)
        if name in ("ring_bits", "scale_bits"):
            return self.u8(8, 16, 24, 32, 62, 64)
        if name == "clip":
            return self.rng.choice(FLOATS)
        if name in ("graph_seed",):
            return self.blob(32)
        if name == "public_key":
            assert isinstance(honest, bytes)
            return self.key(honest)
        if name in ("active", "dropped", "survivors"):
            assert isinstance(honest, frozenset)
            return self.ids(honest)
        if name == "public_keys":
            assert isinstance(honest, dict)
            return {i: self.key(k) for i, k in self.keyed(honest, 32).items()}
        if name in ("seeds", "tokens"):
            assert isinstance(honest, dict)
            return self.keyed(honest, 32)
        if name == "envelopes":
            assert isinstance(honest, dict)
            return self.blobs(honest)
        if name == "vector":
            assert isinstance(honest, np.ndarray)
            return self.vector(honest)
        return self._paillier_field(name, honest)

    def _paillier_field(self, name: str, honest: object) -> object:
        if name == "modulus":
            return self.rng.choice([0, 1, 2, 3, 4, 2**61 - 1, 2**64, 2**16383 + 1, 2**16400 + 1])
        if name == "auth_key":
            assert isinstance(honest, bytes)
            return self.key(honest)
        if name == "members":
            assert isinstance(honest, frozenset)
            return self.ids(honest)
        if name == "noise_bound":
            return self.u64(0, 1)
        if name in ("guard_bits", "kind"):
            return self.u8(0, 1, 2, 3)
        if name == "width":  # kept small: the encoder writes width bytes per value
            return self.rng.choice([0, 1, 2, 4, 8, 2048, 2049])
        if name == "values":
            assert isinstance(honest, tuple)
            return self.residues(honest)
        if name == "tag":
            return self.blob(32)
        if name == "uploads":
            assert isinstance(honest, tuple)
            return self.uploads(honest)
        return honest

    def residues(self, honest: tuple[int, ...]) -> tuple[int, ...]:
        """Integers of a ciphertext or plaintext list: one short or one long, or with 0, N,
        N^2 - 1, N^2 or more in a slot (small absurd ones without a modulus)."""
        if self.modulus is None or self.chance(0.2):
            return tuple(self.u64() for _ in range(self.rng.randint(0, 4)))
        values, n = list(honest), self.modulus
        action = self.rng.random()
        if action < 0.25 and values:
            del values[self.rng.randrange(len(values))]
        elif action < 0.4:
            values.append(self.rng.choice(values) if values else 1)
        elif action < 0.45:
            values *= self.rng.choice([2, 64, 4096])  # a valid encoding, far too long
        elif values:
            values[self.rng.randrange(len(values))] = self.rng.choice(
                [0, 1, n - 1, n, n + 1, n * n - 1, n * n, n * n + 1])
        return tuple(values)

    def uploads(self, honest: tuple[object, ...]) -> tuple[object, ...]:
        """A bundle's uploads, some perturbed, and one left out, repeated or out of order."""
        uploads = [self.perturb(u) if self.chance(0.3) else u for u in honest]
        action = self.rng.random()
        if action < 0.2 and uploads:
            del uploads[self.rng.randrange(len(uploads))]
        elif action < 0.4 and uploads:
            uploads.insert(self.rng.randrange(len(uploads) + 1), self.rng.choice(uploads))
        elif action < 0.5:
            uploads.reverse()
        return tuple(uploads)

    def perturb(self, message: object) -> object:
        """`message` with some fields replaced by hostile values (still a valid encoding)."""
        changes: dict[str, object] = {}
        for f in dataclasses.fields(message):  # type: ignore[arg-type]
            if f.name in ("rounding", "prg", "threat_model", "shares", "share_bytes"):
                continue  # wire codes are mangled as bytes; shares and their size just below
            p = 0.05 if f.name in SESSION_FIELDS else 0.35
            if self.chance(p):
                changes[f.name] = self.field(f.name, getattr(message, f.name))
        if hasattr(message, "share_bytes") and self.chance(0.5):
            size = self.u8(33, 32, 34, 0) if self.chance(0.4) else 33
            shares = self.keyed(message.shares, size)  # type: ignore[attr-defined]
            if self.chance(0.3):  # full-width values that are not field elements
                shares = {i: b"\xff" * size for i in shares}
            changes.update(shares=shares, share_bytes=size)
        return dataclasses.replace(message, **changes)  # type: ignore[type-var]

    def offer(self, honest: object) -> object:
        """An offer whose every field is consistent but whose sizes are absurd (or at a limit):
        it passes every check that does not look at the size of the session."""
        n = self.rng.choice([2, 3, 999, 1000, 1001, 100_000, 100_001, 2**20, 2**31, 2**32 - 1])
        degree = self.rng.choice([n - 1, 2, 4, max(n - 2 - n % 2, 2)])
        threshold = self.rng.choice([1, 2, degree // 2 + 1, degree])
        return dataclasses.replace(
            honest, client_id=self.rng.choice([0, n - 1, n]), n_clients=n,  # type: ignore[type-var]
            degree=degree, threshold=threshold, ring_bits=self.rng.choice([32, 64]),
            scale_bits=self.rng.choice([0, 1, 4]), clip=self.rng.choice([1.0, 1e-3]),
            vector_length=self.rng.choice([1, self.m, 2**16, 2**16 + 1, 2**28, 2**28 + 1,
                                           2**64 - 1]))

    def paillier_offer(self, honest: object) -> object:
        """A Paillier offer whose fields agree but whose sizes are absurd (or at a limit): many
        clients, long vectors, huge or tiny moduli, slots that do not fit or hold thousands."""
        n = self.rng.choice([2, 3, 999, 1000, 1001, 100_000, 100_001, 2**31, 2**32 - 1])
        bits = self.rng.choice([64, 511, 1024, 1025, 2048, 8192, 8193, 16384])
        modulus = honest.modulus if self.chance(0.5) else (1 << (bits - 1)) | 1  # type: ignore[attr-defined]
        return dataclasses.replace(
            honest, client_id=self.rng.choice([0, 0, n - 1, n]), n_clients=n,  # type: ignore[type-var]
            vector_length=self.rng.choice([1, self.m, 64, 2**16, 2**16 + 1, 2**28 + 1,
                                           2**64 - 1]),
            scale_bits=self.rng.choice([0, 1, 4, 16, 40, 255]),
            guard_bits=self.rng.choice([0, 1, 2, 64, 255]),
            noise_bound=self.rng.choice([0, 1, 2**20, 2**62, 2**64 - 1]),
            clip=self.rng.choice([1.0, 1e-3, 5e-324, 1e300]), modulus=modulus)

    def oversize(self, data: bytes) -> bytes:
        """Sometimes a body far longer than any honest one (4 KiB or 1 MiB of trailing bytes)."""
        if self.chance(0.95):
            return data
        return data + bytes(self.rng.choice([4096, 1 << 20]))

    def mangle(self, data: bytes) -> bytes:
        """Sometimes break the encoding of `data` itself."""
        if self.chance(0.6) or len(data) < 7:
            return data
        raw = bytearray(data)
        action = self.rng.randrange(6)
        at = self.rng.randrange(6, len(raw))
        if action == 0:
            raw[at] ^= 1 << self.rng.randrange(8)
        elif action == 1 and at + 4 <= len(raw):  # a count or id field claims 2^32 - 1
            raw[at : at + 4] = struct.pack("<I", self.rng.choice([2**32 - 1, 2**20, 2**31]))
        elif action == 2:
            del raw[at:]
        elif action == 3:
            raw += self.blob(self.rng.choice([1, 4, 33, 100]))
        elif action == 4:
            raw[5] = self.rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 99, 0x42])
        else:
            raw[-1] = self.rng.getrandbits(8)  # the offer's threat model code, among others
        return bytes(raw)

    def message(self, template: object) -> bytes:
        """A hostile message built from `template` (an honest message)."""
        if type(template).__name__ == "SessionOffer" and self.chance(0.5):
            message = self.offer(template)
        elif type(template).__name__ == "Offer" and self.chance(0.5):
            message = self.paillier_offer(template)
        else:
            message = self.perturb(template) if self.chance(0.85) else template
        try:
            data = message.encode()  # type: ignore[attr-defined]
        except (struct.error, ValueError, OverflowError, KeyError):
            data = template.encode()  # type: ignore[attr-defined]  # e.g. u8 fields over 255
        return self.mangle(data)
