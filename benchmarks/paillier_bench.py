"""Packed Paillier vs phe's per-value encryption, and vs pairwise masks, in the same run.

    python benchmarks/paillier_bench.py                    # 2048 and 3072 bits, n=10, m=4096
    python benchmarks/paillier_bench.py --key-bits 2048 --m 1024 --phe-values 50   # a quick look

Part 1 encrypts the same fixed-point integers two ways: phe's `public_key.encrypt(int)` (one
ciphertext per value) and one client's packed upload (encode + pack + encrypt + serialise, one
process, then over the worker pool). Part 2 sums n vectors of m values with packed Paillier and
with SecAgg+ pairwise masks (protocols.api.secure_sum). Prints tables; writes paillier.json and
paillier.md into --out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from codream_secure.audit.reporting import host, write_table_report
from protocols.api import secure_sum
from protocols.paillier.roles import available_cores
from protocols.paillier.session import PaillierSession, generate_keypair

try:
    import gmpy2  # noqa: F401 - only to report whether phe and we run on it
    HAVE_GMPY2 = True
except ImportError:  # pragma: no cover
    HAVE_GMPY2 = False


@dataclass
class EncryptRow:
    """Per-value phe encryption against packed encryption at one key size."""

    key_bits: int
    keygen_seconds: float
    slots: int
    slot_bits: int
    phe_values: int
    phe_values_per_s: float  # wall clock
    phe_values_per_cpu_s: float  # this process's CPU time: robust to other jobs on the machine
    phe_bytes_per_value: float
    packed_values: int
    packed_values_per_s: float
    packed_values_per_cpu_s: float
    packed_bytes_per_value: float
    packed_pool_values_per_s: float  # wall clock over the worker pool
    workers: int
    speedup_wall: float
    speedup_cpu: float
    speedup_pool: float  # pool (wall) over phe in one process (wall)
    bytes_ratio: float


@dataclass
class SumRow:
    """One secure sum of n vectors of length m: who pays what."""

    protocol: str
    key_bits: int | None
    n: int
    m: int
    client_seconds_mean: float
    server_seconds: float
    key_holder_seconds: float | None
    bytes_up_per_client: float
    expansion_up: float
    max_abs_error: float


def _inputs(n: int, m: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n, m)).astype(np.float32)


def _upload_seconds(session: PaillierSession, vector: np.ndarray, repeats: int) -> tuple[
        float, float, int]:
    """Median wall and CPU seconds of one client's full upload, and its size in bytes."""
    wall, cpu, size = [], [], 0
    for _ in range(repeats):
        request = session.server.open_step()
        start, start_cpu = time.perf_counter(), time.process_time()
        upload = session.clients[0].upload(request, vector)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        size = len(upload)
    return statistics.median(wall), statistics.median(cpu), size


