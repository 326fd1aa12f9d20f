"""The training section: local training and distillation steps, eager vs the fast path.

Each variant trains its own copy of one initial model through the public `train_local` and
`distill` (shuffling, gathers and the optimiser included), so a row is what a round pays.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from codream_secure.audit.device.timing import interleaved_ms, sync
from codream_secure.distill import distill, train_local
from codream_secure.models import build_model
from codream_secure.train_step import FastPath


def count_training_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one cross-entropy training step (forward, backward to weights and input)."""
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def variants(device: torch.device) -> dict[str, tuple[str, FastPath | None]]:
    """Row label -> (precision, fast path) for each job: the eager paths, then the compiled ones.

    Each compiled variant costs a ResNet-18 training-graph compile (~30 s), so device_check.sh's
    `training` stage has a limit of its own.
    """
    if device.type != "cuda":  # a smoke run: Dynamo and AOTAutograd without inductor's codegen
        return {"fp32 eager": ("fp32", None),
                "fp32 traced (aot_eager)": ("fp32", FastPath(compile_backend="aot_eager"))}
    rows = {"fp32 eager": ("fp32", None), "bf16 eager": ("bf16", None),
            "bf16 fast path (simulate's default)": ("bf16", FastPath.optimised(device, "bf16"))}
    # what simulate's `[device] train_cuda_graphs = "on"` runs
    rows["bf16 fast path + CUDA graphs"] = ("bf16", FastPath.optimised(device, "bf16",
                                                                       cuda_graphs=True))
    return rows


def training_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """ms per step of train_local and distill for each variant, timed in turn in one run."""
    n = args.batch * args.iters
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, *args.shape, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    teacher = F.softmax(torch.randn(n, 10, generator=gen), dim=1).to(device)
    torch.manual_seed(0)
    initial = build_model(args.model, input_shape=args.shape, num_classes=10).to(device)
    flops = count_training_flops(initial, x[:args.batch], y[:args.batch])
    jobs = {
        "local training": lambda m, p, f: train_local(
            m, x, y, epochs=1, lr=0.01, batch_size=args.batch, precision=p, fast=f,
            generator=torch.Generator().manual_seed(1)),
        "distillation": lambda m, p, f: distill(
            m, x, teacher, epochs=1, lr=0.01, batch_size=args.batch, teacher_kind="probs",
            precision=p, fast=f, generator=torch.Generator().manual_seed(1)),
    }
    rows: list[dict] = []
    for job, run in jobs.items():
        epochs, first = {}, {}
        for label, (precision, fast) in variants(device).items():
            model = build_model(args.model, input_shape=args.shape, num_classes=10).to(device)
            model.load_state_dict(initial.state_dict())
            start = time.perf_counter()
            try:
                first[label] = run(model, precision, fast)["loss"]  # compiles on the fast path
                sync(device)
            except Exception as exc:  # a failed variant is reported, not fatal
                rows.append({"job": job, "variant": label, "error": f"{type(exc).__name__}: {exc}"})
                print(f"{job}, {label}: {rows[-1]['error']}", flush=True)
                continue
            warm = time.perf_counter() - start
            epochs[label] = (lambda m=model, p=precision, f=fast, r=run: r(m, p, f), warm)
        ms = interleaved_ms({k: fn for k, (fn, _) in epochs.items()}, device, iters=1)
        base = ms.get("fp32 eager")
        for label, (_, warm) in epochs.items():
            per_step = ms[label] / args.iters
            row = {"job": job, "variant": label, "model": args.model, "batch": args.batch,
                   "ms": per_step, "warmup_s": warm, "first_epoch_loss": first[label],
                   "gflop": flops / 1e9, "tflops": flops / per_step / 1e9,
                   "speedup": base / ms[label] if base else None}
            rows.append(row)
            print(f"{job}, {label}: {per_step:.2f} ms/step, {row['tflops']:.1f} TFLOP/s, "
                  f"first-epoch loss {first[label]:.4f}", flush=True)
    return rows
