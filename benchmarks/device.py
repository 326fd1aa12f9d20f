"""Device benchmark: fp32 eager vs optimised dream step, secure vs plain dream round, ChaCha20.

    python -m benchmarks.device                 # the full run on a CUDA machine (< 5 minutes)
    python -m benchmarks.device --quick         # a CPU smoke run with tiny shapes

One run measures, on one device: the bf16 matrix-product ceiling; the dream step of ResNet-18
(CIFAR, batch 256) in fp32 eager (as the official code runs it) and optimised (bf16 autocast,
channels_last, torch.compile with CUDA graphs), with FLOPs counted by FlopCounterMode; the time
of a 4-client heterogeneous dream round with device-side secure aggregation (ChaCha20 masks,
host key schedule and Shamir shares per step) against the same round with a plain sum; and the
keystream rate of every ChaCha20 backend. Prints a table and writes device.json / device.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from codream_secure.dreams import DreamLossWeights, dream_gradient, dream_loss
from codream_secure.gpu import chacha20, masking
from codream_secure.gpu.fast_dream import FastDreamStep, dream_gradients
from codream_secure.models import build_model
from protocols.codec import FixedPointCodec
from protocols.primitives import envelope, kdf, prg, shamir
from protocols.secagg import keys

W = DreamLossWeights()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], object], device: torch.device, *, iters: int,
             repeats: int = 5) -> float:
    """Median over `repeats` of the mean wall time of `iters` back-to-back calls (ms)."""
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        samples.append(1e3 * (time.perf_counter() - start) / iters)
    return statistics.median(samples)


def matmul_ceiling(device: torch.device, n: int, iters: int) -> dict:
    """Achieved TFLOP/s of an n x n x n bf16 matrix product (fp32 on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    ms = timed_ms(lambda: a @ b, device, iters=iters)
    return {"n": n, "dtype": str(dtype), "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one dream step (forward + backward to x), counted by FlopCounterMode.

    Parameters are frozen while counting, so the backward holds only the input-gradient
    kernels that dream_gradient's autograd.grad runs (FlopCounterMode's module tracking does
    not support autograd.grad itself).
    """
    flags = [p.requires_grad for p in model.parameters()]
    inputs = x.detach().clone().requires_grad_(True)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with FlopCounterMode(display=False) as counter:
            loss, _ = dream_loss(model, inputs, W)
            loss.backward()
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return int(counter.get_total_flops())


def dream_step(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], object]:
    """fp32 eager and optimised ms/step of args.model in the same run; returns the fast step."""
    torch.manual_seed(0)
    model = build_model(args.model, input_shape=args.shape, num_classes=10).to(device).eval()
    x = torch.randn(args.batch, *args.shape, device=device)
    flops = count_flops(model, x)
    eager_ms = timed_ms(lambda: dream_gradient(model, x, W), device, iters=args.iters)
    start = time.perf_counter()
    fast = FastDreamStep.optimised(model, W)
    fast(x)
    fast(x)
    _sync(device)
    first_s = time.perf_counter() - start
    fast_ms = timed_ms(lambda: fast(x), device, iters=args.iters)
    c = fast.config
    variant = f"{c.precision}, channels_last={c.channels_last}, compile={c.compile}"
    rows = [{"variant": "fp32 eager (dreams.dream_gradient)", "ms": eager_ms},
            {"variant": f"optimised ({variant})", "ms": fast_ms, "warmup_s": first_s}]
    for row in rows:
        row.update(model=args.model, batch=args.batch, gflop=flops / 1e9,
                   tflops=flops / row["ms"] / 1e9, speedup=eager_ms / row["ms"])
    return rows, fast


def keystream_rates(device: torch.device, n_words: int, *, skip: tuple[str, ...] = ()
                    ) -> list[dict]:
    """GB/s of every ChaCha20 backend on the device, and of cryptography on the host."""
    key = bytes(range(32))
    rows = []
    for backend in [b for b in chacha20.available_backends(device) if b not in skip]:
        fn = lambda b=backend: chacha20.keystream_words([key], n_words, device=device, backend=b)  # noqa: E731
        start = time.perf_counter()
        fn()
        _sync(device)
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


class SecureRound:
    """Per-step secure aggregation of n device gradients with the protocol's key schedule."""

    def __init__(self, n: int, m: int, *, clip: float, device: torch.device) -> None:
        self.n, self.m, self.device = n, m, device
        self.codec = FixedPointCodec.for_clients(n, clip=clip, ring_bits=32,
                                                 rounding="stochastic", prg="chacha20")
        self.sid = os.urandom(16)
        self.masters = {(a, b): os.urandom(32) for a in range(n) for b in range(a + 1, n)}
        self.envelope_keys = {(a, b): os.urandom(32) for a in range(n) for b in range(n)}
        self.pinned = [torch.empty(m, dtype=torch.int32, pin_memory=device.type == "cuda")
                       for _ in range(n)]

    def total(self, grads: list[torch.Tensor], step: int) -> torch.Tensor:
        """Sum of the clients' gradients through masking, as the server decodes it."""
        threshold = self.n // 2 + 1
        uploads, self_seeds = [], []
        for c, grad in enumerate(grads):
            pair_seeds = {p: keys.pair_step_seed(self.masters[min(c, p), max(c, p)],
                                                 session_id=self.sid, step=step)
                          for p in range(self.n) if p != c}
            rounding_key = kdf.derive_key(self.sid, session_id=b"rounding",
                                          purpose="stochastic-rounding", context=(step, c))
            self_seed = os.urandom(32)
            upload = masking.masked_upload(grad, self.codec, client_id=c, self_seed=self_seed,
                                           pair_step_seeds=pair_seeds, rounding_key=rounding_key)
            self.pinned[c].copy_(upload, non_blocking=True)  # the bytes the client sends
            shares = shamir.split(self_seed, threshold=threshold,
                                  share_ids=[p + 1 for p in range(self.n) if p != c])
            for p in range(self.n):
                if p != c:
                    envelope.seal(self.envelope_keys[c, p], shares[p + 1],
                                  nonce=keys.envelope_nonce(step), associated_data=b"")
            uploads.append(upload)
            self_seeds.append((self_seed, shares))
        total = masking.ring_sum(uploads, self.codec)
        recovered = []
        for _, shares in self_seeds:  # the server rebuilds each self seed from t shares
            some = dict(list(shares.items())[:threshold])
            recovered.append(shamir.combine(some, threshold=threshold))
        assert recovered == [s for s, _ in self_seeds]
        unmasked = masking.mask_vector(total, self.codec, self_seed=None,
                                       pair_seeds={s: -1 for s in recovered})
        return masking.decode_sum(unmasked, self.codec, n_summed=self.n).to(torch.float32)


def dream_round(steps: list, x0: torch.Tensor, n_steps: int, *, secure: SecureRound | None,
                overlap: bool) -> torch.Tensor:
    """n_steps of dream synthesis: gradients, (secure) sum, one Adam step on x."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for step in range(1, n_steps + 1):
        grads = dream_gradients(steps, x.detach(), overlap=overlap)
        if secure is None:
            for g in grads:  # the plain path refuses NaN too (federation does)
                if not bool(torch.isfinite(g).all()):
                    raise FloatingPointError("non-finite gradient")
            total = torch.stack(grads).sum(0)
        else:
            total = secure.total([g.reshape(-1) for g in grads], step).reshape(x.shape)
        x.grad = total / len(steps)
        opt.step()
    return x.detach()


def round_rows(args: argparse.Namespace, device: torch.device, reuse: object) -> list[dict]:
    """Secure vs plain time of an n-client heterogeneous dream round, interleaved."""
    names = args.round_models.split(",")
    steps = []
    for i, name in enumerate(names):
        if name == args.model and isinstance(reuse, FastDreamStep) and i == 0:
            steps.append(reuse)  # same shapes: its compiled graph is reused
            continue
        torch.manual_seed(i)
        model = build_model(name, input_shape=args.shape, num_classes=10).to(device).eval()
        steps.append(FastDreamStep.optimised(model, W))
    x0 = torch.randn(args.batch, *args.shape, device=device)
    secure = SecureRound(len(steps), x0.numel(), clip=args.clip, device=device)
    start = time.perf_counter()
    dream_round(steps, x0, 2, secure=None, overlap=args.overlap)  # compile and warm up
    dream_round(steps, x0, 2, secure=secure, overlap=args.overlap)
    warm = time.perf_counter() - start
    times: dict[str, list[float]] = {"plain": [], "secure": []}
    for _ in range(3):
        for kind in ("plain", "secure"):
            _sync(device)
            t0 = time.perf_counter()
            dream_round(steps, x0, args.round_steps, secure=secure if kind == "secure" else None,
                        overlap=args.overlap)
            _sync(device)
            times[kind].append(1e3 * (time.perf_counter() - t0) / args.round_steps)
    plain, sec = statistics.median(times["plain"]), statistics.median(times["secure"])
    return [{"models": args.round_models, "batch": args.batch, "steps": args.round_steps,
             "overlap": args.overlap, "plain_ms_per_step": plain, "secure_ms_per_step": sec,
             "ratio": sec / plain, "warmup_s": warm}]


def _markdown(result: dict) -> str:
    lines = [f"# Device benchmark ({result['device']}, {result['date']})", "",
             f"Command: `{result['command']}`", "", "## Dream step", "",
             "| variant | ms/step | GFLOP/step | TFLOP/s | x fp32 eager |", "|---|---|---|---|---|"]
    for r in result["dream_step"]:
        lines.append(f"| {r['variant']} | {r['ms']:.2f} | {r['gflop']:.2f} | {r['tflops']:.3f} "
                     f"| {r['speedup']:.1f} |")
    c = result["matmul_ceiling"]
    lines += ["", f"Measured matmul ceiling: {c['tflops']:.3f} TFLOP/s ({c['dtype']}, n={c['n']})",
              "", "## Dream round, secure vs plain", "",
              "| models | batch | steps | plain ms/step | secure ms/step | ratio |",
              "|---|---|---|---|---|---|"]
    for r in result["round"]:
        lines.append(f"| {r['models']} | {r['batch']} | {r['steps']} | "
                     f"{r['plain_ms_per_step']:.2f} | {r['secure_ms_per_step']:.2f} | "
                     f"{r['ratio']:.3f} |")
    lines += ["", "## Keystream", "", "| where | GB/s | words |", "|---|---|---|"]
    for r in result["keystream"]:
        lines.append(f"| {r['where']} | {r['gbps']:.2f} | {r['n_words']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a CPU smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--round-models", default="resnet18,vgg11,wrn16_1,resnet20")
    parser.add_argument("--round-steps", type=int, default=20)
    parser.add_argument("--clip", type=float, default=8.0, help="the default grad_clip")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false",
                        help="run heterogeneous clients one after another (no CUDA streams)")
    parser.add_argument("--keystream-words", type=int, default=1 << 26)
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/device (--quick: a temporary folder)")
    args = parser.parse_args(argv)
    args.shape = (3, 32, 32)
    if args.quick:
        args.batch, args.iters, args.shape, args.round_steps = 8, 2, (3, 16, 16), 2
        args.model, args.round_models = "resnet8", "resnet8,smallcnn,wrn16_1,mobilenet"
        args.keystream_words = 1 << 16
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    t0 = time.perf_counter()
    ceiling = matmul_ceiling(device, 8192 if device.type == "cuda" else 256, 20 if not args.quick
                             else 2)
    print(f"matmul ceiling: {ceiling['tflops']:.3f} TFLOP/s ({time.perf_counter() - t0:.0f} s)")
    steps, fast = dream_step(args, device)
    for r in steps:
        print(f"{r['variant']}: {r['ms']:.2f} ms/step, {r['tflops']:.1f} TFLOP/s, "
              f"x{r['speedup']:.1f} ({time.perf_counter() - t0:.0f} s)")
    rounds = round_rows(args, device, fast)
    print(f"round: plain {rounds[0]['plain_ms_per_step']:.2f} ms/step, secure "
          f"{rounds[0]['secure_ms_per_step']:.2f}, ratio {rounds[0]['ratio']:.3f} "
          f"({time.perf_counter() - t0:.0f} s)")
    # inductor's CPU compile of the double round takes ~20 s: not part of a smoke run
    skip = ("compiled",) if args.quick and device.type == "cpu" else ()
    stream = keystream_rates(device, args.keystream_words, skip=skip)
    result = {
        "device": name or device.type, "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.device" + (" --quick" if args.quick else ""),
        "torch": torch.__version__, "cuda": torch.version.cuda, "seconds": 0.0,
        "matmul_ceiling": ceiling, "dream_step": steps, "round": rounds, "keystream": stream,
    }
    result["seconds"] = time.perf_counter() - t0
    text = _markdown(result)
    print(text)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="device-quick-")) if args.quick else Path(
            "benchmarks/results/device")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "device.md").write_text(text)
    print(f"wrote {args.out}/device.json and device.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
