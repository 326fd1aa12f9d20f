"""Accounting: Opacus' own reference values, the client-level table, the ledger and refusals."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from opacus.accountants.analysis.gdp import eps_from_mu

from codream_secure import privacy
from codream_secure.errors import ConfigError
from protocols.dp import mechanisms as dp


def sample_ledger(accountant: str) -> privacy.PrivacyLedger:
    return privacy.PrivacyLedger(unit="sample", mechanism="dp-sgd", mode="local",
                                 noise_multiplier=1.5, l2_clip=1.0, sample_rate=0.04,
                                 delta=1e-5, n_samples=60_000, accountant=accountant)


# ---- Opacus' reference values (opacus/tests/accountants_test.py, shared/reference.md) -----------


def test_rdp_reference_value():
    ledger = sample_ledger("rdp")
    ledger.record(int(90 / 0.04))  # 2250 steps, as Opacus' test counts them
    assert ledger.releases == 2250
    assert ledger.epsilon() == pytest.approx(7.32911117143, abs=5e-8)


def test_prv_reference_value():
    ledger = sample_ledger("prv")
    ledger.record(int(90 // 0.04))  # 2249 steps: Opacus' PRV test uses floor division
    assert ledger.epsilon() == pytest.approx(6.777395712150674, abs=5e-8)


@pytest.mark.parametrize(("accountant", "expected"), [
    ("rdp", 1.416), pytest.param("prv", 1.34765625, marks=pytest.mark.slow)])  # PRV: ~8 s
def test_noise_multiplier_reference_values(accountant, expected):
    # Opacus' test passes epochs=90, which get_noise_multiplier turns into int(90 / 0.04) steps.
    z = privacy.calibrate_noise(8.0, 1e-5, int(90 / 0.04), n_samples=60_000,
                                accountant=accountant, sample_rate=0.04, mechanism="dp-sgd")
    assert z == pytest.approx(expected, abs=5e-5)


# ---- client level: q = 1 ------------------------------------------------------------------------


@pytest.mark.parametrize(("z", "releases", "printed"), [
    (5.0, 10, "2.8"), (5.0, 100, "10.7"), (5.0, 1000, "48.8"),
    (20.0, 10, "0.62"), (20.0, 100, "2.17"), (20.0, 1000, "8.08"),
])
def test_client_level_table(z, releases, printed):
    ledger = privacy.PrivacyLedger(unit="client", mechanism="gaussian", mode="central",
                                   noise_multiplier=z, l2_clip=1.0, delta=1e-5, n_samples=10)
    ledger.record(releases)
    decimals = len(printed.split(".")[1])
    assert round(ledger.epsilon(), decimals) == float(printed)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_accountants_at_q1_bound_the_exact_gaussian_composition(accountant):
    # At q = 1, T releases of noise multiplier z are exactly mu-GDP with mu = sqrt(T)/z (Dong,
    # Roth, Su), whose (eps, delta) curve is the tight answer. Every accountant must be an upper
    # bound; PRV is within its eps_error 0.01 of it.
    for z, releases in ((5.0, 100), (20.0, 1000), (1.0, 10)):
        ledger = privacy.PrivacyLedger(unit="client", mechanism="gaussian", mode="central",
                                       noise_multiplier=z, l2_clip=1.0, delta=1e-5,
                                       n_samples=10, accountant=accountant)
        ledger.record(releases)
        exact = eps_from_mu(mu=math.sqrt(releases) / z, delta=1e-5)
        assert ledger.epsilon() >= exact - 1e-9
        if accountant == "prv":
            assert ledger.epsilon() <= exact + 0.02


# ---- ledger -------------------------------------------------------------------------------------


def test_ledger_counts_releases_and_round_trips_through_json():
    ledger = privacy.PrivacyLedger(unit="client", mechanism="gaussian", mode="central",
                                   noise_multiplier=3.0, l2_clip=0.5, delta=1e-5, n_samples=4)
    assert ledger.epsilon() == 0.0 and ledger.releases == 0
    for _ in range(3):
        ledger.record()
    ledger.record(5)
    ledger.record(0)
    assert ledger.releases == 8
    assert ledger.accountant.history == [(3.0, 1.0, 8)]
    report = json.loads(json.dumps(ledger.to_report()))
    assert report == ledger.to_report()
    assert report["releases"] == 8 and report["accountant_state"]["history"] == [[3.0, 1.0, 8]]
    assert report["epsilon"] == ledger.epsilon() > 0
    assert report["opacus_version"]
    restored = privacy.PrivacyLedger.from_report(report)
    assert restored.epsilon() == ledger.epsilon()
    restored.record(2)
    assert restored.releases == 10 and restored.epsilon() > ledger.epsilon()
    # an auditor's recomputation from the report alone
    from opacus.accountants import create_accountant

    acct = create_accountant(report["accountant"])
    acct.history = [tuple(h) for h in report["accountant_state"]["history"]]
    assert acct.get_epsilon(delta=report["delta"]) == report["epsilon"]


def test_calibrated_noise_meets_the_budget():
    releases = privacy.releases_per_run(rounds=20, dream_steps=50)
    assert releases == 20 * 50 + 20
    z = privacy.calibrate_noise(8.0, 1e-5, releases, n_samples=4)
    ledger = privacy.PrivacyLedger(unit="client", mechanism="gaussian", mode="central",
                                   noise_multiplier=z, l2_clip=1.0, delta=1e-5, n_samples=4)
    ledger.record(releases)
    assert 8.0 - 0.02 <= ledger.epsilon() <= 8.0


def test_client_ledger_for_distributed_noise():
    spec = dp.DPSpec(mode="distributed", noise_multiplier=20.0, l2_clip=1.0, noise="skellam",
                     min_contributors=3)
    noise = dp.DistributedNoise(spec)
    ledger = privacy.client_ledger(spec, dim=4096, scale_bits=16, n_clients=4, delta=1e-5,
                                   noise=noise)
    assert ledger.orders == privacy.INTEGER_ORDERS
    assert ledger.noise_multiplier < 20.0 == ledger.nominal_noise_multiplier
    ledger.record(1000)
    report = ledger.to_report()
    assert 8.0 < report["epsilon"] < 8.2  # the q=1 table's 8.08, integer orders, z just below 20
    assert 0 < report["truncation_tv"] < 1e-20
    # a tenth of delta is set aside for the truncation, which here costs almost nothing of it
    assert report["accountant_delta"] == pytest.approx(0.9e-5, rel=1e-12)
    assert report["delta_total"] == pytest.approx(0.9e-5, rel=1e-9)
    assert report["delta_within_stated"] and report["delta"] == 1e-5
    with pytest.raises(ConfigError, match="rdp"):
        privacy.client_ledger(spec, dim=4096, scale_bits=16, n_clients=4, delta=1e-5,
                              noise=noise, accountant="prv")
    with pytest.raises(ConfigError, match="DistributedNoise"):
        privacy.client_ledger(spec, dim=4096, scale_bits=16, n_clients=4, delta=1e-5)


def test_nominal_noise_multiplier_reaches_the_accounting_target():
    spec = dp.DPSpec(mode="distributed", noise_multiplier=1.0, l2_clip=1.0,
                     noise="discrete_gaussian", min_contributors=2)
    z = privacy.nominal_noise_multiplier(spec, 4.0, dim=4096, scale_bits=12)
    trial = dp.DPSpec(mode="distributed", noise_multiplier=z, l2_clip=1.0,
                      noise="discrete_gaussian", min_contributors=2)
    achieved = dp.accounting_noise_multiplier(trial, dim=4096, scale_bits=12)
    assert 4.0 <= achieved <= 4.0 * (1 + 1e-9)
    assert z > 4.0


# ---- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(target_epsilon=0.0), "epsilon"),
    (dict(target_epsilon=-1.0), "epsilon"),
    (dict(target_delta=0.0), "delta"),
    (dict(target_delta=0.25), "1/n_samples"),
    (dict(releases=0), "releases"),
    (dict(accountant="moments"), "accountant"),
    (dict(accountant="gdp", sample_rate=0.1), "gdp"),
    (dict(accountant="prv", mechanism="discrete_gaussian"), "rdp"),
])
def test_calibration_refusals(kwargs, match):
    args = {**dict(target_epsilon=1.0, target_delta=1e-5, releases=10, n_samples=4), **kwargs}
    with pytest.raises(ConfigError, match=match):
        privacy.calibrate_noise(args.pop("target_epsilon"), args.pop("target_delta"),
                                args.pop("releases"), **args)


def test_budget_too_small_says_what_fits():
    with pytest.raises(ConfigError, match=r"only \d+ releases fit") as err:
        privacy.calibrate_noise(0.05, 1e-5, 100_000, n_samples=4)
    fit = int(str(err.value).split("only ")[1].split(" ")[0])
    ledger = privacy.PrivacyLedger(unit="client", mechanism="gaussian", mode="central",
                                   noise_multiplier=privacy.MAX_NOISE_MULTIPLIER, l2_clip=1.0,
                                   delta=1e-5, n_samples=4)
    ledger.record(fit)
    assert ledger.epsilon() <= 0.05
    ledger.record(1)
    assert ledger.epsilon() > 0.05


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(noise_multiplier=0.0), "noise multiplier"),
    (dict(l2_clip=-1.0), "l2 clip"),
    (dict(delta=1.0), "delta"),
    (dict(delta=0.3, n_samples=4), "1/n_samples"),
    (dict(unit="user"), "unit"),
    (dict(sample_rate=1.5), "sample rate"),
])
def test_ledger_refusals(kwargs, match):
    args = dict(unit="client", mechanism="gaussian", mode="central", noise_multiplier=1.0,
                l2_clip=1.0, delta=1e-5, n_samples=4)
    with pytest.raises(ConfigError, match=match):
        privacy.PrivacyLedger(**{**args, **kwargs})
    with pytest.raises(ConfigError):
        privacy.releases_per_run(-1, 10)


def order_warnings(call) -> list[str]:
    """The "Optimal order" warnings that call() raises, each counted (none hidden as repeats)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "Optimal order" in str(w.message)]


