"""The run's [privacy] settings turned into mechanisms and one privacy ledger.

Client level: every dream-gradient sum and every soft-label sum is one release of a Gaussian
mechanism with the same noise multiplier z (each channel with its own L2 clip), so the ledger
counts releases at q = 1 with the smaller of the two channels' accounting multipliers.
Distributed noise is truncated: its tail is sized so that accountant delta + truncation delta
stays within [privacy] dp_delta (privacy.TRUNCATION_DELTA_SHARE of it goes to the truncation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from codream_secure.config import PrivacyConfig
from codream_secure.errors import ConfigError
from protocols.dp import mechanisms as dp
from protocols.errors import ProtocolError
from protocols.plan import AggregationPlan

if TYPE_CHECKING:  # opacus loads only when a run plans DP
    from codream_secure.federation import CoDreamFederation
    from codream_secure.privacy import PrivacyLedger


@dataclass
class ClientDP:
    """The two channels' mechanisms and the ledger that counts their releases."""

    grad: dp.DPSpec
    labels: dp.DPSpec
    ledger: PrivacyLedger
    label_clip: float


def label_clip(privacy: PrivacyConfig, dream_batch: int) -> float:
    """L2 clip of one client's soft-label matrix: sqrt(dream_batch) clips no probability matrix."""
    return privacy.dp_label_clip or math.sqrt(dream_batch)


def _specs(privacy: PrivacyConfig, label_l2_clip: float, z: float, t: int | None,
           tail_bits: int = dp.DEFAULT_TAIL_BITS) -> tuple[dp.DPSpec, dp.DPSpec]:
    kind = privacy.dp_noise_kind if privacy.dp_mode == "distributed" else None
    make = [dp.DPSpec(mode=privacy.dp_mode, noise_multiplier=z, l2_clip=clip, noise=kind,
                      min_contributors=t, tail_bits=tail_bits)
            for clip in (privacy.dp_clip, label_l2_clip)]
    return make[0], make[1]


def _accounting(plan: AggregationPlan, n_clients: int, spec: dp.DPSpec, dim: int
                ) -> tuple[float, float]:
    """(accounting multiplier, truncation TV per release) of one channel's releases."""
    noise = dp.DistributedNoise(spec) if spec.mode == "distributed" else None
    bits = plan.scale_bits(clip=spec.l2_clip, headroom=0.0 if noise is None else noise.headroom)
    z = dp.accounting_noise_multiplier(spec, dim=dim, scale_bits=bits)
    tv = 0.0
    if noise is not None and bits is not None:
        tv = n_clients * dim * noise.tail_probability(bits)
    return z, tv


def plan_client_dp(privacy: PrivacyConfig, plan: AggregationPlan, *, n_clients: int,
                   rounds: int, dream_steps: int, dream_batch: int, grad_dim: int,
                   label_dim: int) -> ClientDP:
    """Specs (z given, or calibrated to dp_epsilon over the run's `rounds` x `dream_steps`
    releases), tail bits that keep the total delta within dp_delta, and a fresh ledger."""
    from codream_secure.privacy import (
        INTEGER_ORDERS,
        TRUNCATION_DELTA_SHARE,
        PrivacyLedger,
        calibrate_noise,
        releases_per_run,
        truncation_tail_bits,
    )

    n, labels_l2 = n_clients, label_clip(privacy, dream_batch)
    distributed = privacy.dp_mode == "distributed"
    t = plan.min_contributors if distributed else None
    budget = TRUNCATION_DELTA_SHARE * privacy.dp_delta if distributed else 0.0
    releases = releases_per_run(rounds, dream_steps)

    def accounting(z: float, bits: int) -> tuple[float, float]:
        grad, labels = _specs(privacy, labels_l2, z, t, bits)
        pairs = [_accounting(plan, n, grad, grad_dim), _accounting(plan, n, labels, label_dim)]
        return min(a for a, _ in pairs), max(tv for _, tv in pairs)

    mechanism = "skellam" if distributed and privacy.dp_noise_kind == "skellam" else "gaussian"
    orders = INTEGER_ORDERS if mechanism == "skellam" else None

    def ledger_for(z: float, bits: int) -> PrivacyLedger:
        z_acc, tv = accounting(z, bits)
        return PrivacyLedger(
            unit="client", mechanism=privacy.dp_noise_kind if distributed else "gaussian",
            mode=privacy.dp_mode, noise_multiplier=z_acc,
            nominal_noise_multiplier=z, l2_clip=privacy.dp_clip, delta=privacy.dp_delta,
            n_samples=n, accountant=privacy.dp_accountant, truncation_tv_per_release=tv,
            truncation_delta_budget=budget, orders=orders)

    try:
        target = None
        if privacy.dp_noise is None:
            assert privacy.dp_epsilon is not None
            target = calibrate_noise(privacy.dp_epsilon, privacy.dp_delta - budget, releases,
                                     n_samples=n, accountant=privacy.dp_accountant,
                                     mechanism=mechanism)
        bits = dp.DEFAULT_TAIL_BITS
        for _ in range(8):  # more tail bits -> more headroom -> a coarser grid: iterate
            z = privacy.dp_noise if target is None else _raised(
                target, lambda zz, b=bits: accounting(zz, b)[0])
            planned = ledger_for(z, bits)
            if not distributed or releases == 0:
                break
            planned.record(releases)
            need = truncation_tail_bits(planned.epsilon(), releases * n * max(grad_dim, label_dim),
                                        budget)
            if need <= bits:
                break
            bits = need
        else:
            raise ConfigError("dp: the noise's tail bits did not settle; report this run")
        grad, labels = _specs(privacy, labels_l2, z, t, bits)
    except ProtocolError as error:
        hint = ""
        if "fixed-point units" in str(error):  # the library's advice names its own parameter
            hint = (" (z times the clip is too small or too large for the ring's precision; "
                    "change [privacy] dp_noise, dp_clip or dp_label_clip, or set [aggregation] "
                    "ring_bits = 64)")
        raise ConfigError(f"dp: {error}{hint}") from None
    return ClientDP(grad, labels, ledger_for(z, bits), labels_l2)


