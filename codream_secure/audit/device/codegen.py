"""Inductor's Triton kernels for the dream step, generated on a CPU and counted, never run.

    python -m codream_secure.audit.device.codegen     # the variants that change kernels
    python -m codream_secure.audit.device.codegen --variants default,no-bn-term --top 8
    python -m codream_secure.audit.device.codegen --census DIR --modules
                                                      # an inductor cache, e.g. a GPU run's
                                                      # inductor-code.tgz

Needs `triton` (its CPU wheel is enough: no GPU, no driver). Inductor is told to emit Triton for
the CPU (`cpu_backend="triton"`) and to annotate each kernel with its own estimate of the bytes
it moves (`benchmark_kernel`). Three private hooks are replaced so that code generation asks no
Triton driver and no kernel is compiled: the step runs on stub kernels, and its (garbage) result
is dropped. Printed per variant: the kernel launches of one forward and backward by kind
(pointwise, reduction, persistent reduction) and the megabytes inductor estimates they move.
The fusion decisions are the scheduler's, which the CUDA backend shares; split sizes and
persistence thresholds depend on the device, so launch counts differ from a GPU profile's.
Variants that only tune launch configurations (coordinate descent, autotuning) cannot be told
apart here and are refused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from codream_secure.audit.reporting import write_json

# Options whose effect is a benchmarked launch configuration, never a different kernel.
TUNING_OPTIONS = frozenset({"coordinate_descent_tuning", "max_autotune_pointwise",
                            "max_autotune"})
KINDS = {"poi": "pointwise", "red": "reduction", "per": "persistent reduction"}
OP_FILE = "custom-ops.json"  # the generating child's count of bn_act_moments (fuse_bn)
_KERNEL = re.compile(r"async_compile\.triton\(\s*'(triton_\w+)'\s*,\s*'''(.*?)'''", re.S)
_BYTES = re.compile(r"'kernel_num_gb':\s*([0-9.eE+-]+)")
_LAUNCH = re.compile(r"\b(triton_\w+)\.run\(")


@dataclass
class KernelCensus:
    """Kernel launches of compiled graphs and inductor's byte estimates, by kind and kernel."""

    launches: Counter = field(default_factory=Counter)
    megabytes: Counter = field(default_factory=Counter)
    unsized: Counter = field(default_factory=Counter)  # launches with no byte estimate
    per_kernel: Counter = field(default_factory=Counter)  # name -> launches
    kernel_mb: dict[str, float] = field(default_factory=dict)  # name -> MB per launch
    modules: int = 0

    def add(self, other: KernelCensus) -> None:
        for mine, theirs in ((self.launches, other.launches), (self.megabytes, other.megabytes),
                             (self.unsized, other.unsized), (self.per_kernel, other.per_kernel)):
            mine.update(theirs)
        self.kernel_mb.update(other.kernel_mb)
        self.modules += other.modules

    def largest(self, count: int) -> list[tuple[float, int, str]]:
        """The `count` kernels that move the most bytes in all: (MB, launches, name)."""
        rows = [(self.kernel_mb[name] * n, n, name) for name, n in self.per_kernel.items()
                if name in self.kernel_mb]
        return sorted(rows, reverse=True)[:count]

    def summary(self) -> dict:
        return {"modules": self.modules, "launches": sum(self.launches.values()),
                "MB": round(sum(self.megabytes.values()), 1),
                "by_kind": {KINDS.get(k, k): {"launches": n, "MB": round(self.megabytes[k], 1)}
                            for k, n in sorted(self.launches.items())},
                "launches_without_estimate": sum(self.unsized.values())}


def _kind(name: str) -> str:
    return name.split("_")[1]


def census_module(source: str) -> KernelCensus:
    """Count the kernel launches of one inductor output module and the bytes they move."""
    result = KernelCensus(modules=1)
    for name, body in _KERNEL.findall(source):
        found = _BYTES.search(body)
        if found:
            result.kernel_mb[name] = float(found.group(1)) * 1e3
    # launches are in the wrapper, outside the kernels' source strings
    wrapper = _KERNEL.sub("", source)
    for name in _LAUNCH.findall(wrapper):
        result.per_kernel[name] += 1
        result.launches[_kind(name)] += 1
        if name in result.kernel_mb:
            result.megabytes[_kind(name)] += result.kernel_mb[name]
        else:
            result.unsized[_kind(name)] += 1
    return result