def test_calibration_trials_do_not_print_opacus_order_warnings():
    from opacus.accountants.utils import get_noise_multiplier

    # dp_table's client-level row at epsilon 64: Opacus' own calibration warns on its trials
    assert order_warnings(lambda: get_noise_multiplier(
        target_epsilon=64.0, target_delta=1e-5, sample_rate=1.0, steps=205, accountant="rdp",
        alphas=list(privacy.INTEGER_ORDERS))), "no longer a trigger"
    found = []
    assert not order_warnings(lambda: found.append(
        privacy.calibrate_noise(64.0, 1e-5, 205, n_samples=4, mechanism="skellam")))
    # the budget still holds, and the ledger records what the warning said
    ledger = privacy.PrivacyLedger(unit="client", mechanism="skellam", mode="distributed",
                                   noise_multiplier=found[0], l2_clip=1.0, delta=1e-5,
                                   n_samples=4, orders=privacy.INTEGER_ORDERS)
    ledger.record(205)
    report = ledger.to_report()
    assert report["epsilon"] <= 64.0 and report["rdp_order_at_range_end"] is True


def test_an_rdp_optimum_at_the_smallest_order_is_recorded_not_printed(recwarn):
    from codream_secure.privacy import INTEGER_ORDERS, PrivacyLedger

    ledger = PrivacyLedger(unit="client", mechanism="skellam", mode="distributed",
                           noise_multiplier=0.5, l2_clip=1.0, delta=1e-5, n_samples=4,
                           orders=INTEGER_ORDERS)
    ledger.record(200)
    report = ledger.to_report()
    assert report["rdp_order_at_range_end"] is True
    assert not [w for w in recwarn if "Optimal order" in str(w.message)]
    ledger = PrivacyLedger(unit="client", mechanism="gaussian", mode="central",
                           noise_multiplier=20.0, l2_clip=1.0, delta=1e-5, n_samples=4)
    ledger.record(100)
    assert ledger.to_report()["rdp_order_at_range_end"] is False


