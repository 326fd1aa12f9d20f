"""CoDream-fast with every client's work done by its own ClientRole behind a Link: the same run
as `simulate`, and real dropouts that the protocol recovers from."""

from __future__ import annotations

import numpy as np
import pytest

from codream_secure.config import SimulationConfig
from codream_secure.errors import ConfigError
from codream_secure.flower.local_link import InProcessLink
from codream_secure.flower.payload import Payload
from codream_secure.flower.run import run_remote
from codream_secure.flower.server_role import Deadlines, RemoteFederation
from codream_secure.simulation import run_simulation

FAST = dict(max_train=240, max_test=120, clients=3, models=("smallcnn",),
            server_model="smallcnn", rounds=2, warmup_epochs=1, local_epochs=1, dream_batch=8,
            distill_epochs=1, buffer_size=32, adaptive_after=1, baselines=(), partition="iid",
            threads=1, dream_mode="generator", generator_batches=2, generator_local_steps=2,
            generator_latent_dim=16)


def _config(tmp_path, **keys) -> SimulationConfig:
    return SimulationConfig.from_keys(**{**FAST, "out": str(tmp_path / "run"), **keys})


def _accuracies(report: dict) -> list[tuple[list[float], list[float]]]:
    return [(r["codream"]["val"], r["codream"]["test"]) for r in report["rounds"]]


@pytest.mark.parametrize("round_order", ["distill-last", "local-last", "joint"])
def test_a_plain_remote_run_is_simulate_exactly(tmp_path, round_order):
    config = _config(tmp_path, aggregator="plain", round_order=round_order)
    local = run_simulation(config).report
    remote = run_remote(config, InProcessLink(config), nodes={0: 0, 1: 1, 2: 2}).report
    assert _accuracies(remote) == _accuracies(local)
    assert remote["final"]["codream"] == local["final"]["codream"]
    assert [r["kd"] for r in remote["rounds"]] == [r["kd"] for r in local["rounds"]]


@pytest.mark.parametrize("aggregator", ["secagg", "secagg+"])
def test_a_secure_remote_run_matches_simulate_to_rounding(tmp_path, aggregator):
    config = _config(tmp_path, aggregator=aggregator)
    local = run_simulation(config).report
    remote = run_remote(config, InProcessLink(config), nodes={0: 0, 1: 1, 2: 2}).report
    # stochastic rounding differs from run to run; 120 test samples: a sample or two
    for (val, test), (want_val, want_test) in zip(_accuracies(remote), _accuracies(local),
                                                  strict=True):
        assert val == pytest.approx(want_val, abs=0.03)
        assert test == pytest.approx(want_test, abs=0.03)
    assert remote["aggregator"]["threshold"] == local["aggregator"]["threshold"]
    assert remote["runtime"]["departures"] == []


def test_the_round_trips_are_a_few_per_dream_batch(tmp_path):
    config = _config(tmp_path, aggregator="secagg", rounds=3)
    link = InProcessLink(config)
    run_remote(config, link, nodes={0: 0, 1: 1, 2: 2})
    dream_calls = {(a, p) for _, a, p in link.log}
    assert ("secure", "dream") in dream_calls and ("secure", "labels") in dream_calls
    # hello, warm-up (with round 1's local training); the two sessions' key setups (2 round
    # trips each) once; per round 2 batches x 3 stages, 1 label step x 3 and the finish (with
    # the next round's local training)
    assert link.calls == 2 + 2 * 2 + 3 * (2 * 3 + 3 + 1)


def _silent(victim: int, *, after_calls: int) -> object:
    def fault(client: int, payload: Payload, calls: int):
        if client == victim and calls > after_calls:
            return "no reply before the 1 s deadline"
        return None
    return fault


@pytest.mark.parametrize("after_calls", [3, 4, 6, 8, 11])
def test_a_client_that_dies_mid_round_is_a_dropout_and_the_run_goes_on(tmp_path, after_calls):
    config = _config(tmp_path, aggregator="secagg", clients=4)
    link = InProcessLink(config, fault=_silent(2, after_calls=after_calls))
    report = run_remote(config, link, nodes={c: c for c in range(4)},
                        deadlines=Deadlines(protocol=1, work=1)).report
    departures = report["runtime"]["departures"]
    assert [d["client"] for d in departures] == [2]
    assert departures[0]["round"] == 1 and "deadline" in departures[0]["reason"]
    assert report["runtime"]["survivors"] == [0, 1, 3]
    assert report["rounds"][1]["dropped"] == [2]
    assert 2 not in report["rounds"][2]["included_in_dreams"]
    assert report["rounds"][2]["note"] == ""  # the survivors still exchange knowledge
    assert len(report["rounds"]) == 3


def test_too_few_survivors_skip_the_exchange_but_not_the_run(tmp_path):
    config = _config(tmp_path, aggregator="secagg", clients=3)

    def two_die(client, payload, calls):
        return "no reply" if client in (0, 1) and calls > 3 else None

    report = run_remote(config, InProcessLink(config, fault=two_die),
                        nodes={c: c for c in range(3)}, deadlines=Deadlines(1, 1)).report
    assert "no knowledge exchange" in report["rounds"][1]["note"]
    assert report["runtime"]["survivors"] == [2]


def test_pixel_mode_dp_and_simulated_dropouts_are_refused_by_name(tmp_path):
    for keys, named in [({"dream_mode": "pixel"}, "dream_mode"),
                        ({"dropout_rate": 0.2}, "dropout_rate"),
                        ({"aggregator": "paillier"}, "aggregator")]:
        config = _config(tmp_path, **keys)
        with pytest.raises(ConfigError, match=named):
            RemoteFederation(config, InProcessLink(config))


def test_a_client_refusing_a_request_departs_with_its_reason(tmp_path):
    from codream_secure.flower.payload import Reply

    config = _config(tmp_path, aggregator="secagg", rounds=1)

    def refuses(client, payload, calls):
        if client == 1 and payload.action == "secure" and calls > 3:
            return Reply(refused="StageError: made up")
        return None

    report = run_remote(config, InProcessLink(config, fault=refuses),
                        nodes={c: c for c in range(3)}).report
    departure = report["runtime"]["departures"][0]
    assert departure["client"] == 1 and "refused: StageError" in departure["reason"]
    assert np.isfinite(report["final"]["codream"]["mean_accuracy"])
