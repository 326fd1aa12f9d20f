"""Tiny simulation runs shared by the federation and DP tests."""

from __future__ import annotations

import pytest

from codream_secure.config import SimulationConfig
from codream_secure.federation import CoDreamFederation
from codream_secure.simulation import run_simulation

TINY = dict(max_train=240, max_test=120, clients=3, models=("smallcnn",), server_model="smallcnn",
            rounds=2, warmup_epochs=1, local_epochs=1, dream_batch=8, dream_steps=3,
            distill_epochs=1, buffer_size=16, adaptive_after=1, baselines=("isolated",),
            partition="iid", threads=1)


def killed_then_resumed(monkeypatch: pytest.MonkeyPatch, config: SimulationConfig) -> dict:
    """Run `config` until round 2 starts (a KeyboardInterrupt), then --resume it; the report."""
    real_round = CoDreamFederation.run_round

    def killed_at_round_two(self, round_index, progress=None):
        if round_index == 2:
            raise KeyboardInterrupt
        return real_round(self, round_index, progress)

    monkeypatch.setattr(CoDreamFederation, "run_round", killed_at_round_two)
    with pytest.raises(KeyboardInterrupt):
        run_simulation(config)
    monkeypatch.setattr(CoDreamFederation, "run_round", real_round)
    return run_simulation(config, resume=True).report