def test_the_report_says_when_epsilon_is_an_upper_bound():
    from codream_secure.report_privacy import privacy_section

    def ledger_report(mechanism: str, z: float, orders) -> dict:
        ledger = privacy.PrivacyLedger(unit="client", mechanism=mechanism, mode="distributed",
                                       noise_multiplier=z, l2_clip=1.0, delta=1e-5,
                                       n_samples=4, orders=orders)
        ledger.record(200)
        return {**ledger.to_report(), "enabled": True}

    at_end = ledger_report("skellam", 0.5, privacy.INTEGER_ORDERS)
    inside = ledger_report("gaussian", 20.0, None)
    assert at_end["rdp_order_at_range_end"] and not inside["rdp_order_at_range_end"]
    assert "- epsilon is an upper bound: the best RDP order" in "\n".join(privacy_section(at_end))
    assert "upper bound" not in "\n".join(privacy_section(inside))
    clients = privacy_section({"enabled": True, "unit": "sample", "clients": [at_end, inside]})
    client_lines = [line for line in clients if line.startswith("- client ")]
    assert len(client_lines) == 2
    assert "; an upper bound: the best RDP order" in client_lines[0]
    assert "upper bound" not in client_lines[1]


# ---- total delta: accountant + truncation within the stated delta -----------------------------

