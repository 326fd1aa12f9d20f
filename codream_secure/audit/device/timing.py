"""Timing, agreement and profiling helpers of the device benchmark."""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], object], device: torch.device, *, iters: int,
             repeats: int = 5) -> float:
    """Median over `repeats` of the mean wall time of `iters` back-to-back calls (ms)."""
    samples = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        samples.append(1e3 * (time.perf_counter() - start) / iters)
    return statistics.median(samples)


def matmul_ceiling(device: torch.device, n: int, iters: int) -> dict:
    """Achieved TFLOP/s of an n x n x n bf16 matrix product (fp32 on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    ms = timed_ms(lambda: a @ b, device, iters=iters)
    return {"n": n, "dtype": str(dtype), "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


def agreement(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative L2 error and cosine of a gradient against the fp32 eager one."""
    got, ref = got.double().flatten(), ref.double().flatten()
    return {"rel_err": float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)),
            "cosine": float(torch.nn.functional.cosine_similarity(got, ref, dim=0))}


@contextlib.contextmanager
def extra(args: object, label: str):  # type: ignore[no-untyped-def]
    """Time a block that is not part of the default sections (step variants, profiles) into
    args.extra_seconds[label], so the report can tell the table's own wall time."""
    start = time.perf_counter()
    try:
        yield
    finally:
        extras = vars(args).setdefault("extra_seconds", {})
        extras[label] = extras.get(label, 0.0) + time.perf_counter() - start


def phase(name: str) -> contextlib.AbstractContextManager:
    """A labelled range in torch.profiler's trace (a no-op cost when not profiling)."""
    return torch.profiler.record_function(name)


def _profiled(run: Callable[[], object], device: torch.device, steps: int) -> tuple:
    """torch.profiler over `run`; (profile, wall ms per step, device-busy ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
        sync(device)
    wall = 1e3 * (time.perf_counter() - start) / steps
    # kernels and copies only: CPU-side ranges (a compiled graph's call) also carry device time
    busy = sum(end - start for _, start, end in _device_kernels(prof)) / steps / 1e3
    return prof, wall, busy


def profile_table(step: Callable[[], object], device: torch.device, steps: int = 5) -> str:
    """Device time per kernel over `steps` calls (torch.profiler), the busy time per step, and
    the kernels by kind with the device's idle time between them."""
    prof, wall, busy = _profiled(lambda: [step() for _ in range(steps)], device, steps)
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30,
                                      max_name_column_width=100)
    timeline = render_timeline(device_timeline(_device_kernels(prof), steps))
    return (f"device busy time per step: {busy:.3f} ms of {wall:.3f} ms wall (kernels and "
            f"copies, profiler on)\n{timeline}\n{table}")


def _device_kernels(prof) -> list[tuple[str, float, float]]:  # type: ignore[no-untyped-def]
    """(name, start us, end us) of every kernel and copy the profiler saw on the device."""
    from torch.autograd import DeviceType

    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == DeviceType.CUDA]


# first match wins: cuDNN names its kernels by what they compute, inductor by its template
KERNEL_KINDS = (
    ("generic cuDNN convolution (no tensor cores)", ("convolve_common_engine",)),
    ("convolution input gradient (cuDNN dgrad)", ("dgrad",)),
    ("convolution (cuDNN fprop)", ("fprop",)),
    ("inductor reduction", ("triton_red", "triton_per")),
    ("inductor pointwise", ("triton_poi",)),
    ("matrix product", ("gemm", "gemv")),
    ("copy or fill", ("memcpy", "memset", "copy", "fill")),
)


def kernel_kind(name: str) -> str:
    """The KERNEL_KINDS entry a device kernel's name falls under ("other" if none)."""
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in lowered for m in marks)),
                "other")


SHORT_GAP_US = 10.0  # kernel to kernel inside a CUDA graph takes a few microseconds


