"""The round section: an n-client heterogeneous dream round, plain vs secure aggregation."""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from codream_secure.audit.device.finite import FiniteCheck
from codream_secure.audit.device.step import W
from codream_secure.audit.device.timing import (
    extra,
    phase,
    profile_round,
    sync,
    sync_audit,
    timed_ms,
)
from codream_secure.gpu import chacha20, masking
from codream_secure.gpu.fast_dream import FastDreamStep, dream_gradients
from codream_secure.gpu.send import UploadSender
from codream_secure.models import build_model
from protocols.codec import FixedPointCodec
from protocols.plan import majority_threshold
from protocols.primitives import envelope, kdf, shamir
from protocols.secagg import keys

DEFERRED = ", NaN checked at the round's end"


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
    synchronisation per step checks every gradient is finite before any upload is copied out
    (with `deferred_check`, none: the round's end checks every step's flags; see finite.py).
    """

    def __init__(self, n: int, m: int, *, clip: float, device: torch.device,
                 fused: bool = True, fused_server: bool | None = None,
                 side_stream: bool = True, deferred_check: bool = False) -> None:
        self.n, self.m, self.device, self.fused = n, m, device, fused
        self.finite = FiniteCheck(deferred=deferred_check)
        self.fused_server = fused if fused_server is None else fused_server
        self.threshold = majority_threshold(n)  # the protocol's: a majority of the n - 1 others
        self.codec = FixedPointCodec.for_clients(n, clip=clip, ring_bits=32,
                                                 rounding="stochastic", prg="chacha20")
        self.sid = os.urandom(16)
        self.masters = {(a, b): os.urandom(32) for a in range(n) for b in range(a + 1, n)}
        self.envelope_keys = {(a, b): os.urandom(32) for a in range(n) for b in range(n)}
        self.sender = UploadSender(n, m, torch.int32, device, side_stream=side_stream)

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
        grads = self.finite.screen(grads, step)
        with phase("secure.uploads"):
            uploads = [masking.masked_upload(g, self.codec, client_id=c,
                                             self_seed=s.self_seed, pair_step_seeds=s.pair_seeds,
                                             rounding_key=s.rounding_key, check_finite=False,
                                             fused=self.fused)
                       for c, (g, s) in enumerate(zip(grads, secrets, strict=True))]
        with phase("secure.finite_check_sync"):
            self.finite.gate(grads)  # the step's one sync: nothing leaves a client before it
        with phase("secure.send_copies"):  # the bytes each client sends
            self.sender.send(uploads)
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
        """Secure vs plain sum of the clipped gradients: n units of 2^-f plus float32 rounding."""
        flat = [g.reshape(-1) for g in grads]
        got = self.total(flat, step).double()
        self.finish()
        clip = self.codec.clip
        want = torch.stack([g.double().clamp(-clip, clip) for g in flat]).sum(0)
        # Each client's stochastic rounding is off by < 1 unit of 2^-f; the decoded sum is rounded
        # once to float32 (relative error <= 2^-24); the float64 reference sum of n terms is off
        # by <= n * 2^-53 of its largest magnitude.
        bound = (self.n * math.ldexp(1.0, -self.codec.scale_bits)
                 + math.ldexp(float(got.abs().max()), -24)
                 + self.n * math.ldexp(float(want.abs().max()), -53))
        err = float((got - want).abs().max())
        clipped = int(sum(int((g.abs() > clip).sum()) for g in flat))
        if not err <= bound:
            raise AssertionError(f"secure sum differs from the plain sum by {err:.3g} "
                                 f"(bound {bound:.3g})")
        return {"max_abs_error": err, "bound": bound, "clipped_values": clipped}

    def finish(self) -> None:
        """The round's end: a deferred finite check reads its flags here."""
        self.finite.finish()


