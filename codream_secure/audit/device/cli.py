"""`python -m codream_secure.audit.device`: parse the flags, run the sections, write the results."""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path

import torch

from codream_secure.audit.device import keystream, rounds, step, training
from codream_secure.audit.device.report import _markdown, print_section, write_result
from codream_secure.audit.device.timing import matmul_ceiling

SECTIONS = ("step", "keystream", "graphed", "round", "batched", "train")
# The default sections in under 5 minutes. On an H100 (2026-11-26, with --profile and two extra
# step variants) step took 77 s, keystream 6, round 100, batched 80, graphed 95: 358 s for all
# five, so the same-architecture (vmap) comparison joins the training steps as sections asked for.
DEFAULT_SECTIONS = ("step", "keystream", "graphed", "round")
CUDA_ONLY = {"graphed": "one CUDA graph for all clients needs CUDA"}


def fp32_settings() -> dict:
    """PyTorch's TF32 switches as the fp32 rows run under them (the benchmark never sets them).

    PyTorch's defaults let cuDNN convolutions use TF32 but not matrix products; a reference
    figure taken under other settings compares with these rows only loosely."""
    return {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m codream_secure.audit.device",
        description="Device benchmark: fp32 eager vs optimised dream step, secure vs plain "
                    "dream round, ChaCha20 keystream rates, local training and distillation "
                    "steps eager vs the fast path (docs/gpu.md).")
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
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        type=lambda text: tuple(text.split(",")),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default "
                        f"{','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--step-variants", default="",
                        type=lambda text: tuple(v for v in text.split(",") if v),
                        help=f"extra optimised steps to time: {','.join(step.STEP_VARIANTS)}")
    parser.add_argument("--profile", action="store_true",
                        help="also write profile.txt (device time per kernel of the fast step) "
                        "and profile-round.txt (wall vs device-busy time of each round variant, "
                        "host time by phase)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/device (--quick: a temporary folder)")
    args = parser.parse_args(argv)
    if not args.sections or set(args.sections) - set(SECTIONS):
        parser.error(f"--sections takes a comma-separated subset of {','.join(SECTIONS)}")
    if set(args.step_variants) - set(step.STEP_VARIANTS):
        parser.error(f"--step-variants takes a comma-separated subset of "
                     f"{','.join(step.STEP_VARIANTS)}")
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
        "command": "python -m codream_secure.audit.device" + (" --quick" if args.quick else "") + (
            "" if args.sections == DEFAULT_SECTIONS
            else " --sections " + ",".join(args.sections)) + (
            " --step-variants " + ",".join(args.step_variants) if args.step_variants else ""),
        "torch": torch.__version__, "cuda": torch.version.cuda, "seconds": 0.0,
        "fp32_settings": fp32_settings(),
        "matmul_ceiling": ceiling, "dream_step": [], "round": [], "batched": [],
        "keystream": [], "round_graphed": [], "training": [], "errors": {}, "skipped": {},
        "default_sections": list(DEFAULT_SECTIONS), "section_seconds": {}, "extra_seconds": {},
    }
    fast = None

    def step_section() -> list[dict]:
        nonlocal fast
        rows, fast = step.dream_step(args, device)
        return rows

    # inductor's CPU compile of the double round takes ~20 s: not part of a smoke run
    skip = ("compiled",) if args.quick and device.type == "cpu" else ()
    sections = {"step": ("dream_step", step_section),
                "round": ("round", lambda: rounds.round_rows(args, device, fast)),
                "batched": ("batched", lambda: step.batched_rows(args, device)),
                "keystream": ("keystream", lambda: keystream.keystream_rates(
                    device, args.keystream_words, skip=skip)),
                "graphed": ("round_graphed", lambda: rounds.graphed_rows(args, device)),
                "train": ("training", lambda: training.training_rows(args, device))}
    for section in (s for s in SECTIONS if s in args.sections):
        key, run = sections[section]
        if section in CUDA_ONLY and device.type != "cuda":
            result["skipped"][section] = CUDA_ONLY[section]
            print(f"{section}: skipped ({CUDA_ONLY[section]})")
            continue
        started = time.perf_counter()
        try:
            result[key] = run()
        except Exception as exc:  # one failed section must not lose the others
            result["errors"][section] = f"{type(exc).__name__}: {exc}"
            print(f"{section} FAILED: {result['errors'][section]}")
        result["section_seconds"][section] = time.perf_counter() - started
        print_section(section, result, time.perf_counter() - t0)
        result["seconds"] = time.perf_counter() - t0
        write_result(result, args)  # a run cut short by a time limit keeps what it measured
    print(_markdown(result))
    print(f"wrote {args.out}/device.json and device.md")
    return 0
