"""CoDream-fast on a real Flower 1.42 deployment on loopback: simulate's run, and a SuperNode
killed mid-run that becomes a protocol dropout. Every process started is gone afterwards."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("flwr", reason="the Flower deployment tests need the `flower` extra")

from codream_secure.config import SimulationConfig
from codream_secure.config.files import config_toml, toml_string
from codream_secure.flower.deployment import CONNECTION, LocalDeployment
from codream_secure.flower.local_run import deploy_local
from codream_secure.flower.server_role import Deadlines
from codream_secure.simulation import run_simulation

from .conftest import ROOT, assert_deployment_gone
from .test_remote_run import FAST

pytestmark = pytest.mark.slow

TINY = {**FAST, "rounds": 1, "generator_batches": 1}


def _deploy(tmp_path, on_start=None, *, simulation=False, **keys
            ) -> tuple[dict, list[LocalDeployment]]:
    seen: list[LocalDeployment] = []

    def started(deployment: LocalDeployment) -> None:
        seen.append(deployment)
        if on_start:
            on_start(deployment)

    config = SimulationConfig.from_keys(**{**TINY, **keys, "out": str(tmp_path / "flower")})
    # generous deadlines: CI runs two workers on 2 cores, and a missed one is a (false) dropout;
    # a killed SuperNode is reported as an error reply after its heartbeats (about 60 s)
    out = deploy_local(config, deadlines=Deadlines(protocol=120, work=600), echo=lambda _: None,
                       on_start=started, timeout_s=900, simulation=simulation)
    return json.loads((out / "report.json").read_text()), seen


def test_flwr_run_of_the_project_on_a_loopback_deployment_gives_simulates_run(tmp_path):
    # the project's own pyproject.toml declares the app: `flwr run <checkout> <connection>`
    config = SimulationConfig.from_keys(**{**TINY, "aggregator": "plain",
                                           "out": str(tmp_path / "flower")})
    run_config = tmp_path / "run-config.toml"
    run_config.write_text(f"config = {toml_string(config_toml(config))}\n"
                          "deadline-protocol = 120.0\ndeadline-work = 600.0\n")
    with LocalDeployment(tmp_path / "deployment", num_supernodes=3,
                         python_path=[ROOT]) as deployment:
        deployment.flwr("run", str(ROOT), CONNECTION, "--stream", "--run-config",
                        str(run_config), timeout_s=900)
    assert_deployment_gone(deployment)
    report = json.loads((tmp_path / "flower" / "report.json").read_text())
    local = run_simulation(SimulationConfig.from_keys(
        **{**TINY, "aggregator": "plain", "out": str(tmp_path / "local")})).report
    assert [r["codream"] for r in report["rounds"]] == [r["codream"] for r in local["rounds"]]
    assert report["final"]["codream"] == local["final"]["codream"]
    assert len(report["runtime"]["supernodes"]) == 3 and report["runtime"]["departures"] == []


def test_the_simulation_runtime_gives_simulates_run(tmp_path):
    # with SecAgg the runs agree to rounding: tests/flower/test_flower_app.py checks that
    pytest.importorskip("ray", reason="Flower's simulation runtime needs flwr[simulation]")
    report, seen = _deploy(tmp_path, simulation=True, aggregator="plain", rounds=2)
    assert_deployment_gone(seen[0])
    local = run_simulation(SimulationConfig.from_keys(
        **{**TINY, "aggregator": "plain", "rounds": 2, "out": str(tmp_path / "local")})).report
    assert [r["codream"] for r in report["rounds"]] == [r["codream"] for r in local["rounds"]]
    assert report["runtime"]["departures"] == []


def test_a_supernode_killed_mid_run_drops_out_and_the_survivors_finish(tmp_path):
    def kill_after_warm_up(deployment: LocalDeployment) -> None:
        log = deployment.logs / "flwr-run-1.log"

        def watch() -> None:
            while not (log.exists() and "warm-up: mean client accuracy" in log.read_text()):
                time.sleep(0.2)
            deployment.kill_supernode(1)

        threading.Thread(target=watch, daemon=True).start()

    # 4 clients: SecAgg's threshold is 2, so each survivor keeps 2 live share holders
    report, seen = _deploy(tmp_path, kill_after_warm_up, aggregator="secagg", clients=4)
    assert_deployment_gone(seen[0])
    departures = report["runtime"]["departures"]
    assert [(d["client"], d["round"], d["purpose"]) for d in departures] == [(1, 1, "dream")], \
        departures
    assert departures[0]["stage"] in ("advertise", "roster", "upload")
    assert "deadline" in departures[0]["reason"] or "error reply" in departures[0]["reason"]
    assert report["runtime"]["survivors"] == [0, 2, 3]
    last = report["rounds"][-1]
    assert last["dropped"] == [1] and last["note"] == ""
    assert last["included_in_dreams"] == [0, 2, 3] and last["kd"]["clients"] == [0, 2, 3]
