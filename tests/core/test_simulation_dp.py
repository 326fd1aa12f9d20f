"""simulate with differential privacy: the privacy section, calibration, sample level, resume."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from opacus.accountants import create_accountant

from codream_secure.checkpoint import CHECKPOINT
from codream_secure.checkpoint_file import read_sealed
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
    return acct.get_epsilon(delta=privacy["accountant_delta"], **kwargs)


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


def test_a_resumed_dp_sgd_run_spends_the_same_epsilon(tmp_path, monkeypatch):
    # DP-SGD noise is never seeded, so weights cannot repeat; the accounting must
    dp = {"dp": "sample", "dp_noise": 1.0}
    whole = _run(tmp_path, "whole-sgd", **dp).report
    config = SimulationConfig.from_keys(**{**TINY, **dp, "out": str(tmp_path / "killed-sgd")})
    resumed = killed_then_resumed(monkeypatch, config)
    assert [c["releases"] for c in resumed["privacy"]["clients"]] == \
        [c["releases"] for c in whole["privacy"]["clients"]]
    assert resumed["privacy"]["epsilon"] == pytest.approx(whole["privacy"]["epsilon"])


def _client_weights(out) -> list[torch.Tensor]:
    content = read_sealed(out / CHECKPOINT).content
    state = torch.load(io.BytesIO(content), weights_only=True)
    return [torch.cat([v.reshape(-1).double() for v in m.values()]) for m in state["models"]]


def test_same_seed_dp_sgd_runs_differ_and_runs_without_dp_repeat(tmp_path):
    # plain sums: SecAgg clients mix a secret of their own into stochastic rounding, so only
    # here does a run without DP repeat bit for bit
    short = {"rounds": 1, "dream_steps": 1, "aggregator": "plain"}
    for i in (0, 1):
        _run(tmp_path, f"sgd{i}", dp="sample", dp_noise=1.0, **short)
        _run(tmp_path, f"off{i}", **short)
    off = [_client_weights(tmp_path / f"off{i}") for i in (0, 1)]
    sgd = [_client_weights(tmp_path / f"sgd{i}") for i in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(*off, strict=True))
    # same seed, data split, initial weights and dreams: only the DP-SGD noise and batches differ
    assert all(not torch.equal(a, b) for a, b in zip(*sgd, strict=True))


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


def _numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


@pytest.mark.parametrize("dp", [{"dp": "client", "dp_noise": 3.0},
                                {"dp": "sample", "dp_noise": 1.0}])
def test_a_dp_report_publishes_no_statistic_of_client_data(tmp_path, dp):
    from codream_secure.data import load_dataset, public_normalization

    report = _run(tmp_path, dp["dp"], rounds=1, **dp).report
    dataset = report["dataset"]
    assert "client_label_histograms" not in dataset
    assert "withheld" in " ".join(dataset)
    assert dataset["normalization"] == dict(zip(("mean", "std"), map(list, public_normalization(
        "digits", channels=1)), strict=True))
    # the attacker's reading: the pooled mean/std of the loaded training pixels appear nowhere
    raw = load_dataset("digits", max_train=TINY["max_train"])
    pixels = raw.x_train * raw.std[0] + raw.mean[0]
    numbers = _numbers(report)
    for pooled in (float(pixels.mean()), float(pixels.std())):
        assert not any(abs(x - pooled) < 1e-6 for x in numbers)
    # control: without DP the histograms are there, flagged, and the reading works
    off = _run(tmp_path, "off-" + dp["dp"], rounds=1).report["dataset"]
    assert "private data" in off["client_label_histograms_note"]
    assert [sum(h) for h in off["client_label_histograms"]] == off["client_sizes"]


def _recipe() -> str:
    """The docs' recipe that recomputes epsilon from report.json (docs/privacy.md)."""
    text = (Path(__file__).parents[2] / "docs" / "privacy.md").read_text()
    section = text.split("### Recompute a reported epsilon from report.json", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("dp", [{"dp": "client", "dp_noise": 1.0},
                                {"dp": "sample", "dp_noise": 1.0}])
def test_the_documented_recipe_recomputes_the_reported_epsilon(tmp_path, dp, capsys):
    from codream_secure.report import write_report

    write_report(_run(tmp_path, "run", rounds=1, **dp), tmp_path / "run")
    code = _recipe()
    assert 'REPORT = "runs/dp8/report.json"' in code
    code = code.replace('"runs/dp8/report.json"', repr(str(tmp_path / "run" / "report.json")))
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order")
        exec(compile(code, "docs/privacy.md", "exec"), namespace)
    privacy = json.loads((tmp_path / "run" / "report.json").read_text())["privacy"]
    ledgers = privacy.get("clients") or [privacy]
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(ledgers)
    for line, ledger in zip(printed, ledgers, strict=True):
        recomputed = float(line.split()[1])
        assert recomputed == pytest.approx(ledger["epsilon"], abs=1e-6)  # printed to 6 decimals
    assert namespace["epsilon"] == pytest.approx(ledgers[-1]["epsilon"], rel=1e-12)
    assert namespace["total_delta"] <= ledgers[-1]["delta"]
    if dp["dp"] == "client":  # Skellam: without the stored orders Opacus undercounts
        acct = create_accountant("rdp")
        acct.history = [tuple(h) for h in privacy["accountant_state"]["history"]]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order")
            default_orders = acct.get_epsilon(delta=privacy["accountant_delta"])
        assert default_orders < privacy["epsilon"] - 0.01