class PlainRound:
    """Plain aggregation: the server sums the clients' float32 gradients.

    With `send`, each gradient is also copied to pinned host memory, as SecureRound copies each
    masked upload: the bytes a client sends, the same size in both (m 32-bit words). The finite
    check is SecureRound's: every step, or deferred to the round's end.
    """

    def __init__(self, n: int, m: int, *, device: torch.device, send: bool,
                 deferred_check: bool = False) -> None:
        self.sender = UploadSender(n, m, torch.float32, device) if send else None
        self.finite = FiniteCheck(deferred=deferred_check)

    def total(self, grads: list[torch.Tensor], step: int) -> torch.Tensor:
        grads = self.finite.screen(grads, step)
        with phase("plain.finite_check_sync"):
            self.finite.gate(grads)  # the same one sync as the secure path
        with phase("plain.send_copies"):
            if self.sender is not None:
                self.sender.send(grads)
        with phase("plain.server_sum"):
            return torch.stack(grads).sum(0)

    def finish(self) -> None:
        """The round's end: a deferred finite check reads its flags here."""
        self.finite.finish()


def dream_round(gradients: Callable[[torch.Tensor], list[torch.Tensor]], x0: torch.Tensor,
                n_steps: int, *, aggregator: PlainRound | SecureRound) -> torch.Tensor:
    """n_steps of dream synthesis: gradients, their (secure) sum, one Adam step on x."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for step in range(1, n_steps + 1):
        with phase("round.gradients"):
            grads = gradients(x.detach())
        total = aggregator.total([g.reshape(-1) for g in grads], step).reshape(x.shape)
        with phase("round.adam"):
            x.grad = total / len(grads)
            opt.step()
    aggregator.finish()
    return x.detach()


def round_models(args: argparse.Namespace, device: torch.device) -> list[torch.nn.Module]:
    """The round's clients (args.round_models), seeded by position, in eval mode."""
    models = []
    for i, name in enumerate(args.round_models.split(",")):
        torch.manual_seed(i)
        models.append(build_model(name, input_shape=args.shape, num_classes=10).to(device).eval())
    return models


def aggregators(n: int, m: int, args: argparse.Namespace, device: torch.device, *,
                every_kernel_variant: bool) -> dict[str, PlainRound | SecureRound]:
    """Plain (sending, and kept on the device) and secure aggregation, each also with the finite
    check deferred to the round's end (no sync per step), plus ablations."""
    variants: dict[str, PlainRound | SecureRound] = {
        "plain": PlainRound(n, m, device=device, send=True),
        "plain, nothing leaves the device": PlainRound(n, m, device=device, send=False),
        "secure": SecureRound(n, m, clip=args.clip, device=device, fused=True),
        "plain" + DEFERRED: PlainRound(n, m, device=device, send=True, deferred_check=True),
        "secure" + DEFERRED: SecureRound(n, m, clip=args.clip, device=device, fused=True,
                                         deferred_check=True)}
    if not every_kernel_variant:
        return variants
    if device.type == "cuda":  # what sending on a side stream saves
        variants["secure, sends on the compute stream"] = SecureRound(
            n, m, clip=args.clip, device=device, fused=True, side_stream=False)
    if "triton" in chacha20.available_backends(device):  # elsewhere "secure" is unfused already
        variants["secure, fused upload only"] = SecureRound(
            n, m, clip=args.clip, device=device, fused=True, fused_server=False)
        variants["secure, unfused kernels"] = SecureRound(n, m, clip=args.clip, device=device,
                                                          fused=False)
    return variants


