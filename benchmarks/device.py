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
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from codream_secure.dreams import (
    DreamLossWeights,
    NonFiniteGradientError,
    dream_gradient,
    dream_loss,
    prediction_entropy,
    total_variation,
)
from codream_secure.gpu import chacha20, masking
from codream_secure.gpu.fast_dream import BatchedDreamStep, FastDreamStep, dream_gradients
from codream_secure.models import build_model
from protocols.codec import FixedPointCodec
from protocols.primitives import envelope, kdf, prg, shamir
from protocols.secagg import keys

W = DreamLossWeights()
OFFICIAL = "fp32 eager, CoDream's published code (hook variance, loss.backward())"
SECTIONS = ("step", "keystream", "round", "batched")


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


def agreement(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative L2 error and cosine of a gradient against the fp32 eager one."""
    got, ref = got.double().flatten(), ref.double().flatten()
    return {"rel_err": float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)),
            "cosine": float(torch.nn.functional.cosine_similarity(got, ref, dim=0))}


class OfficialStep:
    """The dream step as CoDream's published code runs it (fp32, NCHW, eager).

    Its DeepInversion hook takes each BatchNorm input's mean, then its variance from a permuted,
    contiguous copy, and `loss.backward()` runs with the weights trainable, so their gradients
    are computed too. The loss terms are ours (same value), so the gradient must agree.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.terms = model, []
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.register_forward_hook(self._hook)

    def _hook(self, layer: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        feature = inputs[0]
        channels = feature.shape[1]
        mean = feature.mean([0, 2, 3])
        var = feature.permute(1, 0, 2, 3).contiguous().view(channels, -1).var(1, correction=0)
        self.terms.append(torch.norm(layer.running_var.data - var, 2)
                          + torch.norm(layer.running_mean.data - mean, 2))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        inputs = x.detach().clone().requires_grad_(True)
        self.terms.clear()
        self.model.zero_grad()
        logits = self.model(inputs)
        loss = (W.pred * prediction_entropy(logits) + W.bn * sum(self.terms)
                + W.tv * total_variation(inputs) + W.l2 * torch.linalg.vector_norm(inputs))
        loss.backward()
        self.terms.clear()
        return inputs.grad


def backward_with_weights(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """grad_x by loss.backward() with every parameter requiring a gradient (then cleared)."""
    inputs = x.detach().clone().requires_grad_(True)
    loss, _ = dream_loss(model, inputs, W)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return inputs.grad


def phase(name: str) -> contextlib.AbstractContextManager:
    """A labelled range in torch.profiler's trace (a no-op cost when not profiling)."""
    return torch.profiler.record_function(name)


def _profiled(run: Callable[[], object], device: torch.device, steps: int) -> tuple:
    """torch.profiler over `run`; (profile, wall ms per step, device-busy ms per step)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
        _sync(device)
    wall = 1e3 * (time.perf_counter() - start) / steps
    # kernels and copies only: CPU-side ranges (a compiled graph's call) also carry device time
    busy = sum(e.time_range.elapsed_us() for e in prof.events()
               if e.device_type == DeviceType.CUDA) / steps / 1e3
    return prof, wall, busy


def profile_table(step: Callable[[], object], device: torch.device, steps: int = 5) -> str:
    """Device time per kernel over `steps` calls (torch.profiler), and the busy time per step."""
    prof, wall, busy = _profiled(lambda: [step() for _ in range(steps)], device, steps)
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30)
    return (f"device busy time per step: {busy:.3f} ms of {wall:.3f} ms wall (kernels and "
            f"copies, profiler on)\n{table}")


def profile_round(run: Callable[[int], object], device: torch.device, steps: int = 5) -> str:
    """Where a round's step goes: wall vs device-busy time, then host time by labelled phase."""
    prof, wall, busy = _profiled(lambda: run(steps), device, steps)
    events = prof.key_averages()
    phases = sorted((e for e in events if e.key.startswith(("round.", "plain.", "secure."))),
                    key=lambda e: -e.cpu_time_total)
    lines = [f"wall {wall:.3f} ms/step, device busy {busy:.3f} ms/step, device idle "
             f"{wall - busy:.3f} ms/step (profiler on)", "host time per step by phase:"]
    lines += [f"  {e.key:<28} {e.cpu_time_total / steps / 1e3:8.3f} ms" for e in phases]
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return "\n".join(lines) + "\n" + events.table(sort_by=sort, row_limit=20)


STEP_VARIANTS = {
    # a diagnostic, not the same loss: what the BatchNorm-statistics term costs
    "no-bn-term": {"use_bn_statistics": False},
    # BatchNorm statistics by a Welford var_mean (the default before one-pass sums)
    "var-mean": {"bn_moments": "var_mean"},
    # inductor tunes each generated kernel's launch configuration by coordinate descent
    "coordesc": {"compile_options": {"coordinate_descent_tuning": True}},
    # ... and benchmarks more configurations for pointwise and reduction kernels
    "autotune-pointwise": {"compile_options": {"coordinate_descent_tuning": True,
                                               "max_autotune_pointwise": True}},
    # n-dimensional tiles for reductions (the BN statistics reduce the outer dims of NHWC)
    "tile-reductions": {"compile_options": {"triton.tile_reductions": True,
                                            "triton.prefer_nd_tiling": True}},
    # Triton templates benchmarked against cuDNN for every convolution (minutes to compile)
    "max-autotune": {"compile_options": {"max_autotune": True}},
}
# Inductor settings go in as torch.compile options: patched around the call instead, Dynamo
# reused the default compiled graph for them (session 2, run 1: a 0.04 s "compile").


def build_variant(name: str, model: torch.nn.Module, x: torch.Tensor,
                  device: torch.device) -> tuple[FastDreamStep, float]:
    """One more optimised step, built with other options and warmed up; its warm-up seconds."""
    start = time.perf_counter()
    step = FastDreamStep.optimised(model, W, **STEP_VARIANTS[name])
    step(x)
    step(x)  # compile, then record the CUDA graph
    _sync(device)
    return step, time.perf_counter() - start


def interleaved_ms(steps: dict[str, Callable[[], object]], device: torch.device, *, iters: int,
                   rounds: int = 3) -> dict[str, float]:
    """Median ms/step of each compiled step, timed in turn `rounds` times (order-independent)."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            samples[name].append(timed_ms(fn, device, iters=iters, repeats=3))
    return {name: statistics.median(values) for name, values in samples.items()}


def dream_step(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], object]:
    """fp32 eager, bf16 eager and optimised ms/step of args.model in one run; the fast step.

    Each row is printed as soon as it is measured, so a run cut short keeps it in its log.
    """
    torch.manual_seed(0)
    model = build_model(args.model, input_shape=args.shape, num_classes=10).to(device).eval()
    x = torch.randn(args.batch, *args.shape, device=device)
    flops = count_flops(model, x)
    reference = dream_gradient(model, x, W)
    eager_ms = timed_ms(lambda: dream_gradient(model, x, W), device, iters=args.iters)
    official_model = build_model(args.model, input_shape=args.shape, num_classes=10).to(device)
    official_model.load_state_dict(model.state_dict())
    official = OfficialStep(official_model.eval())
    official_ms = timed_ms(lambda: official(x), device, iters=args.iters)
    rows: list[dict] = []

    def add(row: dict) -> None:
        if "ms" in row:
            row.update(model=args.model, batch=args.batch, gflop=flops / 1e9,
                       tflops=flops / row["ms"] / 1e9, speedup=eager_ms / row["ms"],
                       speedup_vs_official=official_ms / row["ms"])
            print(f"{row['variant']}: {row['ms']:.2f} ms/step, {row['tflops']:.1f} TFLOP/s, "
                  f"x{row['speedup']:.1f} eager, x{row['speedup_vs_official']:.1f} official, "
                  f"cosine {row['cosine']:.4f}", flush=True)
        else:
            print(f"{row['variant']}: {row['error']}", flush=True)
        rows.append(row)

    add({"variant": "fp32 eager (dreams.dream_gradient)", "ms": eager_ms,
         **agreement(reference, reference)})
    add({"variant": OFFICIAL, "ms": official_ms, **agreement(official(x), reference)})
    # our loss with loss.backward() and trainable weights (FLOPs count the input gradient only)
    add({"variant": "fp32 eager, loss.backward() (weight gradients too)",
         "ms": timed_ms(lambda: backward_with_weights(model, x), device, iters=args.iters),
         **agreement(backward_with_weights(model, x), reference)})
    if device.type == "cuda":  # what bf16 and NHWC give before any compilation
        half = FastDreamStep(model, W, precision="bf16", channels_last=True)
        add({"variant": "bf16 autocast, channels_last, eager",
             "ms": timed_ms(lambda: half(x), device, iters=args.iters),
             **agreement(half(x), reference)})
    start = time.perf_counter()
    fast = FastDreamStep.optimised(model, W)
    fast(x)
    _sync(device)
    c = fast.config
    label = f"{c.precision}, channels_last={c.channels_last}, compile={c.compile}"
    if c.cuda_graphs:
        label += " (CUDA graphs)"
    compiled = {f"optimised ({label})": (fast, time.perf_counter() - start)}
    for name in args.step_variants:
        try:
            compiled[f"optimised, {name}"] = build_variant(name, model, x, device)
        except Exception as exc:  # a failed variant is reported, not fatal
            add({"variant": f"optimised, {name}", "error": f"{type(exc).__name__}: {exc}"})
    # compiled steps are timed in turn, three times: the first one timed used to look slower
    ms = interleaved_ms({k: (lambda st=st: st(x)) for k, (st, _) in compiled.items()}, device,
                        iters=args.iters)
    for variant, (step, warm) in compiled.items():
        add({"variant": variant, "warmup_s": warm, "ms": ms[variant],
             **agreement(step(x), reference)})
    if args.profile and device.type == "cuda":
        args.profile_text = profile_table(lambda: fast(x), device)
        print(args.profile_text.splitlines()[0])
    return rows, fast


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
            _sync(device)
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


@dataclass
class StepKeys:
    """One client's host-side secrets of one step: what the protocol derives and seals."""

    pair_seeds: dict[int, bytes]
    rounding_key: bytes
    self_seed: bytes
    shares: dict[int, bytes]
    sealed: list[bytes]


class SecureRound:
    """Per-step secure aggregation of n device gradients with the protocol's key schedule.

    The host part of a step (HKDF pair and rounding keys, the self seed, its Shamir shares and
    their AES-GCM envelopes) depends on the step number only, so `total` does it first, while the
    device still computes the gradients it was handed; the device then encodes and masks, and one
    synchronisation per step checks every gradient is finite before any upload is copied out.
    """

    def __init__(self, n: int, m: int, *, clip: float, device: torch.device,
                 fused: bool = True, fused_server: bool | None = None) -> None:
        self.n, self.m, self.device, self.fused = n, m, device, fused
        self.fused_server = fused if fused_server is None else fused_server
        self.threshold = n // 2 + 1
        self.codec = FixedPointCodec.for_clients(n, clip=clip, ring_bits=32,
                                                 rounding="stochastic", prg="chacha20")
        self.sid = os.urandom(16)
        self.masters = {(a, b): os.urandom(32) for a in range(n) for b in range(a + 1, n)}
        self.envelope_keys = {(a, b): os.urandom(32) for a in range(n) for b in range(n)}
        self.pinned = [torch.empty(m, dtype=torch.int32, pin_memory=device.type == "cuda")
                       for _ in range(n)]

    def step_keys(self, client: int, step: int) -> StepKeys:
        """The host work of one client at one step (no device work, no synchronisation)."""
        pair_seeds = {p: keys.pair_step_seed(self.masters[min(client, p), max(client, p)],
                                             session_id=self.sid, step=step)
                      for p in range(self.n) if p != client}
        rounding_key = kdf.derive_key(self.sid, session_id=b"rounding",
                                      purpose="stochastic-rounding", context=(step, client))
        self_seed = os.urandom(32)
        shares = shamir.split(self_seed, threshold=self.threshold,
                              share_ids=[p + 1 for p in range(self.n) if p != client])
        sealed = [envelope.seal(self.envelope_keys[client, p], shares[p + 1],
                                nonce=keys.envelope_nonce(step), associated_data=b"")
                  for p in range(self.n) if p != client]
        return StepKeys(pair_seeds, rounding_key, self_seed, shares, sealed)

    def total(self, grads: list[torch.Tensor], step: int) -> torch.Tensor:
        """Sum of the clients' gradients through masking, as the server decodes it."""
        with phase("secure.host_keys"):  # overlaps device work
            secrets = [self.step_keys(c, step) for c in range(self.n)]
        with phase("secure.uploads"):
            uploads = [masking.masked_upload(g, self.codec, client_id=c,
                                             self_seed=s.self_seed, pair_step_seeds=s.pair_seeds,
                                             rounding_key=s.rounding_key, check_finite=False,
                                             fused=self.fused)
                       for c, (g, s) in enumerate(zip(grads, secrets, strict=True))]
        with phase("secure.finite_check_sync"):
            require_finite(grads)  # the step's one sync: nothing leaves a client before it
        with phase("secure.send_copies"):
            for pinned, upload in zip(self.pinned, uploads, strict=True):
                pinned.copy_(upload, non_blocking=True)  # the bytes each client sends
        with phase("secure.server_shamir"):
            recovered = []
            for s in secrets:  # the server rebuilds each self seed from t shares
                some = dict(list(s.shares.items())[:self.threshold])
                recovered.append(shamir.combine(some, threshold=self.threshold))
            if recovered != [s.self_seed for s in secrets]:
                raise RuntimeError("Shamir recombination did not return the self seeds")
        with phase("secure.server_unmask_sum"):  # ring sum, self-mask removal, decoding
            return masking.unmask_sum(uploads, self.codec, n_summed=self.n,
                                      mask_seeds={s: -1 for s in recovered},
                                      fused=self.fused_server)

    def check(self, grads: list[torch.Tensor], step: int) -> dict:
        """Secure sum vs the plain sum of the clipped gradients: within n units of 2^-f."""
        flat = [g.reshape(-1) for g in grads]
        got = self.total(flat, step).double()
        clip = self.codec.clip
        want = torch.stack([g.double().clamp(-clip, clip) for g in flat]).sum(0)
        bound = self.n * math.ldexp(1.0, -self.codec.scale_bits)  # stochastic rounding: < 1 unit
        err = float((got - want).abs().max())
        clipped = int(sum(int((g.abs() > clip).sum()) for g in flat))
        if not err <= bound * 1.001 + 1e-6 * float(want.abs().max()):
            raise AssertionError(f"secure sum differs from the plain sum by {err:.3g} "
                                 f"(bound {bound:.3g})")
        return {"max_abs_error": err, "bound": bound, "clipped_values": clipped}


def require_finite(grads: list[torch.Tensor]) -> None:
    """One device sync for all clients: refuse a NaN/inf gradient before anything is sent."""
    if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        raise NonFiniteGradientError("a client's dream gradient holds NaN or inf")


class PlainRound:
    """Plain aggregation: the server sums the clients' float32 gradients.

    With `send`, each gradient is first copied to pinned host memory, as SecureRound copies each
    masked upload: the bytes a client sends, the same size in both (m 32-bit words).
    """

    def __init__(self, n: int, m: int, *, device: torch.device, send: bool) -> None:
        self.pinned = [torch.empty(m, dtype=torch.float32, pin_memory=device.type == "cuda")
                       for _ in range(n)] if send else []

    def total(self, grads: list[torch.Tensor], step: int) -> torch.Tensor:
        with phase("plain.finite_check_sync"):
            require_finite(grads)  # the same one sync as the secure path
        with phase("plain.send_copies"):
            for pinned, grad in zip(self.pinned, grads, strict=False):
                pinned.copy_(grad, non_blocking=True)
        with phase("plain.server_sum"):
            return torch.stack(grads).sum(0)


def dream_round(steps: list, x0: torch.Tensor, n_steps: int, *,
                aggregator: PlainRound | SecureRound, overlap: bool) -> torch.Tensor:
    """n_steps of dream synthesis: gradients, their (secure) sum, one Adam step on x."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for step in range(1, n_steps + 1):
        with phase("round.gradients"):
            grads = dream_gradients(steps, x.detach(), overlap=overlap)
        total = aggregator.total([g.reshape(-1) for g in grads], step).reshape(x.shape)
        with phase("round.adam"):
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
    n, m = len(steps), x0.numel()
    variants: dict[str, PlainRound | SecureRound] = {
        "plain": PlainRound(n, m, device=device, send=True),
        "plain, nothing leaves the device": PlainRound(n, m, device=device, send=False),
        "secure": SecureRound(n, m, clip=args.clip, device=device, fused=True)}
    if "triton" in chacha20.available_backends(device):  # elsewhere "secure" is unfused already
        variants["secure, fused upload only"] = SecureRound(
            n, m, clip=args.clip, device=device, fused=True, fused_server=False)
        variants["secure, unfused kernels"] = SecureRound(n, m, clip=args.clip, device=device,
                                                          fused=False)
    start, failed = time.perf_counter(), {}
    for name, aggregator in list(variants.items()):  # compile and warm up
        try:
            dream_round(steps, x0, 2, aggregator=aggregator, overlap=args.overlap)
        except Exception as exc:  # e.g. a kernel that does not compile here
            if name == "plain":
                raise
            failed[name] = f"{type(exc).__name__}: {exc}"
            del variants[name]
    warm = time.perf_counter() - start
    grads = dream_gradients(steps, x0, overlap=args.overlap)
    checks = {name: agg.check(grads, step=0) for name, agg in variants.items()
              if isinstance(agg, SecureRound)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.round_repeats):
        for name, aggregator in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            dream_round(steps, x0, args.round_steps, aggregator=aggregator, overlap=args.overlap)
            _sync(device)
            times[name].append(1e3 * (time.perf_counter() - t0) / args.round_steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    resident = median.get("plain, nothing leaves the device", math.nan)
    # each client alone: their sum against the plain round shows whether the GPU idles between
    # clients (the round also has the sum, the NaN check and the Adam step)
    alone = sum(timed_ms(lambda s=s: s(x0), device, iters=args.iters) for s in steps)
    if args.profile:
        args.round_profile_text = "\n\n".join(
            f"## {name}\n" + profile_round(
                lambda k, a=aggregator: dream_round(steps, x0, k, aggregator=a,
                                                    overlap=args.overlap), device)
            for name, aggregator in variants.items())
    overlap = args.overlap and not any(s.config.cuda_graphs for s in steps)
    return [{"aggregation": name, "models": args.round_models, "batch": args.batch,
             "steps": args.round_steps, "repeats": args.round_repeats, "overlap": overlap,
             "ms_per_step": median[name], "ratio": median[name] / median["plain"],
             "ratio_vs_device_resident_plain": median[name] / resident, "warmup_s": warm,
             "clients_alone_ms": alone, "all_ms_per_step": times[name],
             **checks.get(name, {})} for name in variants] + [
        {"aggregation": name, "models": args.round_models, "error": error}
        for name, error in failed.items()]


def batched_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Same-architecture clients: one optimised step each vs one vmapped step for all."""
    models = []
    for i in range(args.batched_clients):
        torch.manual_seed(100 + i)
        models.append(build_model(args.batched_model, input_shape=args.shape,
                                  num_classes=10).to(device).eval())
    x = torch.randn(args.batch, *args.shape, device=device)
    singles = [FastDreamStep.optimised(m, W) for m in models]
    batched = BatchedDreamStep.optimised(models, W)
    start = time.perf_counter()
    one_by_one = dream_gradients(singles, x)
    together = batched(x)
    batched(x)
    _sync(device)
    warm = time.perf_counter() - start
    agree = min(agreement(together[k], g)["cosine"] for k, g in enumerate(one_by_one))
    rows = []
    for name, fn in (("one step per client", lambda: dream_gradients(singles, x)),
                     ("one vmapped step", lambda: batched(x))):
        rows.append({"variant": name, "model": args.batched_model,
                     "clients": args.batched_clients, "batch": args.batch,
                     "ms_per_round_step": timed_ms(fn, device, iters=args.iters),
                     "warmup_s": warm, "min_cosine_between_paths": agree})
    return rows


def _markdown(result: dict) -> str:
    lines = [f"# Device benchmark ({result['device']}, {result['date']})", "",
             f"Command: `{result['command']}`", "", "## Dream step", "",
             "| variant | ms/step | GFLOP/step | TFLOP/s | x fp32 eager | x official code "
             "| rel. error | cosine |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["dream_step"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:200]} | | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['ms']:.2f} | {r['gflop']:.2f} | {r['tflops']:.3f} "
                     f"| {r['speedup']:.1f} | {r['speedup_vs_official']:.1f} "
                     f"| {r['rel_err']:.2e} | {r['cosine']:.4f} |")
    c = result["matmul_ceiling"]
    lines += ["", f"Measured matmul ceiling: {c['tflops']:.3f} TFLOP/s ({c['dtype']}, n={c['n']})",
              "", "## Dream round, secure vs plain", "",
              "| aggregation | models | batch | steps | ms/step | x plain | x plain kept on device "
              "| max error (bound) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["round"]:
        if "error" in r:
            lines.append(f"| {r['aggregation']} | {r['models']} | failed: {r['error'][:200]} "
                         "| | | | | |")
            continue
        check = (f"{r['max_abs_error']:.2e} ({r['bound']:.2e})" if "bound" in r else "-")
        lines.append(f"| {r['aggregation']} | {r['models']} | {r['batch']} | {r['steps']} | "
                     f"{r['ms_per_step']:.2f} | {r['ratio']:.3f} | "
                     f"{r['ratio_vs_device_resident_plain']:.3f} | {check} |")
    if result["round"]:
        lines += ["", f"Each client's step alone, summed: "
                  f"{result['round'][0]['clients_alone_ms']:.2f} ms"]
    lines += ["", "## Same-architecture clients", "",
              "| variant | model | clients | batch | ms per round step | min cosine |",
              "|---|---|---|---|---|---|"]
    for r in result.get("batched", []):
        lines.append(f"| {r['variant']} | {r['model']} | {r['clients']} | {r['batch']} | "
                     f"{r['ms_per_round_step']:.2f} | {r['min_cosine_between_paths']:.4f} |")
    lines += ["", "## Keystream", "", "| where | GB/s | words |", "|---|---|---|"]
    for r in result["keystream"]:
        lines.append(f"| {r['where']} | {r['gbps']:.2f} | {r['n_words']} |")
    if result.get("errors"):
        lines += ["", "## Failed sections", ""]
        lines += [f"- {name}: {error}" for name, error in result["errors"].items()]
    return "\n".join(lines) + "\n"


def print_section(section: str, result: dict, elapsed: float) -> None:
    """Progress lines of a finished section (the step section prints its rows as it goes)."""
    if section == "round" and result["round"]:
        print("round: " + ", ".join(f"{r['aggregation']} {r['ms_per_step']:.2f} ms/step "
                                    f"(x{r['ratio']:.3f})" if "ms_per_step" in r
                                    else f"{r['aggregation']} {r['error']}"
                                    for r in result["round"]))
    elif section == "batched":
        for r in result["batched"]:
            print(f"{r['variant']}: {r['ms_per_round_step']:.2f} ms per round step")
    print(f"  ({elapsed:.0f} s)")


def write_result(result: dict, args: argparse.Namespace) -> None:
    """device.json, device.md and (with --profile) profile.txt under args.out."""
    (args.out / "device.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "device.md").write_text(_markdown(result))
    if getattr(args, "profile_text", None):
        (args.out / "profile.txt").write_text(args.profile_text + "\n")
    if getattr(args, "round_profile_text", None):
        (args.out / "profile-round.txt").write_text(args.round_profile_text + "\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a CPU smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=positive_int, default=256)
    parser.add_argument("--iters", type=positive_int, default=20)
    parser.add_argument("--round-models", default="resnet18,vgg11,wrn16_1,resnet20")
    parser.add_argument("--round-steps", type=positive_int, default=20)
    parser.add_argument("--round-repeats", type=positive_int, default=5,
                        help="interleaved repeats of every round variant (the median is kept)")
    parser.add_argument("--batched-model", default="resnet20")
    parser.add_argument("--batched-clients", type=positive_int, default=4)
    parser.add_argument("--clip", type=float, default=8.0, help="the default grad_clip")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false",
                        help="run heterogeneous clients one after another (no CUDA streams)")
    parser.add_argument("--keystream-words", type=positive_int, default=1 << 26)
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        type=lambda text: tuple(text.split(",")),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--step-variants", default="",
                        type=lambda text: tuple(v for v in text.split(",") if v),
                        help=f"extra optimised steps to time: {','.join(STEP_VARIANTS)}")
    parser.add_argument("--profile", action="store_true",
                        help="also write profile.txt (device time per kernel of the fast step) "
                        "and profile-round.txt (wall vs device-busy time of each round variant, "
                        "host time by phase)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/device (--quick: a temporary folder)")
    args = parser.parse_args(argv)
    if not args.sections or set(args.sections) - set(SECTIONS):
        parser.error(f"--sections takes a comma-separated subset of {','.join(SECTIONS)}")
    if set(args.step_variants) - set(STEP_VARIANTS):
        parser.error(f"--step-variants takes a comma-separated subset of "
                     f"{','.join(STEP_VARIANTS)}")
    args.shape = (3, 32, 32)
    if args.quick:
        args.batch, args.iters, args.shape, args.round_steps = 8, 2, (3, 16, 16), 2
        args.round_repeats = 1
        args.model, args.round_models = "resnet8", "resnet8,smallcnn,wrn16_1,mobilenet"
        args.batched_model = "resnet8"
        args.keystream_words = 1 << 16
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    t0 = time.perf_counter()
    ceiling = matmul_ceiling(device, 8192 if device.type == "cuda" else 256, 20 if not args.quick
                             else 2)
    print(f"matmul ceiling: {ceiling['tflops']:.3f} TFLOP/s ({time.perf_counter() - t0:.0f} s)")
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="device-quick-")) if args.quick else Path(
            "benchmarks/results/device")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "device": name or device.type, "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.device" + (" --quick" if args.quick else "") + (
            "" if args.sections == SECTIONS else " --sections " + ",".join(args.sections)) + (
            " --step-variants " + ",".join(args.step_variants) if args.step_variants else ""),
        "torch": torch.__version__, "cuda": torch.version.cuda, "seconds": 0.0,
        "matmul_ceiling": ceiling, "dream_step": [], "round": [], "batched": [],
        "keystream": [], "errors": {},
    }
    fast = None

    def step_section() -> list[dict]:
        nonlocal fast
        rows, fast = dream_step(args, device)
        return rows

    # inductor's CPU compile of the double round takes ~20 s: not part of a smoke run
    skip = ("compiled",) if args.quick and device.type == "cpu" else ()
    sections = {"step": ("dream_step", step_section),
                "round": ("round", lambda: round_rows(args, device, fast)),
                "batched": ("batched", lambda: batched_rows(args, device)),
                "keystream": ("keystream",
                              lambda: keystream_rates(device, args.keystream_words, skip=skip))}
    for section in (s for s in SECTIONS if s in args.sections):
        key, run = sections[section]
        try:
            result[key] = run()
        except Exception as exc:  # one failed section must not lose the others
            result["errors"][section] = f"{type(exc).__name__}: {exc}"
            print(f"{section} FAILED: {result['errors'][section]}")
        print_section(section, result, time.perf_counter() - t0)
        result["seconds"] = time.perf_counter() - t0
        write_result(result, args)  # a run cut short by a time limit keeps what it measured
    print(_markdown(result))
    print(f"wrote {args.out}/device.json and device.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