DIGITS_DIMS = {"grad_dim": 64 * 64, "label_dim": 64 * 10}


def _plan(**keys):
    """plan_client_dp for a config of these keys, as run_simulation calls it."""
    from codream_secure.config import SimulationConfig
    from codream_secure.dp_plan import plan_client_dp

    config = SimulationConfig.from_keys(**keys)
    codream = config.codream
    return config, plan_client_dp(config.privacy, config.aggregation_plan(),
                                  n_clients=config.data.clients, rounds=codream.rounds,
                                  dream_steps=codream.dream_steps,
                                  dream_batch=codream.dream_batch, **DIGITS_DIMS)


@pytest.mark.filterwarnings("ignore:Optimal order")  # Opacus on the direct recount: a bound
@pytest.mark.parametrize(("z", "rounds", "dream_steps", "clients"), [
    (5.0, 2, 5, 10), (2.0, 3, 10, 3), (0.8, 2, 20, 5), (1.95, 5, 40, 4)])
def test_total_delta_stays_within_the_stated_delta(z, rounds, dream_steps, clients):
    from opacus.accountants import create_accountant

    config, plan = _plan(rounds=rounds, dream_steps=dream_steps, clients=clients,
                         dp="client", dp_noise=z, dp_delta=1e-5)
    releases = rounds * dream_steps + rounds
    plan.ledger.record(releases)
    report = plan.ledger.to_report()
    # independently: epsilon straight from Opacus at the accountant's delta, and a truncation
    # TV of at most one 2^-tail_bits tail per draw (n clients x the longer vector per release)
    acct = create_accountant("rdp")
    acct.history = [tuple(h) for h in report["accountant_state"]["history"]]
    eps = acct.get_epsilon(delta=report["accountant_delta"], alphas=report["rdp_orders"])
    assert eps == pytest.approx(report["epsilon"], rel=1e-12)
    tv = releases * clients * max(DIGITS_DIMS.values()) * 2.0 ** -plan.grad.tail_bits
    bound = report["accountant_delta"] + (1 + math.exp(eps)) * tv
    assert report["accountant_delta"] + report["truncation_delta"] == report["delta_total"]
    assert report["delta_total"] <= bound <= config.privacy.dp_delta
    assert report["delta_within_stated"] is True
    assert plan.labels.tail_bits == plan.grad.tail_bits >= dp.DEFAULT_TAIL_BITS


def test_large_epsilon_gets_a_longer_tail_and_the_old_tail_would_exceed_delta():
    _, plan = _plan(rounds=2, dream_steps=20, clients=5, dp="client", dp_noise=0.8)
    plan.ledger.record(42)
    eps = plan.ledger.epsilon()
    assert eps > 50 and plan.grad.tail_bits > dp.DEFAULT_TAIL_BITS
    # control: the default 2^-100 tail over the same draws costs more than all of delta
    old_tv = 42 * 5 * 4096 * 2.0 ** -dp.DEFAULT_TAIL_BITS
    assert privacy.truncation_delta(eps, old_tv) > 1e-5


def test_an_impossible_delta_is_refused_with_the_typed_error():
    from codream_secure.errors import DeltaBudgetError

    with pytest.raises(DeltaBudgetError, match="delta could not stay within"):
        _plan(rounds=5, dream_steps=40, clients=4, dp="client", dp_noise=1.2)
    # central noise is not truncated: the same request is accepted there
    _, central = _plan(rounds=5, dream_steps=40, clients=4, dp="client", dp_noise=1.2,
                       dp_mode="central")
    assert central.ledger.truncation_delta_budget == 0.0


@pytest.mark.parametrize("eps", [0.5, 8.0, 64.0, 100.0])
def test_truncation_tail_bits_is_the_fewest_that_fit(eps):
    draws, budget = 10**7, 1e-6
    bits = privacy.truncation_tail_bits(eps, draws, budget, minimum=20)
    assert privacy.truncation_delta(eps, draws * 2.0**-bits) <= budget
    assert privacy.truncation_delta(eps, draws * 2.0 ** -(bits - 1)) > budget
