"""Shared pieces of the Flower deployment tests: the echo app and the no-leftovers check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from codream_secure.flower.deployment import LocalDeployment, live_processes

ROOT = Path(__file__).resolve().parents[2]
ECHO_SERVER = "tests.flower.echo_app.server_app:app"
ECHO_CLIENT = "tests.flower.echo_app.client_app:app"


def echo_config(result: Path, *, nodes: int, rounds: int = 1, wait_s: float = 30.0,
                poll_s: float = 0.2) -> dict:
    """Run config of the echo app."""
    return {"result-path": str(result), "num-nodes": nodes, "rounds": rounds, "wait-s": wait_s,
            "poll-s": poll_s}


def _alive(pid: int) -> bool:
    """Running and not a zombie, read from /proc independently of the deployment module."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def assert_nothing_left(marker: str, pids: set[int], pgids: set[int]) -> None:
    """No process of the deployment lives: none of its pids, none in its groups, none marked."""
    assert pids, "the deployment recorded no process at all"
    assert not [pid for pid in pids if _alive(pid)]
    in_groups = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                 if _alive(pid) and _group(pid) in pgids]
    assert not in_groups
    assert not live_processes(marker)


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def assert_deployment_gone(deployment: LocalDeployment) -> None:
    """`assert_nothing_left` for a closed deployment."""
    assert_nothing_left(deployment.marker, deployment.seen_pids, deployment.seen_pgids)


@pytest.fixture
def deployment_kwargs(tmp_path: Path) -> dict:
    """Keyword arguments every test deployment shares: its folder and the echo app's path."""
    return {"folder": tmp_path / "deployment", "python_path": [ROOT]}