def device_timeline(kernels: list[tuple[str, float, float]], steps: int) -> dict:
    """Per step: kernel count, busy time (the union of the (name, start us, end us) intervals),
    the span from the first kernel's start to the last one's end, the idle time inside that
    span split into gaps under SHORT_GAP_US (launch gaps) and longer ones (the device waiting
    for the host), and count and time by kind."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    kinds: dict[str, list[float]] = {}
    busy_us, covered_to = 0.0, None
    short_us, long_us, long_gaps = 0.0, 0.0, 0
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        count_us = kinds.setdefault(kernel_kind(name), [0, 0.0])
        count_us[0] += 1
        count_us[1] += end - start
        if covered_to is None or start >= covered_to:
            gap = 0.0 if covered_to is None else start - covered_to
            if gap < SHORT_GAP_US:
                short_us += gap
            else:
                long_us, long_gaps = long_us + gap, long_gaps + 1
            busy_us += end - start
            covered_to = end
        elif end > covered_to:  # overlaps the interval before (another stream)
            busy_us += end - covered_to
            covered_to = end
    span_us = (max(k[2] for k in kernels) - min(k[1] for k in kernels)) if kernels else 0.0
    return {"kernels_per_step": len(kernels) / steps, "busy_ms": busy_us / steps / 1e3,
            "span_ms": span_us / steps / 1e3,
            "idle_inside_span_ms": (span_us - busy_us) / steps / 1e3,
            "short_gaps_ms": short_us / steps / 1e3, "long_gaps_ms": long_us / steps / 1e3,
            "long_gaps_per_step": long_gaps / steps,
            "kinds": {kind: {"per_step": n / steps, "ms": us / steps / 1e3}
                      for kind, (n, us) in sorted(kinds.items(), key=lambda kv: -kv[1][1])}}


def render_timeline(timeline: dict) -> str:
    """device_timeline's figures as the text block profile.txt opens with."""
    lines = [f"{timeline['kernels_per_step']:.0f} kernels and copies per step; device busy "
             f"{timeline['busy_ms']:.3f} ms per step (overlapping kernels counted once) "
             f"within a span of {timeline['span_ms']:.3f} ms per step from the first "
             f"kernel's start to the last one's end, idle "
             f"{timeline['idle_inside_span_ms']:.3f} ms per step inside it: "
             f"{timeline['short_gaps_ms']:.3f} ms in gaps under {SHORT_GAP_US:.0f} us (launch "
             f"gaps), {timeline['long_gaps_ms']:.3f} ms in {timeline['long_gaps_per_step']:.1f} "
             f"longer ones (waits for the host)",
             f"  {'kind':<46} {'per step':>8} {'ms/step':>9}"]
    lines += [f"  {kind:<46} {row['per_step']:8.1f} {row['ms']:9.3f}"
              for kind, row in timeline["kinds"].items()]
    return "\n".join(lines)


def profile_round(run: Callable[[int], object], device: torch.device, steps: int = 5) -> str:
    """Where a round's step goes: wall vs device-busy time, then host time by labelled phase."""
    prof, wall, busy = _profiled(lambda: run(steps), device, steps)
    events = prof.key_averages()
    phases = sorted((e for e in events if e.key.startswith(("round.", "plain.", "secure."))),
                    key=lambda e: -e.cpu_time_total)
    lines = [f"wall {wall:.3f} ms/step, device busy {busy:.3f} ms/step, device idle "
             f"{wall - busy:.3f} ms/step (profiler on)", "host time per step by phase:"]
    lines += [f"  {e.key:<28} {e.cpu_time_total / steps / 1e3:8.3f} ms" for e in phases]
    lines.append(render_timeline(device_timeline(_device_kernels(prof), steps)))
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return "\n".join(lines) + "\n" + events.table(sort_by=sort, row_limit=20)


def interleaved_ms(steps: dict[str, Callable[[], object]], device: torch.device, *, iters: int,
                   rounds: int = 3) -> dict[str, float]:
    """Median ms/step of each compiled step, timed in turn `rounds` times (order-independent)."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            samples[name].append(timed_ms(fn, device, iters=iters, repeats=3))
    return {name: statistics.median(values) for name, values in samples.items()}




def sync_audit(run: Callable[[int], object], device: torch.device, steps: int = 4) -> str:
    """Where a `steps`-step round makes the host wait: the calls torch's sync debug mode flags.

    Flagged are implicit synchronisations (.item(), .cpu(), bool() of a device tensor, copies to
    pageable memory, nonzero), by the Python line that made them; explicit ones
    (torch.cuda.synchronize, Event.synchronize) are not. Needs CUDA.
    """
    if device.type != "cuda":
        return "sync audit skipped: needs CUDA"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run(1)  # compiled and warm: only the steady state counts
            sync(device)
            caught.clear()
            torch.cuda.set_sync_debug_mode("warn")
            run(steps)
        except Exception as exc:  # a diagnostic: never cost the section its timed rows
            return f"sync audit failed: {type(exc).__name__}: {exc}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = Counter(f"{w.filename}:{w.lineno}" for w in caught
                    if "synchroniz" in str(w.message))
    lines = [f"{sum(where.values())} synchronising calls in {steps} steps (round end included)"]
    return "\n".join(lines + [f"  {count:4d}  {line}" for line, count in where.most_common()])
