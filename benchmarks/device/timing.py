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


def phase(name: str) -> contextlib.AbstractContextManager:
    """A labelled range in torch.profiler's trace (a no-op cost when not profiling)."""
    return torch.profiler.record_function(name)


def _profiled(run: Callable[[], object], device: torch.device, steps: int) -> tuple:
    """torch.profiler over `run`; (profile, wall ms per step, device-busy ms per step)."""
    from torch.autograd import DeviceType
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