def time_round(gradients: Callable[[torch.Tensor], list[torch.Tensor]], x0: torch.Tensor,
               variants: dict[str, PlainRound | SecureRound], args: argparse.Namespace,
               device: torch.device) -> tuple[dict, dict, dict, dict, float]:
    """Warm every variant up, check the secure sums, time them interleaved.

    Returns (median ms/step, all samples, checks, failed variants, warm-up seconds); a variant
    other than "plain" that fails to warm up is reported, not fatal.
    """
    start, failed = time.perf_counter(), {}
    for name, aggregator in list(variants.items()):  # compile and warm up
        try:
            dream_round(gradients, x0, 2, aggregator=aggregator)
        except Exception as exc:  # e.g. a kernel that does not compile here
            if name == "plain":
                raise
            failed[name] = f"{type(exc).__name__}: {exc}"
            del variants[name]
    warm = time.perf_counter() - start
    grads = gradients(x0)
    checks = {name: agg.check(grads, step=0) for name, agg in variants.items()
              if isinstance(agg, SecureRound)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.round_repeats):
        for name, aggregator in variants.items():
            sync(device)
            t0 = time.perf_counter()
            dream_round(gradients, x0, args.round_steps, aggregator=aggregator)
            sync(device)
            times[name].append(1e3 * (time.perf_counter() - t0) / args.round_steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    return median, times, checks, failed, warm


def _runs(gradients: Callable[[torch.Tensor], list[torch.Tensor]], x0: torch.Tensor,
          variants: dict[str, PlainRound | SecureRound]) -> dict[str, Callable[[int], object]]:
    """Each variant as a function of the number of steps to run (for the profilers)."""
    return {name: (lambda k, a=aggregator: dream_round(gradients, x0, k, aggregator=a))
            for name, aggregator in variants.items()}


def round_table(args: argparse.Namespace, median: dict, times: dict, checks: dict,
                failed: dict, extra: dict) -> list[dict]:
    """One row per variant: ms/step and the ratios to the plain rows; then the failures.

    `ratio_same_check` divides by the plain row whose finite check runs as this row's does
    (every step, or deferred to the round's end): the secure-vs-plain figure of that design.
    """
    resident = median.get("plain, nothing leaves the device", math.nan)

    def same_check(name: str) -> float:
        return median.get("plain" + DEFERRED, math.nan) if name.endswith(DEFERRED) \
            else median["plain"]

    return [{"aggregation": name, "models": args.round_models, "batch": args.batch,
             "steps": args.round_steps, "repeats": args.round_repeats,
             "ms_per_step": median[name], "ratio": median[name] / median["plain"],
             "ratio_same_check": median[name] / same_check(name),
             "ratio_vs_device_resident_plain": median[name] / resident,
             "all_ms_per_step": times[name], **extra, **checks.get(name, {})}
            for name in median] + [
        {"aggregation": name, "models": args.round_models, "error": error}
        for name, error in failed.items()]


def round_rows(args: argparse.Namespace, device: torch.device, reuse: object) -> list[dict]:
    """Secure vs plain time of an n-client heterogeneous dream round, one graph per client."""
    steps = []
    for i, model in enumerate(round_models(args, device)):
        if (args.round_models.split(",")[0] == args.model and isinstance(reuse, FastDreamStep)
                and i == 0):
            steps.append(reuse)  # same model and shapes: its compiled graph is reused
            continue
        steps.append(FastDreamStep.optimised(model, W))
    x0 = torch.randn(args.batch, *args.shape, device=device)

    def gradients(x: torch.Tensor) -> list[torch.Tensor]:
        return dream_gradients(steps, x, overlap=args.overlap)

    variants = aggregators(len(steps), x0.numel(), args, device, every_kernel_variant=True)
    median, times, checks, failed, warm = time_round(gradients, x0, variants, args, device)
    # each client alone: their sum against the plain round shows whether the GPU idles between
    # clients (the round also has the sum, the NaN check and the Adam step)
    alone = sum(timed_ms(lambda s=s: s(x0), device, iters=args.iters) for s in steps)
    if args.profile:
        with extra(args, "profiles"):
            args.round_profile_text = "\n\n".join(
                f"## {name}\n" + profile_round(run, device) + "\n" + sync_audit(run, device)
                for name, run in _runs(gradients, x0, variants).items())
    overlap = args.overlap and not any(s.config.cuda_graphs for s in steps)
    return round_table(args, median, times, checks, failed,
                       {"overlap": overlap, "warmup_s": warm, "clients_alone_ms": alone})


def graphed_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """The same round with every client's step captured in one CUDA graph (gpu.graphed)."""
    from codream_secure.gpu.graphed import GraphedDreamGradients

    x0 = torch.randn(args.batch, *args.shape, device=device)
    start = time.perf_counter()
    graphed = GraphedDreamGradients(round_models(args, device), x0.shape, W)
    graphed(x0)  # compile, warm up, capture
    sync(device)
    capture = time.perf_counter() - start
    variants = aggregators(graphed.n_models, x0.numel(), args, device,
                           every_kernel_variant=False)
    median, times, checks, failed, warm = time_round(graphed, x0, variants, args, device)
    replay = timed_ms(lambda: graphed(x0), device, iters=args.iters)
    if args.profile:
        with extra(args, "profiles"):
            args.graphed_profile_text = "\n\n".join(
                f"## {name}, one graph\n" + profile_round(run, device) + "\n"
                + sync_audit(run, device) for name, run in _runs(graphed, x0, variants).items())
    return round_table(args, median, times, checks, failed,
                       {"warmup_s": warm + capture, "one_replay_ms": replay})
