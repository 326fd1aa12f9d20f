"""simulate with differential privacy: the privacy section, calibration, sample level, resume."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from opacus.accountants import create_accountant

from codream_secure.cli import main
from codream_secure.config import SimulationConfig
from codream_secure.errors import ConfigError
from codream_secure.simulation import run_simulation
from tests.core.tiny_runs import TINY as TINY_RUN
from tests.core.tiny_runs import killed_then_resumed

TINY = {**TINY_RUN, "clients": 4, "baselines": ()}



def _run(tmp_path, name, **overrides):
    config = SimulationConfig.from_keys(**{**TINY, **overrides, "out": str(tmp_path / name)})
    return run_simulation(config)


def _recomputed(privacy: dict) -> float:
    """What an auditor gets from the report alone, with Opacus."""
    acct = create_accountant(privacy["accountant"])
    acct.history = [tuple(h) for h in privacy["accountant_state"]["history"]]
    kwargs = {"alphas": privacy["rdp_orders"]} if privacy["rdp_orders"] else {}
    return acct.get_epsilon(delta=privacy["delta"], **kwargs)


def test_client_level_distributed_dp_counts_every_release(tmp_path):
    report = _run(tmp_path, "client", dp="client", dp_noise=3.0).report
    privacy = report["privacy"]
    assert privacy["enabled"] and privacy["unit"] == "client" and privacy["mode"] == "distributed"
    assert privacy["releases"] == 2 * 3 + 2  # every dream step and every soft-label sum
    assert privacy["released"] == {"dream_gradient_sums": 6, "soft_label_sums": 2}
    assert privacy["min_contributors"] == 3  # secagg, 4 clients, t = 2: a sum holds >= 3
    assert privacy["epsilon"] == pytest.approx(_recomputed(privacy))
    per_round = privacy["per_round_epsilon"]
    assert per_round[0] == 0.0 and per_round[1] < per_round[2] == privacy["epsilon"]
    assert report["aggregator"]["measured"]["max_abs_error_vs_plain"] is None
    json.dumps(report)


def test_target_epsilon_is_met_by_the_calibrated_noise(tmp_path):
    report = _run(tmp_path, "eps", dp="client", dp_mode="central", dp_epsilon=20.0,
                  aggregator="secagg+").report
    privacy = report["privacy"]
    assert privacy["mechanism"] == "gaussian" and privacy["mode"] == "central"
    assert 19.0 < privacy["epsilon"] <= 20.0
    assert privacy["nominal_noise_multiplier"] >= privacy["noise_multiplier"]


def test_sample_level_dp_trains_groupnorm_models_and_reports_each_client(tmp_path):
    report = _run(tmp_path, "sample", dp="sample", dp_noise=1.0, dp_clip=1.0, rounds=1).report
    privacy = report["privacy"]
    assert privacy["unit"] == "sample" and len(privacy["clients"]) == 4
    assert "BatchNorm" in privacy["dream_loss"]
    assert privacy["epsilon"] == max(c["epsilon"] for c in privacy["clients"]) > 0
    assert all(c["releases"] > 0 for c in privacy["clients"])


def test_dp_off_still_writes_a_privacy_section(tmp_path):
    privacy = _run(tmp_path, "off", rounds=1).report["privacy"]
    assert privacy["enabled"] is False and privacy["epsilon"] is None


def test_resumed_dp_run_spends_the_same_epsilon(tmp_path, monkeypatch):
    whole = _run(tmp_path, "whole", dp="client", dp_noise=3.0).report["privacy"]
    config = SimulationConfig.from_keys(**{**TINY, "dp": "client", "dp_noise": 3.0,
                                 "out": str(tmp_path / "killed")})
    resumed = killed_then_resumed(monkeypatch, config)["privacy"]
    assert resumed["releases"] == whole["releases"]
    assert resumed["epsilon"] == pytest.approx(whole["epsilon"])


def test_a_resumed_dp_sgd_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    # each client's DP-SGD generator (batches, noise) runs across rounds: the checkpoint keeps it
    dp = {"dp": "sample", "dp_noise": 1.0}
    whole = _run(tmp_path, "whole-sgd", **dp).report
    config = SimulationConfig.from_keys(**{**TINY, **dp, "out": str(tmp_path / "killed-sgd")})
    resumed = killed_then_resumed(monkeypatch, config)
    assert resumed["final"] == whole["final"]
    assert [r["codream"] for r in resumed["rounds"]] == [r["codream"] for r in whole["rounds"]]
    assert resumed["privacy"]["epsilon"] == pytest.approx(whole["privacy"]["epsilon"])


@pytest.mark.parametrize(("overrides", "message"), [
    ({"dp_noise": 2.0}, "dp is 'off'"),
    ({"dp": "client"}, "exactly one of dp_noise"),
    ({"dp": "client", "dp_noise": 2.0, "dp_epsilon": 1.0}, "exactly one of dp_noise"),
    ({"dp": "client", "dp_noise": -1.0}, "dp_noise"),
    ({"dp": "client", "dp_noise": 1.0, "dp_delta": 1.5}, "dp_delta"),
    ({"dp": "client", "dp_noise": 1.0, "dp_accountant": "prv"}, "RDP only"),
])
def test_bad_dp_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        SimulationConfig.from_keys(**overrides)


def test_a_budget_too_small_for_the_run_is_exit_status_2(tmp_path):
    result = CliRunner().invoke(main, ["simulate", "--dp", "client", "--dp-epsilon", "1e-6",
                                       "--out", str(tmp_path / "tiny-eps"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "too small" in result.output and "Traceback" not in result.output


def test_noise_too_small_for_the_ring_names_the_keys_to_change(tmp_path):
    result = CliRunner().invoke(main, ["simulate", "--dp", "client", "--dp-noise", "1e-7",
                                       "--out", str(tmp_path / "z"), "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "fixed-point units" in result.output and "ring_bits = 64" in result.output