def census_modules(folder: Path) -> list[tuple[Path, KernelCensus]]:
    """census_module of every output module (a .py that launches kernels) under folder."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        source = path.read_text(errors="replace")
        if "async_compile.triton(" in source and _LAUNCH.search(_KERNEL.sub("", source)):
            found.append((path, census_module(source)))
    return found


def census_dir(folder: Path) -> KernelCensus:
    """The sum of census_modules(folder)."""
    total = KernelCensus()
    for _, census in census_modules(folder):
        total.add(census)
    return total


class _StubKernel:
    """Stands in for a compiled Triton kernel: launching it does nothing."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, *args: object, **kwargs: object) -> None:
        pass

    def __getattr__(self, attribute: str):  # type: ignore[no-untyped-def]
        return lambda *args, **kwargs: None  # precompile, set_compile_info, ...


def _codegen_only() -> None:
    """Let inductor emit Triton without a Triton driver, and compile none of it."""
    import torch
    import torch.utils._triton as triton_utils
    from torch._inductor import async_compile

    hooks = (triton_utils, "triton_hash_with_backend"), (triton_utils, "triton_backend"), (
        async_compile.AsyncCompile, "triton")
    missing = [name for owner, name in hooks if not hasattr(owner, name)]
    if missing:
        raise RuntimeError(f"torch {torch.__version__} lacks {', '.join(missing)}: this tool "
                           f"replaces private inductor hooks of torch 2.13")
    # the backend hash only keys inductor's caches; asking for it needs a GPU driver
    triton_utils.triton_hash_with_backend = lambda: "codegen-only"
    triton_utils.triton_backend = lambda: None
    async_compile.AsyncCompile.triton = lambda self, name, *args, **kwargs: _StubKernel(name)


def generate(variant: str, model_name: str, batch: int) -> None:
    """Compile one dream step of `variant` (bf16, channels_last, one-pass moments) on stubs."""
    import torch
    import torch._inductor.config as inductor

    from codream_secure.audit.device.step import STEP_VARIANTS, W
    from codream_secure.gpu.fast_dream import FastDreamStep
    from codream_secure.models import build_model

    _codegen_only()
    inductor.cpu_backend = "triton"
    inductor.benchmark_kernel = True  # puts kernel_num_gb into each kernel's metadata
    overrides = dict(STEP_VARIANTS.get(variant, {}))
    options = {k: v for k, v in overrides.pop("compile_options", {}).items()
               if k not in TUNING_OPTIONS}
    torch.manual_seed(0)
    model = build_model(model_name, input_shape=(3, 32, 32), num_classes=10).eval()
    settings = {"precision": "bf16", "channels_last": True, "bn_moments": "sums", **overrides}
    if settings.get("fuse_bn"):
        megabytes = _op_megabytes(FastDreamStep(model, W, **settings), batch)
        Path(os.environ["TORCHINDUCTOR_CACHE_DIR"], OP_FILE).write_text(json.dumps(megabytes))
    step = FastDreamStep(model, W, compile_model=True, compile_options=options or None,
                         **settings)
    step(torch.randn(batch, 3, 32, 32))


def _op_megabytes(step, batch: int) -> dict:  # type: ignore[no-untyped-def]
    """Launches and MB of fast_dream's bn_act_moments in one step at `batch`, from an eager
    step at batch 2 (sizes scale with the batch): x and the residual read and y written once
    each, and the float32 partial sums written (inductor's kernels read them)."""
    import torch

    from codream_secure.gpu import bn_act, fast_dream

    calls: list[int] = []
    op = fast_dream.bn_act_moments

    def counted(x, mean, var, weight, bias, eps, residual, relu):  # type: ignore[no-untyped-def]
        channels, tensors = x.shape[1], 2 + (residual is not None)
        positions = x.numel() // channels * batch // x.shape[0]
        calls.append(tensors * positions * channels * x.element_size()
                     + bn_act.row_blocks(positions) * 2 * channels * 4)
        return op(x, mean, var, weight, bias, eps, residual, relu)

    fast_dream.bn_act_moments = counted
    try:
        step(torch.randn(2, 3, 32, 32))
    finally:
        fast_dream.bn_act_moments = op
    return {"launches": len(calls), "MB": round(sum(calls) / 1e6, 1)}


