"""The dream-step sections: fp32 eager baselines (ours and CoDream's published step), the
optimised step and its variants, and same-architecture clients vmapped."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from codream_secure.audit.device.timing import (
    agreement,
    extra,
    interleaved_ms,
    profile_table,
    sync,
    timed_ms,
)
from codream_secure.dreams import (
    DreamLossWeights,
    dream_gradient,
    dream_loss,
    prediction_entropy,
    total_variation,
)
from codream_secure.gpu.fast_dream import BatchedDreamStep, FastDreamStep, dream_gradients
from codream_secure.models import build_model

W = DreamLossWeights()
OFFICIAL = "fp32 eager, CoDream's published code (hook variance, loss.backward())"


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
    # the stem convolution's 3 input channels padded to 8 with zeros (same loss): an H100
    # profile (2026-11-26) showed one generic cuDNN kernel of 83 us per step, probably that
    # convolution's
    "pad-stem": {"stem_channels": 8},
    # independent small kernels (the BN term's per-layer norms among them) launched as one
    "combo-kernels": {"compile_options": {"combo_kernels": True}},
    # nodes fused even where they share no buffer: fewer, larger kernels
    "aggressive-fusion": {"compile_options": {"aggressive_fusion": True}},
    # the BN term's norms taken per channel width, not per layer (ResNet-18: 4 small reductions
    # instead of 40; an H100 profile of 2026-11-27 counted 81 reduction kernels per step)
    "grouped-bn-norms": {"bn_norms": "grouped"},
    # each BatchNorm with its residual add, its ReLU and the BN term's moments in one pass of a
    # hand-written Triton kernel (gpu.bn_act): inductor reads every BatchNorm input twice
    "fused-bn": {"fuse_bn": True, "bn_moments": "sums"},
    # Triton templates benchmarked against cuDNN for every convolution (minutes to compile)
    "max-autotune": {"compile_options": {"max_autotune": True}},
}
# Every same-loss variant above but max-autotune at once: the most these settings can give
# together (a GPU lease times one compile instead of five; the single ones say which helped)
COMBINED = ("pad-stem", "tile-reductions", "coordesc", "autotune-pointwise", "combo-kernels",
            "aggressive-fusion", "grouped-bn-norms", "fused-bn")
STEP_VARIANTS["combined"] = {
    **{k: v for name in COMBINED for k, v in STEP_VARIANTS[name].items()},
    "compile_options": {k: v for name in COMBINED
                        for k, v in STEP_VARIANTS[name].get("compile_options", {}).items()}}
# Inductor settings go in as torch.compile options: patched around the call instead, Dynamo
# reused the default compiled graph for them (an H100 run of 2026-11-26: a 0.04 s "compile").


def build_variant(name: str, model: torch.nn.Module, x: torch.Tensor,
                  device: torch.device) -> tuple[FastDreamStep, float]:
    """One more optimised step, built with other options and warmed up; its warm-up seconds."""
    start = time.perf_counter()
    step = FastDreamStep.optimised(model, W, **STEP_VARIANTS[name])
    step(x)
    step(x)  # compile, then record the CUDA graph
    sync(device)
    return step, time.perf_counter() - start


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
    sync(device)
    c = fast.config
    label = f"{c.precision}, channels_last={c.channels_last}, compile={c.compile}"
    if c.cuda_graphs:
        label += " (CUDA graphs)"
    default, default_warm = f"optimised ({label})", time.perf_counter() - start
    default_ms: list[float] = []
    for name in args.step_variants:
        with extra(args, "step variants"):
            try:
                variant, warm = build_variant(name, model, x, device)
            except Exception as exc:  # a failed variant is reported, not fatal
                add({"variant": f"optimised, {name}", "error": f"{type(exc).__name__}: {exc}"})
                continue
            # timed in turn with the default step, three times (the first one timed used to
            # look slower), and printed at once: a run stopped at its time limit keeps these rows
            ms = interleaved_ms({default: lambda: fast(x), name: lambda v=variant: v(x)},
                                device, iters=args.iters)
            default_ms.append(ms[default])
            add({"variant": f"optimised, {name}", "warmup_s": warm, "ms": ms[name],
                 "default_ms_same_turns": ms[default], **agreement(variant(x), reference)})
    if not default_ms:
        default_ms.append(interleaved_ms({default: lambda: fast(x)}, device,
                                         iters=args.iters)[default])
    add({"variant": default, "warmup_s": default_warm, "ms": statistics.median(default_ms),
         **agreement(fast(x), reference)})
    if args.profile and device.type == "cuda":
        with extra(args, "profiles"):
            args.profile_text = profile_table(lambda: fast(x), device)
        print(args.profile_text.splitlines()[0])
    return rows, fast


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
    sync(device)
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


