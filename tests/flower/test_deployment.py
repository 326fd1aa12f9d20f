"""A real Flower 1.42 deployment on loopback: runs, dropouts, interrupts, TLS and node auth.

Each test starts its own SuperLink and SuperNodes on free ports with a private FLWR_HOME and
checks afterwards that none of their processes is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower deployment tests need the `flower` extra")

from codream_secure.flower.certificates import make_node_keys, make_test_certificates
from codream_secure.flower.deployment import DeploymentError, LocalDeployment, RunFailed

from .conftest import (
    ECHO_CLIENT,
    ECHO_SERVER,
    ROOT,
    assert_deployment_gone,
    assert_nothing_left,
    echo_config,
)

pytestmark = pytest.mark.slow


def _echo(deployment: LocalDeployment, result: Path, **config: float) -> dict:
    """Run the echo app to completion; what its ServerApp wrote."""
    outcome = deployment.run(ECHO_SERVER, ECHO_CLIENT, echo_config(result, **config))
    assert outcome.status == "finished:completed"
    return json.loads(result.read_text())


def test_every_supernode_answers_with_its_node_config(tmp_path, deployment_kwargs):
    with LocalDeployment(num_supernodes=2, node_config={"data-dir": str(tmp_path / "my data")},
                         **deployment_kwargs) as deployment:
        ids = [deployment.wait_until_joined(k) for k in range(2)]
        assert deployment.online_node_ids() == sorted(ids)
        echoed = _echo(deployment, tmp_path / "echo.json", nodes=2, rounds=2)
        logs = sorted(p.name for p in deployment.logs.iterdir())
    assert_deployment_gone(deployment)
    assert echoed["node_ids"] == sorted(ids)
    assert echoed["partitions"] == {str(ids[0]): 0, str(ids[1]): 1}
    for config in echoed["node_configs"].values():
        assert config["num-partitions"] == 2
        assert config["data-dir"] == str(tmp_path / "my data")
    assert {"superlink.log", "supernode-0.log", "supernode-1.log", "flwr-run-1.log"} <= set(logs)


def test_a_killed_supernode_fails_the_run_and_the_error_shows_why(tmp_path, deployment_kwargs):
    result = tmp_path / "echo.json"
    with pytest.raises(RunFailed) as failed, \
            LocalDeployment(num_supernodes=2, **deployment_kwargs) as deployment:
        survivor = deployment.wait_until_joined(0)
        deployment.kill_supernode(1)
        assert deployment.wait_until_exited(1, timeout_s=1) == -signal.SIGKILL
        deployment.run(ECHO_SERVER, ECHO_CLIENT, echo_config(result, nodes=2, wait_s=20))
    assert_deployment_gone(deployment)
    message = str(failed.value)
    assert "flwr run 1" in message and "finished:failed" in message
    assert "EchoFailed" in message  # the tail of the run's log carries the ServerApp's error
    assert json.loads(result.read_text())["partitions"] == {str(survivor): 0}


# The holder starts as a terminal's Python would: Ctrl-C raises KeyboardInterrupt. A test
# runner's worker can pass on an ignored or blocked SIGINT, which a child inherits.
HOLD = """
import json, signal, sys, time
from pathlib import Path
from codream_secure.flower.deployment import LocalDeployment
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
with LocalDeployment(Path(sys.argv[1]), num_supernodes=1) as deployment:
    print(json.dumps({"marker": deployment.marker, "pids": sorted(deployment.seen_pids),
                      "pgids": sorted(deployment.seen_pgids)}), flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_holder_stops_every_process(tmp_path, sig):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "deployment")],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        started = json.loads(holder.stdout.readline())
        holder.send_signal(sig)
        status = holder.wait(timeout=60)
    finally:
        holder.kill()
    assert_nothing_left(started["marker"], set(started["pids"]), set(started["pgids"]))
    # Ctrl-C ends Python by the signal itself after the clean-up; SIGTERM by SystemExit(128 + 15)
    assert status == {signal.SIGINT: -signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}[sig]


def test_a_supernode_without_the_ca_certificate_cannot_connect(tmp_path, deployment_kwargs):
    tls = make_test_certificates(tmp_path / "tls")
    with LocalDeployment(num_supernodes=1, tls=tls, **deployment_kwargs) as deployment:
        trusting = deployment.wait_until_joined(0)
        stranger = deployment.add_supernode(1, trust_ca=False)
        with pytest.raises(DeploymentError, match="supernode 1 exited") as refused:
            deployment.wait_until_joined(stranger, timeout_s=60)
        assert deployment.online_node_ids() == [trusting]
    assert_deployment_gone(deployment)
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)


def test_supernode_auth_admits_registered_keys_only(tmp_path, deployment_kwargs):
    tls = make_test_certificates(tmp_path / "tls")
    unregistered = make_node_keys(tmp_path / "keys", "unregistered")
    with LocalDeployment(num_supernodes=1, tls=tls, supernode_auth=True,
                         **deployment_kwargs) as deployment:
        member = deployment.wait_until_joined(0)
        keyless = deployment.add_supernode(1)
        unknown = deployment.add_supernode(2, keys=unregistered)
        for k in (keyless, unknown):
            assert deployment.wait_until_exited(k, timeout_s=60) == 1
            assert deployment.supernode_id(k) is None
        assert "All SuperNodes must be registered" in deployment.supernode_log(keyless)
        assert "Failed to activate SuperNode" in deployment.supernode_log(unknown)
        echoed = _echo(deployment, tmp_path / "echo.json", nodes=1)
        assert echoed["node_ids"] == [member] == deployment.online_node_ids()
        # Control: once its key is registered, the same key joins.
        registered = deployment.register(unregistered.public_key)
        again = deployment.add_supernode(2, keys=unregistered)
        assert deployment.wait_until_joined(again) == registered
        assert deployment.online_node_ids() == sorted([member, registered])
    assert_deployment_gone(deployment)


def test_without_auth_a_keyless_supernode_joins(tmp_path, deployment_kwargs):
    """Control for the auth test: the SuperLink without --enable-supernode-auth lets it in."""
    tls = make_test_certificates(tmp_path / "tls")
    with LocalDeployment(num_supernodes=1, tls=tls, **deployment_kwargs) as deployment:
        keyless = deployment.add_supernode(1)
        ids = [deployment.wait_until_joined(k) for k in (0, keyless)]
        echoed = _echo(deployment, tmp_path / "echo.json", nodes=2)
        # A key identifies a node only once registered, with or without auth.
        unknown = deployment.add_supernode(2, keys=make_node_keys(tmp_path / "keys", "unknown"))
        assert deployment.wait_until_exited(unknown, timeout_s=60) != 0
    assert_deployment_gone(deployment)
    assert echoed["node_ids"] == sorted(ids)
    assert sorted(echoed["partitions"].values()) == [0, 1]
