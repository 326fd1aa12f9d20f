"""Tiny simulation runs shared by the federation and DP tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codream_secure.config import KEY_SECTION, SimulationConfig
from codream_secure.federation import CoDreamFederation
from codream_secure.simulation import SimulationOutcome, run_simulation

TINY = dict(max_train=240, max_test=120, clients=3, models=("smallcnn",), server_model="smallcnn",
            rounds=2, warmup_epochs=1, local_epochs=1, dream_batch=8, dream_steps=3,
            distill_epochs=1, buffer_size=16, adaptive_after=1, baselines=("isolated",),
            partition="iid", threads=1)


def write_toml(path: Path, **keys: object) -> Path:
    """A --config file holding `keys`, each under its table (tuples as lists)."""
    tables: dict[str, list[str]] = {}
    for key, value in keys.items():
        value = list(value) if isinstance(value, tuple) else value
        tables.setdefault(KEY_SECTION[key], []).append(f"{key} = {json.dumps(value)}")
    path.write_text("".join(f"[{table}]\n" + "\n".join(lines) + "\n\n"
                            for table, lines in tables.items()))
    return path


def killed_then_resumed(monkeypatch: pytest.MonkeyPatch, config: SimulationConfig) -> dict:
    """Run `config` until round 2 starts (a KeyboardInterrupt), then --resume it; the report."""
    return killed_then_resumed_outcome(monkeypatch, config).report


def killed_then_resumed_outcome(monkeypatch: pytest.MonkeyPatch, config: SimulationConfig
                                ) -> SimulationOutcome:
    """killed_then_resumed, returning the resumed run's whole outcome (report and dreams)."""
    real_round = CoDreamFederation.run_round

    def killed_at_round_two(self, round_index, progress=None):
        if round_index == 2:
            raise KeyboardInterrupt
        return real_round(self, round_index, progress)

    monkeypatch.setattr(CoDreamFederation, "run_round", killed_at_round_two)
    with pytest.raises(KeyboardInterrupt):
        run_simulation(config)
    monkeypatch.setattr(CoDreamFederation, "run_round", real_round)
    return run_simulation(config, resume=True)
