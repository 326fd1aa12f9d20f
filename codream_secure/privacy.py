"""Privacy accounting with Opacus' accountants: a ledger of released aggregates and calibration.

Client-level DP: every client takes part in every release, so each release is one Gaussian
mechanism with sample rate q = 1. Every released aggregate counts: each dream-optimisation step's
gradient sum and each round's soft-label sum. Truncated (distributed) noise spends part of delta:
the stated delta = the accountant's delta + the truncation's budget. See docs/privacy.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import opacus
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from codream_secure.errors import ConfigError, DeltaBudgetError
from protocols.dp import mechanisms as dp

__all__ = [
    "ACCOUNTANTS",
    "INTEGER_ORDERS",
    "TRUNCATION_DELTA_SHARE",
    "PrivacyLedger",
    "calibrate_noise",
    "client_ledger",
    "nominal_noise_multiplier",
    "releases_per_run",
    "truncation_delta",
    "truncation_tail_bits",
]

ACCOUNTANTS = ("rdp", "prv", "gdp")
# The Skellam RDP bound (Agarwal et al. 2021) is proved for integer orders only.
INTEGER_ORDERS = tuple(range(2, 257))
_CONTINUOUS = ("gaussian", "dp-sgd")  # mechanisms whose privacy loss is exactly Gaussian
MAX_NOISE_MULTIPLIER = 1e3
# Share of the stated delta reserved for truncated noise; the accountant is planned with the rest.
TRUNCATION_DELTA_SHARE = 0.1


def truncation_delta(epsilon: float, tv: float) -> float:
    """Delta that noise within total variation tv of an (epsilon, .)-DP mechanism adds:
    P[M'(D) in S] <= P[M(D) in S] + tv <= e^eps (P[M'(D') in S] + tv) + delta + tv."""
    if tv == 0.0:
        return 0.0
    log = max(epsilon, 0.0) + math.log1p(math.exp(-abs(epsilon))) + math.log(tv)
    return math.exp(log) if log < 700.0 else math.inf  # never capped below the true value


def truncation_tail_bits(epsilon: float, draws: int, budget: float, *,
                         minimum: int = dp.DEFAULT_TAIL_BITS) -> int:
    """Fewest tail bits (>= minimum) with truncation_delta(epsilon, draws 2^-bits) <= budget.

    Raises DeltaBudgetError when even dp.MAX_TAIL_BITS cannot keep it within the budget.
    """
    _positive("truncation delta budget", budget)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ConfigError(f"draws must be a positive int, got {draws!r}")
    # log2 of (1 + e^eps) * draws / budget, computed in logs so that large epsilon cannot overflow
    log2_need = (epsilon + math.log1p(math.exp(-epsilon))) / math.log(2.0) + math.log2(
        draws) - math.log2(budget)
    bits = max(minimum, math.ceil(log2_need))
    if bits > dp.MAX_TAIL_BITS:
        raise DeltaBudgetError(
            f"epsilon={epsilon:.4g} over {draws:,} truncated noise draws needs each draw's tail "
            f"below 2^-{bits}, past the samplers' limit of 2^-{dp.MAX_TAIL_BITS}: the "
            f"truncation would add (1 + e^epsilon) * TV > {budget:.3g} to delta, so the total "
            f"delta could not stay within the stated one. Lower epsilon (raise the noise), "
            f"release fewer aggregates, or set [privacy] dp_mode = \"central\" (no truncation)")
    return bits


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_delta(delta: float, n_samples: int) -> float:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ConfigError(f"n_samples must be a positive int, got {n_samples!r}")
    delta = _positive("delta", delta)
    if delta >= 1.0 / n_samples:
        raise ConfigError(f"delta must be < 1/n_samples = {1.0 / n_samples:.3g} (n_samples="
                          f"{n_samples}: one person's data may otherwise leak outright), "
                          f"got {delta!r}")
    return delta


def _check_accountant(accountant: str, mechanism: str, sample_rate: float) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if accountant != "rdp" and mechanism not in _CONTINUOUS:
        raise ConfigError(f"the {accountant!r} accountant models a continuous Gaussian privacy "
                          f"loss; {mechanism!r} noise is only proven through RDP: use 'rdp'")
    if accountant == "gdp" and sample_rate < 1.0:
        raise ConfigError("the 'gdp' accountant's central-limit estimate can underestimate "
                          "epsilon for subsampled mechanisms (sample_rate < 1): use 'rdp' or "
                          "'prv'")


def _new_accountant(name: str):
    with warnings.catch_warnings():
        # GDP warns on construction; we refuse it where the warning applies (q < 1).
        warnings.simplefilter("ignore", UserWarning)
        return create_accountant(mechanism=name)


def releases_per_run(rounds: int, dream_steps: int) -> int:
    """Released aggregates in a run: rounds*dream_steps gradient sums + rounds soft-label sums."""
    for name, value in (("rounds", rounds), ("dream_steps", dream_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an int >= 0, got {value!r}")
    return rounds * dream_steps + rounds


class PrivacyLedger:
    """Counts released aggregates for one (z, q) Gaussian mechanism and reports (epsilon, delta).

    `noise_multiplier` is what the accountant is told (for integer noise: the accounting
    multiplier of protocols.dp.accounting_noise_multiplier); `nominal_noise_multiplier` is
    the configured one. `delta` is the stated total; the accountant works at delta minus
    `truncation_delta_budget`. `truncation_tv_per_release` bounds the total variation that
    conditioning the noise on its ring bound costs per release; it costs truncation_delta(eps, TV).
    """

    def __init__(self, *, unit: str, mechanism: str, mode: str, noise_multiplier: float,
                 l2_clip: float, delta: float, n_samples: int, sample_rate: float = 1.0,
                 accountant: str = "rdp", nominal_noise_multiplier: float | None = None,
                 truncation_tv_per_release: float = 0.0, truncation_delta_budget: float = 0.0,
                 orders: tuple[float, ...] | None = None) -> None:
        if unit not in ("client", "sample"):
            raise ConfigError(f"unit must be 'client' or 'sample', got {unit!r}")
        self.unit, self.mechanism, self.mode = unit, mechanism, mode
        self.noise_multiplier = _positive("noise multiplier", noise_multiplier)
        self.nominal_noise_multiplier = (self.noise_multiplier if nominal_noise_multiplier is None
                                         else _positive("nominal noise multiplier",
                                                        nominal_noise_multiplier))
        self.l2_clip = _positive("l2 clip", l2_clip)
        self.sample_rate = _positive("sample rate", sample_rate)
        if self.sample_rate > 1.0:
            raise ConfigError(f"sample rate must be <= 1, got {sample_rate!r}")
        self.n_samples = n_samples
        self.delta = _check_delta(delta, n_samples)
        _check_accountant(accountant, mechanism, self.sample_rate)
        self.accountant_name = accountant
        self.accountant = _new_accountant(accountant)
        if truncation_tv_per_release < 0 or not math.isfinite(truncation_tv_per_release):
            raise ConfigError("truncation_tv_per_release must be a finite number >= 0")
        self.truncation_tv_per_release = float(truncation_tv_per_release)
        if not 0.0 <= truncation_delta_budget < self.delta:
            raise ConfigError(f"truncation_delta_budget must be in [0, delta={self.delta:g}), "
                              f"got {truncation_delta_budget!r}")
        self.truncation_delta_budget = float(truncation_delta_budget)
        self.orders = None if orders is None else tuple(orders)

    @property
    def accountant_delta(self) -> float:
        """The delta epsilon is computed at: the stated delta less the truncation's budget."""
        return self.delta - self.truncation_delta_budget

    @property
    def releases(self) -> int:
        """Mechanism invocations recorded so far (Opacus' own history, so shared use counts)."""
        return sum(int(steps) for _, _, steps in self.accountant.history)

    def record(self, releases: int = 1) -> None:
        """Count `releases` more released aggregates (in O(1), as Opacus' step() would merge)."""
        if isinstance(releases, bool) or not isinstance(releases, int) or releases < 0:
            raise ConfigError(f"releases must be an int >= 0, got {releases!r}")
        if releases == 0:
            return
        z, q, history = self.noise_multiplier, self.sample_rate, self.accountant.history
        if history and history[-1][0] == z and history[-1][1] == q:
            history[-1] = (z, q, history[-1][2] + releases)
        else:
            history.append((z, q, releases))

    def epsilon(self) -> float:
        """Epsilon at the accountant's delta after every recorded release (0 before any)."""
        if not self.accountant.history:
            return 0.0
        kwargs = {} if self.orders is None else {"alphas": list(self.orders)}
        # PRV evaluates log(1 - q) = -inf at q = 1: harmless. RDP warns when the best order is
        # an end of the range: the epsilon is then an upper bound; the report records it.
        with np.errstate(divide="ignore"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epsilon = float(self.accountant.get_epsilon(delta=self.accountant_delta, **kwargs))
        self.order_at_range_end = any("Optimal order" in str(w.message) for w in caught)
        for w in caught:
            if "Optimal order" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return epsilon

    def truncation_tv(self) -> float:
        """Total variation between the truncated and the untruncated noise over all releases."""
        return self.releases * self.truncation_tv_per_release

    def to_report(self) -> dict[str, Any]:
        """Everything an auditor needs to recompute epsilon with Opacus (JSON-ready)."""
        eps = self.epsilon()
        tv = self.truncation_tv()
        trunc = truncation_delta(eps, tv)
        state = self.accountant.state_dict()
        return {
            "unit": self.unit,
            "mechanism": self.mechanism,
            "mode": self.mode,
            "l2_clip": self.l2_clip,
            "noise_multiplier": self.noise_multiplier,
            "nominal_noise_multiplier": self.nominal_noise_multiplier,
            "sample_rate": self.sample_rate,
            "releases": self.releases,
            "epsilon": eps,
            "delta": self.delta,
            "accountant_delta": self.accountant_delta,
            "truncation_tv": tv,
            "truncation_delta": trunc,
            "delta_total": self.accountant_delta + trunc,
            "delta_within_stated": self.accountant_delta + trunc <= self.delta,
            "n_samples": self.n_samples,
            "accountant": self.accountant_name,
            "accountant_state": {
                "mechanism": state["mechanism"],
                "history": [[float(z), float(q), int(s)] for z, q, s in state["history"]],
            },
            "rdp_orders": None if self.orders is None else list(self.orders),
            "rdp_order_at_range_end": getattr(self, "order_at_range_end", False),
            "opacus_version": opacus.__version__,
        }

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> PrivacyLedger:
        """Rebuild a ledger (e.g. on resume) from to_report()'s dict."""
        ledger = cls(unit=report["unit"], mechanism=report["mechanism"], mode=report["mode"],
                     noise_multiplier=report["noise_multiplier"], l2_clip=report["l2_clip"],
                     delta=report["delta"], n_samples=report["n_samples"],
                     sample_rate=report["sample_rate"], accountant=report["accountant"],
                     nominal_noise_multiplier=report["nominal_noise_multiplier"],
                     truncation_tv_per_release=(report["truncation_tv"] / report["releases"]
                                                if report["releases"] else 0.0),
                     truncation_delta_budget=report["delta"] - report.get(
                         "accountant_delta", report["delta"]),
                     orders=report["rdp_orders"])
        ledger.accountant.load_state_dict({
            "mechanism": report["accountant_state"]["mechanism"],
            "history": [(z, q, int(s)) for z, q, s in report["accountant_state"]["history"]],
        })
        return ledger


@contextmanager
def _trial_order_warnings_ignored() -> Iterator[None]:
    """Silence Opacus' "Optimal order" warning for a calibration's trial multipliers."""
    # Only the ledger's final epsilon matters to a reader, and the ledger records the same
    # condition as rdp_order_at_range_end; a calibration warns once per trial, and its advice
    # (widen the orders) is no flag of ours.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        yield


def _epsilon_at(z: float, releases: int, delta: float, accountant: str, q: float,
                orders: tuple[float, ...] | None) -> float:
    acct = _new_accountant(accountant)
    acct.history = [(z, q, releases)]
    kwargs = {} if orders is None else {"alphas": list(orders)}
    with _trial_order_warnings_ignored():
        return float(acct.get_epsilon(delta=delta, **kwargs))


def calibrate_noise(target_epsilon: float, target_delta: float, releases: int, *,
                    n_samples: int, accountant: str = "rdp", sample_rate: float = 1.0,
                    mechanism: str = "gaussian", max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
                    orders: tuple[float, ...] | None = None) -> float:
    """Smallest noise multiplier (Opacus' get_noise_multiplier, to 0.01 in epsilon) whose
    epsilon after `releases` releases is <= target_epsilon at target_delta."""
    eps = _positive("target epsilon", target_epsilon)
    delta = _check_delta(target_delta, n_samples)
    if isinstance(releases, bool) or not isinstance(releases, int) or releases < 1:
        raise ConfigError(f"releases must be a positive int, got {releases!r}")
    _check_accountant(accountant, mechanism, sample_rate)
    if orders is None and mechanism == "skellam":
        orders = INTEGER_ORDERS
    kwargs = {} if orders is None else {"alphas": list(orders)}
    try:
        with _trial_order_warnings_ignored():
            z = get_noise_multiplier(target_epsilon=eps, target_delta=delta,
                                     sample_rate=sample_rate, steps=releases,
                                     accountant=accountant, **kwargs)
    except ValueError:  # Opacus gives up beyond sigma = 1e6
        z = math.inf
    if z > max_noise_multiplier:
        at_max = _epsilon_at(max_noise_multiplier, releases, delta, accountant, sample_rate,
                             orders)
        lo, hi = 0, releases  # releases that fit at the largest allowed multiplier
        while lo < hi:
            mid = (lo + hi + 1) // 2
            ok = _epsilon_at(max_noise_multiplier, mid, delta, accountant, sample_rate,
                             orders) <= eps
            lo, hi = (mid, hi) if ok else (lo, mid - 1)
        raise ConfigError(
            f"epsilon={eps:g} at delta={delta:g} is too small for {releases} releases: it needs "
            f"a noise multiplier above {max_noise_multiplier:g} (got {z:.4g}); at that "
            f"multiplier the run costs epsilon={at_max:.4g}, and only {lo} releases fit the "
            f"budget. Raise epsilon, or release fewer aggregates (fewer rounds or dream steps)")
    return float(z)


def nominal_noise_multiplier(spec: dp.DPSpec, accounting_target: float, *, dim: int,
                             scale_bits: int | None) -> float:
    """Configured z whose accounting multiplier (rounding, integer noise) reaches the target."""
    _positive("accounting target", accounting_target)

    def acc(z: float) -> float:
        trial = dp.DPSpec(mode=spec.mode, noise_multiplier=z, l2_clip=spec.l2_clip,
                          noise=spec.noise, min_contributors=spec.min_contributors,
                          tail_bits=spec.tail_bits)
        return dp.accounting_noise_multiplier(trial, dim=dim, scale_bits=scale_bits)

    lo, hi = accounting_target, accounting_target * 2
    while acc(hi) < accounting_target:
        lo, hi = hi, hi * 2
        if hi > 1e12:
            raise ConfigError("no noise multiplier reaches the target at this scale_bits: "
                              "the rounding term dominates; use more scale_bits")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if acc(mid) >= accounting_target else (mid, hi)
    return hi


def client_ledger(spec: dp.DPSpec, *, dim: int, scale_bits: int | None, n_clients: int,
                  delta: float, accountant: str = "rdp",
                  noise: dp.DistributedNoise | None = None) -> PrivacyLedger:
    """A client-level ledger for `spec` over releases of at most `dim` coordinates.

    With distributed noise, pass the clients' DistributedNoise so the truncation's total
    variation (n_clients * dim draws per release) is carried into delta_total; the accountant
    then works at (1 - TRUNCATION_DELTA_SHARE) * delta.
    """
    z_acc = dp.accounting_noise_multiplier(spec, dim=dim, scale_bits=scale_bits)
    tv = 0.0
    if spec.mode == "distributed":
        if noise is None or scale_bits is None:
            raise ConfigError("a distributed-noise ledger needs the DistributedNoise and "
                              "scale_bits, to bound the truncation's cost")
        tv = n_clients * dim * noise.tail_probability(scale_bits)
    return PrivacyLedger(
        unit="client", mechanism=spec.noise or "gaussian", mode=spec.mode,
        noise_multiplier=z_acc, nominal_noise_multiplier=spec.noise_multiplier,
        l2_clip=spec.l2_clip, delta=delta, n_samples=n_clients, sample_rate=1.0,
        accountant=accountant, truncation_tv_per_release=tv,
        truncation_delta_budget=TRUNCATION_DELTA_SHARE * delta if spec.mode == "distributed"
        else 0.0, orders=INTEGER_ORDERS if spec.noise == "skellam" else None)
