"""--threat-model reaches the config and every SecAgg session the simulation opens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from codream_secure.federation import AggregationChannel
from tests.core.test_cli import invoke, stub_simulation
from tests.core.test_report import synthetic_outcome


@pytest.mark.parametrize("flag", [[], ["--threat-model", "semi-honest"]])
def test_the_flag_sets_the_config(flag, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    seen = []

    def run_simulation(config, *, progress=None, resume=False):
        seen.append(config)
        return synthetic_outcome(clients=config.data.clients, rounds=3)

    stub_simulation(monkeypatch, run_simulation)
    result = invoke("simulate", "--quiet", "--out", str(tmp_path / "run"), *flag)
    assert result.exit_code == 0, result.output
    assert seen[0].aggregation.threat_model == (flag[1] if flag else "active")


@pytest.mark.parametrize("threat_model", ["active", "semi-honest"])
def test_the_channel_opens_sessions_under_the_threat_model(threat_model):
    channel = AggregationChannel("secagg", 3, clip=1.0, ring_bits=32, expected_dropout=0.0,
                                 threat_model=threat_model)
    channel.open(8, seed=("t",))
    assert channel.session.server.threat_model == threat_model
    total, included = channel.sum({c: np.full(8, 0.25, np.float32) for c in range(3)})
    assert included == frozenset(range(3))
    np.testing.assert_allclose(total, np.full(8, 0.75), atol=channel.error_bound)