def structural_variants() -> list[str]:
    """The step variants whose kernels can differ (not only their launch configurations)."""
    from codream_secure.audit.device.step import STEP_VARIANTS

    return ["default"] + [name for name, v in STEP_VARIANTS.items()
                          if not set(v.get("compile_options", {})) <= TUNING_OPTIONS
                          or set(v) - {"compile_options"}]


def _generate_in_child(variant: str, args: argparse.Namespace, cache: Path) -> None:
    """One variant per process and cache folder: Dynamo and inductor state stay apart."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    command = [sys.executable, "-m", "codream_secure.audit.device.codegen", "--generate", variant,
               "--model", args.model, "--batch", str(args.batch)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"variant {variant}: code generation failed: {' | '.join(tail)}")


def _print(label: str, census: KernelCensus, top: int) -> None:
    s = census.summary()
    kinds = ", ".join(f"{k} {v['launches']} ({v['MB']:.0f} MB)" for k, v in s["by_kind"].items())
    print(f"{label}: {s['launches']} launches, {s['MB']:.0f} MB; {kinds}", flush=True)
    for mb, launches, name in census.largest(top):
        print(f"    {mb:7.1f} MB  {launches} x {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m codream_secure.audit.device.codegen",
        description="Launches and inductor's byte estimates of the dream step's Triton kernels, "
                    "generated on this machine (CPU) and never run; or of an existing cache.")
    parser.add_argument("--variants", default=None,
                        help="comma-separated step variants, 'default' for the optimised step "
                             "(default: every variant whose kernels can differ)")
    parser.add_argument("--model", default="resnet18", help="zoo model (default resnet18)")
    parser.add_argument("--batch", type=int, default=256, help="dream batch (default 256)")
    parser.add_argument("--top", type=int, default=0,
                        help="also list each variant's N kernels that move the most bytes")
    parser.add_argument("--census", type=Path, default=None, metavar="DIR",
                        help="count the output modules of an existing inductor cache instead")
    parser.add_argument("--modules", action="store_true",
                        help="with --census: also a line per output module (a cache holds "
                             "every graph a run compiled: forward and backward of each step)")
    parser.add_argument("--json", type=Path, default=None, help="also write the counts here")
    parser.add_argument("--generate", help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args(argv)
    if args.batch < 1 or args.top < 0:
        parser.error("--batch must be at least 1 and --top at least 0")
    if args.modules and args.census is None:
        parser.error("--modules lists the modules of a --census DIR")
    if args.generate:
        generate(args.generate, args.model, args.batch)
        return 0
    if args.census is not None:
        if not args.census.is_dir():
            parser.error(f"--census: no folder at {args.census}")
        modules = census_modules(args.census)
        if not modules:
            parser.error(f"--census: no inductor output module under {args.census}")
        census = KernelCensus()
        for _, one in modules:
            census.add(one)
        _print(str(args.census), census, args.top)
        if args.modules:
            for path, one in modules:
                _print(f"  {path.relative_to(args.census)}", one, 0)
        results = {str(args.census): census.summary()}
    else:
        known = structural_variants()
        variants = args.variants.split(",") if args.variants else known
        unknown = [v for v in variants if v not in known]
        if unknown:
            parser.error(f"--variants: {', '.join(unknown)} not among {','.join(known)} (the "
                         f"tuning-only variants generate the default step's kernels)")
        if importlib.util.find_spec("triton") is None:
            parser.error("needs triton to generate kernels (pip install triton; the CPU wheel "
                         "is enough); --census DIR needs nothing")
        results = {}
        with tempfile.TemporaryDirectory(prefix="codegen-") as tmp:
            for variant in variants:
                try:
                    _generate_in_child(variant, args, Path(tmp) / variant)
                except RuntimeError as exc:
                    print(f"{variant}: FAILED: {exc}", flush=True)
                    results[variant] = {"error": str(exc)}
                    continue
                census = census_dir(Path(tmp) / variant)
                _print(variant, census, args.top)
                results[variant] = census.summary()
                ops = Path(tmp) / variant / OP_FILE
                if ops.exists():  # kernels of our own, outside inductor's count
                    results[variant]["bn_act_moments"] = op = json.loads(ops.read_text())
                    print(f"    + bn_act_moments (not inductor's): {op['launches']} launches, "
                          f"{op['MB']:.0f} MB; in all {census.summary()['MB'] + op['MB']:.0f} MB",
                          flush=True)
    if args.json is not None:
        write_json(args.json, results, indent=1)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