def _raised(target: float, reached: Callable[[float], float]) -> float:
    """z whose accounting multiplier reached(z) covers target (rounding and integer noise cost
    a little, so z is raised until it does)."""
    z = target
    for _ in range(5):
        got = reached(z)
        if got >= target:
            break
        z *= target / got * (1 + 1e-9)
    return z


TRUST = {
    "central": "the server sees each round's un-noised sums before adding noise (trusted "
               "aggregator); the DP guarantee protects against everyone who sees only releases",
    "distributed": "clients add integer noise before masking: no single party sees an "
                   "un-noised sum, provided fewer than the SecAgg threshold collude with the "
                   "server (Paillier: the key holder enforces the quorum and does not collude)",
}


def privacy_report(privacy: PrivacyConfig, aggregator: str, fed: CoDreamFederation,
                   client_dp: ClientDP | None) -> dict:
    """report.json's privacy section: enough for an auditor to recompute epsilon with Opacus."""
    per_round = [r.epsilon for r in fed.rounds]
    if privacy.dp == "off":
        return {"enabled": False, "unit": None, "epsilon": None, "per_round_epsilon": per_round,
                "note": "no differential privacy: secure aggregation hides individual vectors "
                        "from the server but every released sum is exact"}
    if client_dp is not None:
        ledger = client_dp.ledger
        grad, labels = fed.grad_channel, fed.label_channel
        return {"enabled": True, **ledger.to_report(), "per_round_epsilon": per_round,
                "label_l2_clip": client_dp.label_clip,
                "min_contributors": client_dp.grad.min_contributors,
                "noise_tail_bits": client_dp.grad.tail_bits if privacy.dp_mode == "distributed"
                else None,
                "released": {"dream_gradient_sums": grad.stats.steps,
                             "soft_label_sums": labels.stats.steps},
                "clipped_vectors": {"dream_gradient": grad.dp_clipped,
                                    "soft_label": labels.dp_clipped},
                "aggregator": aggregator, "trust": TRUST[privacy.dp_mode],
                "baselines": "run without DP"}
    trainers = fed.trainers or []
    return {"enabled": True, "unit": "sample", "mechanism": "dp-sgd", "mode": "local",
            "epsilon": max(t.epsilon() for t in trainers), "delta": privacy.dp_delta,
            "accountant_delta": privacy.dp_delta, "truncation_delta": 0.0,
            "delta_total": privacy.dp_delta,  # DP-SGD's Gaussian noise is not truncated
            "per_round_epsilon": per_round,
            "clients": [t.ledger.to_report() for t in trainers],
            "dream_loss": "BatchNorm-statistics term dropped: models use GroupNorm "
                          "(opacus ModuleValidator.fix)",
            "post_processing": "dream gradients and soft labels come from DP-trained models "
                               "and cost no further privacy; distillation uses no private data",
            "baselines": "run without DP"}