def bench_encryption(key_bits: int, *, n: int, m: int, phe_values: int, workers: int,
                     repeats: int) -> tuple[EncryptRow, tuple]:
    """phe per value vs packed (one process, then the pool) on the same encoded values."""
    start = time.perf_counter()
    keypair = generate_keypair(key_bits)
    keygen = time.perf_counter() - start
    vector = _inputs(1, m, seed=key_bits)[0]
    with PaillierSession(n, m, clip=1.0, keypair=keypair, workers=1) as serial:
        ints = serial.codec.encode(vector, rounding_key=bytes(32)).view(np.int32)
        serial_s, serial_cpu, size = _upload_seconds(serial, vector, repeats)
        layout = serial.layout
    with PaillierSession(n, m, clip=1.0, keypair=keypair, workers=workers) as pooled:
        _upload_seconds(pooled, vector, 1)  # starts the worker processes: not timed
        pooled_s, _, _ = _upload_seconds(pooled, vector, repeats)
    public = keypair[0]
    sample = [int(v) for v in ints[:phe_values]]
    start, start_cpu = time.perf_counter(), time.process_time()
    encrypted = [public.encrypt(v) for v in sample]
    phe_s, phe_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    # phe serialises a ciphertext mod N^2 plus an exponent: count only the ciphertext (favours phe)
    phe_bytes = -(-2 * key_bits // 8)
    assert keypair[1].decrypt(encrypted[0]) == sample[0]
    k = len(sample)
    row = EncryptRow(
        key_bits, keygen, layout.slots, layout.slot_bits, k, k / phe_s, k / phe_cpu, phe_bytes,
        m, m / serial_s, m / serial_cpu, size / m, m / pooled_s, workers,
        (m / serial_s) / (k / phe_s), (m / serial_cpu) / (k / phe_cpu),
        (m / pooled_s) / (k / phe_s), phe_bytes / (size / m),
    )
    return row, keypair


def bench_paillier_sum(keypair, vectors: np.ndarray, *, workers: int) -> SumRow:
    """One packed-Paillier step (key generation excluded: it is a one-off of the key holder)."""
    n, m = vectors.shape
    with PaillierSession(n, m, clip=1.0, keypair=keypair, workers=workers) as session:
        session.encryptor.encrypt(keypair[0].n, [0] * (2 * workers))  # start the pool, untimed
        before = session.traffic.client_seconds.copy()
        setup_up = session.traffic.bytes_up.copy()
        outcome = session.step({c: vectors[c] for c in range(n)})
        t = session.traffic
        client = t.client_seconds - before
    exact = vectors.astype(np.float64).sum(0)
    up = float((t.bytes_up - setup_up).mean())
    return SumRow("paillier", keypair[0].n.bit_length(), n, m, float(client.mean()),
                  t.server_seconds, t.key_holder_seconds, up, up / (4 * m),
                  float(np.abs(outcome.total - exact).max()))


def bench_masks(vectors: np.ndarray, protocol: str = "secagg+") -> SumRow:
    """The same sum under pairwise masks (key setup included, as secure_sum runs it)."""
    n, m = vectors.shape
    result = secure_sum(vectors, protocol=protocol, clip=1.0)
    exact = vectors.astype(np.float64).sum(0)
    up = float(result.bytes_up.mean())
    return SumRow(protocol, None, n, m, float(result.client_seconds.mean()),
                  result.server_seconds, None, up, up / (4 * m),
                  float(np.abs(result.total - exact).max()))


def _tables(enc: list[EncryptRow], sums: list[SumRow]) -> str:
    lines = ["| key bits | slots x bits | phe values/s (wall, cpu) "
             "| packed values/s 1 proc (wall, cpu) | packed values/s pool (wall) "
             "| speed-up wall / cpu / pool | phe B/value | packed B/value | bytes ratio "
             "| keygen s |", "|" + "---|" * 10]
    for r in enc:
        lines.append(
            f"| {r.key_bits} | {r.slots} x {r.slot_bits} "
            f"| {r.phe_values_per_s:.1f}, {r.phe_values_per_cpu_s:.1f} "
            f"| {r.packed_values_per_s:.0f}, {r.packed_values_per_cpu_s:.0f} "
            f"| {r.packed_pool_values_per_s:.0f} ({r.workers} workers) "
            f"| {r.speedup_wall:.1f}x / {r.speedup_cpu:.1f}x / {r.speedup_pool:.1f}x "
            f"| {r.phe_bytes_per_value:.0f} | {r.packed_bytes_per_value:.2f} "
            f"| {r.bytes_ratio:.1f}x | {r.keygen_seconds:.2f} |")
    lines += ["", "| protocol | key bits | n | m | client s (mean) | server s | key holder s "
              "| bytes up/client | expansion vs float32 | max abs error |", "|" + "---|" * 10]
    for r in sums:
        kh = "-" if r.key_holder_seconds is None else f"{r.key_holder_seconds:.3f}"
        lines.append(
            f"| {r.protocol} | {r.key_bits or '-'} | {r.n} | {r.m} | {r.client_seconds_mean:.3f} "
            f"| {r.server_seconds:.3f} | {kh} | {r.bytes_up_per_client / 1024:.1f} KiB "
            f"| {r.expansion_up:.2f}x | {r.max_abs_error:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key-bits", type=int, nargs="+", default=[2048, 3072])
    parser.add_argument("--n", type=int, default=10, help="clients")
    parser.add_argument("--m", type=int, default=4096, help="vector length")
    parser.add_argument("--phe-values", type=int, default=150,
                        help="values phe encrypts one by one (its throughput is per value)")
    parser.add_argument("--repeats", type=int, default=3, help="packed uploads timed (median)")
    parser.add_argument("--workers", type=int, default=available_cores())
    parser.add_argument("--out", type=Path, default=Path("runs/bench-paillier"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    vectors = _inputs(args.n, args.m, seed=0)
    enc, sums = [], [bench_masks(vectors)]
    for bits in args.key_bits:
        row, keypair = bench_encryption(bits, n=args.n, m=args.m, phe_values=args.phe_values,
                                        workers=args.workers, repeats=args.repeats)
        enc.append(row)
        sums.append(bench_paillier_sum(keypair, vectors, workers=args.workers))
    machine = {**host(), "usable_cores": available_cores(), "gmpy2": HAVE_GMPY2,
               "note": "2-core CPU shared with other jobs: expect +-30% between runs"}
    table = _tables(enc, sums)
    print(table)
    print(f"total {time.perf_counter() - started:.1f} s")
    report = {"config": vars(args) | {"out": str(args.out)}, "machine": machine,
              "encryption": [asdict(r) for r in enc], "sums": [asdict(r) for r in sums],
              "seconds": time.perf_counter() - started}
    write_table_report(args.out, "paillier", report, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
